"""Per-channel statistics of uint8 images and the normalisation they feed (training and eval)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def normalize_(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """``(x - mean) / std`` per channel, in place on float ``(N, 3, H, W)``.

    Python scalars, not tensors: building small tensors on a GPU would sync with the host.
    """
    for c in range(3):
        x[:, c].sub_(mean[c]).div_(std[c])
    return x


def normalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Evaluation input: uint8 ``(B, 3, H, W)`` -> float32 ``(x/255 - mean) / std``, unaugmented."""
    return normalize_(images.to(torch.float32).div_(255.0), mean, std)


def channel_stats(images: Tensor, batch_size: int = 4096
                  ) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Per-channel mean and (population) std of uint8 ``(N, 3, H, W)`` images on the [0, 1] scale.

    Chunks of ``batch_size`` images are counted into per-channel 256-bin histograms (exact), from
    which the moments follow (:func:`stats_from_counts`). Memory stays at one chunk and the
    result does not depend on ``batch_size``.
    """
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[0] == 0:
        raise ValueError(f"expected a non-empty (N, 3, H, W) batch, got {tuple(images.shape)}")
    counts = torch.zeros(3, 256, dtype=torch.float64, device=images.device)
    for chunk in images.split(batch_size):
        for c in range(3):
            counts[c] += torch.bincount(chunk[:, c].reshape(-1), minlength=256).to(torch.float64)
    return stats_from_counts(counts)


def stats_from_counts(counts: Tensor) -> tuple[tuple[float, float, float],
                                               tuple[float, float, float]]:
    """Mean and std on the [0, 1] scale from per-channel histograms ``counts (3, 256)`` of uint8
    values: in float64, the variance around the mean (no cancellation). The decoded store keeps
    these counts, so a large set's statistics need no pass over its pixels."""
    counts = counts.to(torch.float64)
    values = torch.arange(256, dtype=torch.float64, device=counts.device) / 255.0
    total = counts.sum(dim=1)
    mean = (counts * values).sum(dim=1) / total
    std = ((counts * (values - mean[:, None]).square()).sum(dim=1) / total).sqrt()
    m, s = mean.tolist(), std.tolist()
    return (m[0], m[1], m[2]), (s[0], s[1], s[2])
