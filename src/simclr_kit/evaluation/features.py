"""Embed a decoded split once with a frozen encoder: the features every frozen protocol reuses."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from simclr_kit import distributed
from simclr_kit.augment import normalize


@torch.no_grad()
def extract_features(encoder: nn.Module, images: Tensor, mean: Sequence[float],
                     std: Sequence[float], device: torch.device | str = "cpu",
                     batch_size: int = 512, progress: bool = False, desc: str = "features") -> Tensor:
    """``images: (N, 3, S, S) uint8`` -> features ``(N, D) float32`` on the CPU.

    The encoder runs in eval mode (BatchNorm uses its running statistics and nothing is updated);
    its previous mode is restored. The last batch may be partial: sizes come from the tensors.
    Under torchrun each rank embeds its block of rows and every rank gets all N features, each
    sample exactly once.
    """
    device = torch.device(device)
    n = images.shape[0]
    rows = distributed.shard_rows(n) if distributed.world_size() > 1 else None
    was_training = encoder.training
    encoder.eval()
    out = []
    try:
        starts = range(0, n if rows is None else len(rows), batch_size)
        for start in tqdm(starts, desc=desc, unit="batch", disable=not progress, leave=False):
            part = slice(start, start + batch_size)
            batch = images[part] if rows is None else images[rows[part]]
            x = normalize(batch.to(device), mean, std)
            out.append(encoder(x).flatten(1).float().cpu())
    finally:
        encoder.train(was_training)
    if not out:
        return torch.empty(0, 0)
    features = torch.cat(out)
    return features if rows is None else distributed.gather_rows(features, n)
