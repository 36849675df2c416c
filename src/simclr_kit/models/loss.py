"""NT-Xent, the normalised temperature-scaled cross-entropy of SimCLR (Chen et al. 2020, eq. 1).

Written as ``cross_entropy`` over cosine-similarity logits: the log-sum-exp inside it subtracts
the maximum, so ``exp(sim / T)`` never overflows, even in fp16. Negatives come from every rank.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from simclr_kit.distributed import all_gather_with_grad, rank


def no_gather(x: Tensor) -> Tensor:
    """The identity as ``gather``: negatives from this process's batch only."""
    return x


def nt_xent(z1: Tensor, z2: Tensor, temperature: float = 0.1,
            gather: Callable[[Tensor], Tensor] = all_gather_with_grad) -> Tensor:
    """Mean NT-Xent over this rank's 2b anchors, with all 2N embeddings of all ranks as candidates.

    ``z1, z2: (b, D)`` projections of the two views of the same b images on this rank.
    Across W ranks N = W b. Each anchor's positive is the other view of its image; the other
    2N - 2 embeddings are negatives. The mean of the W per-rank losses is the loss over the
    global batch of 2N anchors; with ``gather`` summing gradients over ranks in its backward,
    DDP's averaging of the gradients gives exactly that loss's gradient (see
    :func:`~simclr_kit.distributed.all_gather_with_grad`), so the loss is not rescaled by W.

    ``gather`` may also be :func:`no_gather` (only local negatives): the anchors then sit at
    offset 0.
    """
    b = z1.shape[0]
    z1 = F.normalize(z1.float(), dim=1)
    z2 = F.normalize(z2.float(), dim=1)
    keys = torch.cat([gather(z1), gather(z2)])  # (2N, D): all first views, then all second views
    n = keys.shape[0] // 2
    queries = torch.cat([z1, z2])  # (2b, D)
    logits = queries @ keys.T / temperature  # (2b, 2N)

    # This rank's images sit at rows rank * b of the gathered keys, or at 0 if nothing gathered.
    offset = rank() * b if n > b else 0
    local = torch.arange(b, device=z1.device) + offset
    self_index = torch.cat([local, local + n])  # where each anchor sits among the keys
    positive = torch.cat([local + n, local])
    rows = torch.arange(2 * b, device=z1.device)
    logits[rows, self_index] = float("-inf")  # an anchor is never its own negative
    return F.cross_entropy(logits, positive)


class NTXentLoss(nn.Module):
    """Module form of :func:`nt_xent`: ``loss = NTXentLoss(0.1)(z1, z2)``."""

    def __init__(self, temperature: float = 0.1, gather_distributed: bool = True) -> None:
        super().__init__()
        self.temperature = temperature
        self.gather_distributed = gather_distributed

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        gather = all_gather_with_grad if self.gather_distributed else no_gather
        return nt_xent(z1, z2, self.temperature, gather)
