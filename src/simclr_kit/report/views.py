"""Pictures of what the augmentation does: a few images and their two SimCLR views."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from simclr_kit.augment import SimCLRAugment, channel_stats, save_view_grid
from simclr_kit.config import DataConfig, PretrainConfig
from simclr_kit.data.sources import open_splits
from simclr_kit.data.store import ImageStore, decode_split


def sample_store(data: DataConfig, count: int, image_size: int | None = None) -> ImageStore:
    """``count`` images spread evenly over the training split, decoded (only those rows)."""
    train, _ = open_splits(data, need_eval=False)
    n = len(train.dataset)
    rows = np.unique(np.linspace(0, n - 1, num=min(n, count)).astype(int)).tolist()
    few = dataclasses.replace(train, dataset=train.dataset.select(rows))
    return decode_split(few, image_size or data.image_size, data.bad_images, progress=False)


def show_augment(config: PretrainConfig, out: str | Path, count: int = 8, epoch: int = 0) -> Path:
    """Save a PNG grid: ``count`` training images next to the two views the run would make."""
    store = sample_store(config.data, count)
    mean, std = channel_stats(store.images)
    augment = SimCLRAugment(config.augment, store.image_size, mean, std, config.seed)
    out = Path(out)
    save_view_grid(store.images, augment, out, epoch=epoch)
    return out
