"""Where each training step's images come from: the epoch's order, this rank's share of a batch,
and the uint8 images on the training device.

The order is one seeded permutation per epoch, the same on every rank; global batch ``s`` is
``perm[s B:(s + 1) B]`` and rank r takes the r-th contiguous chunk of it, so the ranks of a
torchrun job together train on exactly the single-process batch. A batch source yields this
rank's indices for each step (:meth:`ResidentBatches.epoch`) and hands over their images
(:meth:`ResidentBatches.gather`); the training loop does not know where the pixels live.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from simclr_kit import distributed


def epoch_permutation(n: int, seed: int, epoch: int) -> Tensor:
    """One global order per epoch, the same on every rank: ``(n,)`` int64 on the CPU."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def batch_indices(perm: Tensor, step: int, global_batch: int) -> Tensor:
    """This rank's share of global batch ``step``: rank r takes the r-th contiguous chunk, so the
    union over ranks is exactly the single-process batch."""
    b = global_batch // distributed.world_size()
    start = step * global_batch + distributed.rank() * b
    return perm[start:start + b]


def place_images(images: Tensor, device: torch.device) -> Tensor:
    """Keep a uint8 set on a CUDA device when it takes under a quarter of its free memory, else
    pinned in host memory (for asynchronous copies); on other devices, where it is."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if images.numel() < free // 4:
            return images.to(device)
        return images.pin_memory()
    return images


class ResidentBatches:
    """Batches gathered from one uint8 tensor ``(N, 3, S, S)`` held whole (see
    :func:`place_images`): a step is an index into it and one copy to the device at most."""

    def __init__(self, images: Tensor, device: torch.device, global_batch: int,
                 seed: int) -> None:
        self.images = place_images(images, device)
        self.device = device
        self.global_batch = global_batch
        self.seed = seed

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def epoch(self, epoch: int, start_step: int, steps: int) -> Iterator[Tensor]:
        """This rank's indices ``(b,)`` for steps ``start_step .. steps - 1`` of ``epoch``."""
        # Indices live where the images do: a blocking host-to-GPU copy of them each step would
        # make the host wait for the GPU to drain its queue.
        perm = epoch_permutation(len(self), self.seed, epoch).to(self.images.device)
        for step in range(start_step, steps):
            yield batch_indices(perm, step, self.global_batch)

    def gather(self, idx: Tensor) -> Tensor:
        """The uint8 images of rows ``idx: (b,)``, on the training device. ``index_select``,
        not ``images[idx]``: on the CPU it gathers 64-px rows ~4x faster (bench/RESULTS.md)."""
        rows = torch.index_select(self.images, 0, idx.to(self.images.device))
        return rows.to(self.device, non_blocking=True)


__all__ = ["ResidentBatches", "batch_indices", "epoch_permutation", "place_images"]
