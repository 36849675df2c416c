"""Frozen forward passes over uint8 images: the features every frozen protocol reuses, and the
one "normalise a batch, then forward" loop that embedding, scoring and prediction share."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from simclr_kit import distributed
from simclr_kit.augment import normalize


@torch.no_grad()
def forward_images(model: nn.Module, images: Tensor, mean: Sequence[float],
                   std: Sequence[float], device: torch.device | str = "cpu",
                   batch_size: int = 512, rows: Tensor | None = None, progress: bool = False,
                   desc: str = "forward") -> Tensor:
    """``model(normalize(batch))`` over ``images: (N, 3, S, S) uint8`` in batches, in eval mode.

    Args:
        model: run in eval mode (BatchNorm uses its running statistics, nothing is updated) and
            without gradients; its previous mode is restored. It must already be on ``device``.
        mean, std: the per-channel input normalisation (0-1 scale).
        rows: ``(K,)`` indices of the images to run, in order (default: all N); gathered one
            batch at a time, so no copy of the selection is made.

    Returns:
        ``(K, ...)`` float32 outputs on the CPU, each flattened to one row (``(K, D)`` features,
        ``(K, C)`` logits); ``(0, 0)`` when there is nothing to run. The last batch may be
        partial: sizes come from the tensors.
    """
    device = torch.device(device)
    count = images.shape[0] if rows is None else len(rows)
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in tqdm(range(0, count, batch_size), desc=desc, unit="batch",
                          disable=not progress, leave=False):
            part = slice(start, start + batch_size)
            batch = images[part] if rows is None else images[rows[part]]
            out.append(model(normalize(batch.to(device), mean, std)).flatten(1).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, 0)


def extract_features(encoder: nn.Module, images: Tensor, mean: Sequence[float],
                     std: Sequence[float], device: torch.device | str = "cpu",
                     batch_size: int = 512, progress: bool = False, desc: str = "features") -> Tensor:
    """``images: (N, 3, S, S) uint8`` -> features ``(N, D) float32`` on the CPU.

    The encoder runs in eval mode (:func:`forward_images`). Under torchrun each rank embeds its
    block of rows and every rank gets all N features, each sample exactly once.
    """
    n = images.shape[0]
    rows = distributed.shard_rows(n) if distributed.world_size() > 1 else None
    features = forward_images(encoder, images, mean, std, device, batch_size, rows, progress,
                              desc)
    return features if rows is None or n == 0 else distributed.gather_rows(features, n)
