"""One SimCLR optimisation step on two batches of views: forward, NT-Xent, backward, update.

Shared by the training loop and the throughput benchmark, so that what the benchmark times is
what training runs. The model runs under autocast (bf16 on CUDA by default); the projections
are cast to float32 before the loss, so the cosine similarities, the log-sum-exp and the
gradients flowing back out of the loss are fp32, and BatchNorm keeps fp32 statistics.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch import Tensor, nn

from simclr_kit.distributed import all_gather_with_grad
from simclr_kit.models.loss import nt_xent


def simclr_step(model: nn.Module, optimizer: torch.optim.Optimizer, view1: Tensor, view2: Tensor,
                temperature: float, autocast: torch.dtype | None = None,
                channels_last: bool = False,
                scaler: torch.amp.GradScaler | None = None,
                gather: Callable[[Tensor], Tensor] = all_gather_with_grad) -> Tensor:
    """Train ``model`` (image -> projection) one step on ``view1, view2: (b, 3, S, S)`` float.

    ``scaler``: for fp16 autocast, whose small gradients underflow to zero unscaled: the loss is
    multiplied before the backward pass, the gradients divided back before the update, and a
    step whose gradients overflowed is skipped (the scale then halves). ``gather``: how the
    loss collects the other ranks' projections (see :func:`~simclr_kit.models.loss.nt_xent`).

    Returns the loss as a 0-dim device tensor, detached: reading it is the caller's choice, so
    the step itself never waits for the device.
    """
    x = torch.cat([view1, view2])  # (2b, 3, S, S): one forward, so BatchNorm sees both views
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ctx = torch.autocast(x.device.type, dtype=autocast) if autocast is not None else nullcontext()
    with ctx:
        z = model(x)  # (2b, D)
    z1, z2 = z.float().chunk(2)
    loss = nt_xent(z1, z2, temperature, gather)
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    return loss.detach()


__all__ = ["simclr_step"]
