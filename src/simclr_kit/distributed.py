"""torchrun set-up and rank helpers that fall back to one process (rank 0, world 1).

One code path serves CPU, one GPU and many: outside torchrun every helper answers as a single
process would, so the training loop never branches on "am I distributed".
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from torch import Tensor


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """Only rank 0 writes files and prints progress."""
    return rank() == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def init(device: torch.device) -> torch.device:
    """Join the torchrun process group if launched by torchrun; returns this rank's device.

    NCCL for CUDA, gloo otherwise. Outside torchrun this does nothing and returns ``device``.
    """
    if not launched_by_torchrun() or is_initialized():
        return device
    if device.type == "cuda":
        local_rank = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return device


def shutdown() -> None:
    if is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_initialized():
        dist.barrier()


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather whose backward sums every rank's gradient for this rank's slice.

    Each rank's loss depends on every rank's embeddings (they are its negatives), so the gradient
    of rank r's slice is the sum over ranks of d loss_r' / d z_r. Returning only the local
    gradient (lightly #1528) makes 1-GPU and N-GPU training silently differ.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        n = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * n:(dist.get_rank() + 1) * n]


def all_gather_with_grad(x: Tensor) -> Tensor:
    """``x: (n, ...)`` on each rank -> ``(world * n, ...)`` in rank order, gradients summed."""
    if world_size() == 1:
        return x
    return _AllGatherWithGrad.apply(x)


def all_gather_no_grad(x: Tensor) -> Tensor:
    """Like :func:`all_gather_with_grad` but only the local slice carries gradient (the bug)."""
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[rank()] = x
    return torch.cat(parts)


def all_gather_tensor(x: Tensor) -> Tensor:
    """Concatenate equally sized tensors from all ranks in rank order (no gradient)."""
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def all_reduce_sum(x: Tensor) -> Tensor:
    if world_size() > 1:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x
