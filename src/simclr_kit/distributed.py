"""torchrun set-up and rank helpers that fall back to one process (rank 0, world 1).

One code path serves CPU, one GPU and many: outside torchrun every helper answers as a single
process would, so the training loop never branches on "am I distributed".
"""

from __future__ import annotations

import atexit
import datetime
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from simclr_kit.devices import resolve_device
from simclr_kit.errors import UserError

# What gloo, NCCL and the TCP store say when a process at the other end of a collective is gone.
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
              "remote process exited", "NCCL communicator was aborted", "Connection refused")


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """Only rank 0 writes files and prints progress."""
    return rank() == 0


def local_rank() -> int:
    """This process's index on its own node (torchrun's LOCAL_RANK); 0 outside torchrun."""
    return int(os.environ.get("LOCAL_RANK", "0")) if is_initialized() else 0


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
    atexit.register(shutdown)  # a group left open at exit makes PyTorch warn (and NCCL may hang)
    return device


def process_device(name: str) -> torch.device:
    """The device this process runs on: ``name`` ("auto", "cpu", "cuda", "cuda:1", ...) resolved
    by :func:`~simclr_kit.devices.resolve_device`, then this rank's GPU under torchrun
    (:func:`init`). Outside torchrun a CUDA device keeps the index it was given, none for
    "cuda" or "auto"."""
    return init(resolve_device(name))


def peer_failure(err: BaseException, what: str) -> UserError | None:
    """A one-line UserError when ``err`` says that another process of the job is gone (it
    failed or was killed: its own error is the one to read), else None."""
    if not isinstance(err, RuntimeError):
        return None
    text = str(err)
    said = next((m for m in _PEER_GONE if m in text), None)
    if said is None and not isinstance(err, getattr(dist, "DistNetworkError", ())):
        return None
    return UserError(f"another process of this torchrun job stopped while this one was {what} "
                     f"({said or text.splitlines()[0][:100]}): its own error, the cause, is in "
                     "its output (torchrun prints each local process's; for another node, in "
                     "that node's log); this process stops too")


@contextmanager
def collective(what: str) -> Iterator[None]:
    """Around calls that need every process of the job: a process that is gone becomes
    :func:`peer_failure`'s one line instead of the transport's traceback."""
    try:
        yield
    except RuntimeError as err:
        failure = peer_failure(err, what)
        if failure is None:
            raise
        raise failure from None


def wrap_model(model: nn.Module, device: torch.device, sync_bn: bool = True) -> nn.Module:
    """``model`` in DistributedDataParallel under torchrun; ``model`` itself in one process.

    With ``sync_bn`` on CUDA, BatchNorm layers become SyncBatchNorm in place (they keep their
    parameter objects, so an optimizer over ``model`` still holds them): statistics over the
    global batch, as SimCLR trains. SyncBatchNorm has no CPU kernels, so under gloo BatchNorm
    stays per rank: each rank normalises its own 2b views.
    """
    if world_size() == 1:
        return model
    if device.type == "cuda" and sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    with collective("building the model (DistributedDataParallel)"):
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)


def shutdown() -> None:
    if is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_initialized():
        with collective("waiting for the others at a barrier"):
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
        grad = grad.contiguous().clone()  # autograd may still hold the incoming buffer
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        n = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * n:(dist.get_rank() + 1) * n]


def all_gather_with_grad(x: Tensor) -> Tensor:
    """``x: (n, ...)`` on each rank -> ``(world * n, ...)`` in rank order, gradients summed.

    With the summed backward, rank r's ``x`` receives d(sum_r' loss_r')/dx_r, which is W times
    the gradient of the mean loss; DDP's averaging of parameter gradients over the W ranks divides
    it out again, so the update equals the single-process one without rescaling the loss.
    """
    if world_size() == 1:
        return x
    return _AllGatherWithGrad.apply(x)


def all_gather_tensor(x: Tensor) -> Tensor:
    """Concatenate equally sized tensors from all ranks in rank order (no gradient)."""
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    with collective("gathering results"):
        dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def all_reduce_sum(x: Tensor) -> Tensor:
    if world_size() > 1:
        x = x.clone()
        with collective("summing a value over the processes"):
            dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def _comm_device() -> torch.device:
    """Where collective buffers must live: NCCL needs this rank's GPU, gloo takes CPU tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def max_over_ranks(value: int) -> int:
    """The largest of every rank's ``value``: lets all ranks take the same decision."""
    if world_size() == 1:
        return value
    x = torch.tensor([value], dtype=torch.int64, device=_comm_device())
    with collective("agreeing with the others"):
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return int(x.item())


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` holds on any rank; every rank gets the same answer, so all take the same
    branch (a save, a stop, a recomputation) at the same step."""
    return max_over_ranks(int(flag)) > 0


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` (any picklable value) on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    with collective("receiving a decision of the first process"):
        dist.broadcast_object_list(box, src=0)
    return box[0]


@contextmanager
def local_main_first() -> Iterator[None]:
    """Run the body on each node's local rank 0 first, then on the other ranks of the node.

    For work whose result the first process caches (downloads, the decoded image store): the
    others then read the cache instead of doing it again. If the first process fails it still
    releases the others, which then meet the same error themselves.
    """
    first = local_rank() == 0
    # Decoding a large set takes longer than the process group's 30-minute timeout (ImageNet:
    # tens of minutes): the waiting is done in a gloo group of its own with a day's timeout.
    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=24)) \
        if is_initialized() else None
    if not first:
        _wait(group)
    try:
        yield
    finally:
        if first:
            _wait(group)


def _wait(group: Any) -> None:
    if group is not None:
        with collective("waiting for the node's first process to read the data"):
            dist.barrier(group=group)


def shard_rows(n: int) -> Tensor:
    """This rank's rows of ``n`` for sharded inference: ``(ceil(n / W),)`` int64.

    Rank r takes the r-th contiguous block; blocks past the end repeat row n - 1 so every rank
    has the same number of rows (all-gather needs equal sizes). :func:`gather_rows` drops those
    repeats, so no sample is counted twice (unlike a padding DistributedSampler).
    """
    per_rank = math.ceil(n / world_size())
    start = rank() * per_rank
    return torch.arange(start, start + per_rank).clamp(max=max(n - 1, 0))


def gather_rows(local: Tensor, n: int) -> Tensor:
    """Rows computed for :func:`shard_rows` on every rank -> the ``(n, ...)`` result, in order.

    ``local: (ceil(n / W), ...)`` on any device; the result is on the same device as ``local``.
    """
    if world_size() == 1:
        return local[:n]
    return all_gather_tensor(local.to(_comm_device())).to(local.device)[:n]
