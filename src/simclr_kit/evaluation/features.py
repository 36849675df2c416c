"""Embed a decoded split once with a frozen encoder: the features every frozen protocol reuses."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from simclr_kit.augment import normalize


@torch.no_grad()
def extract_features(encoder: nn.Module, images: Tensor, mean: Sequence[float],
                     std: Sequence[float], device: torch.device | str = "cpu",
                     batch_size: int = 512, progress: bool = False, desc: str = "features") -> Tensor:
    """``images: (N, 3, S, S) uint8`` -> features ``(N, D) float32`` on the CPU.

    The encoder runs in eval mode (BatchNorm uses its running statistics and nothing is updated);
    its previous mode is restored. The last batch may be partial: sizes come from the tensors.
    """
    device = torch.device(device)
    was_training = encoder.training
    encoder.eval()
    out = []
    try:
        starts = range(0, images.shape[0], batch_size)
        for start in tqdm(starts, desc=desc, unit="batch", disable=not progress, leave=False):
            x = normalize(images[start:start + batch_size].to(device), mean, std)
            out.append(encoder(x).flatten(1).float().cpu())
    finally:
        encoder.train(was_training)
    if not out:
        return torch.empty(0, 0)
    return torch.cat(out)
