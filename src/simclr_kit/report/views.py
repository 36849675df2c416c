"""Pictures of what the augmentation does: a few training images, stored as pretraining stores
them (whole frames), and their two SimCLR views."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from simclr_kit.augment import SimCLRAugment, save_view_grid
from simclr_kit.config import DataConfig, PretrainConfig
from simclr_kit.data.pixels import Layout
from simclr_kit.data.size_policy import training_sizes
from simclr_kit.data.skip_reports import announce_skipped
from simclr_kit.data.splits import open_splits
from simclr_kit.data.store import ImageStore, decode_split, store_channel_stats
from simclr_kit.errors import UserError


def sample_store(data: DataConfig, count: int,
                 image_size: int | None = None) -> tuple[ImageStore, int]:
    """``count`` images spread evenly over the training split, stored as pretraining stores
    them (whole frames, :func:`~simclr_kit.data.size_policy.training_sizes`; only those rows are
    decoded), and the training size S (``image_size``, else ``data.image_size``, else the
    default).

    An unreadable row is replaced by the next rows of the split (under ``--bad-images skip``),
    so the sample has ``count`` images whenever the split holds that many readable ones.
    """
    train, _ = open_splits(data, need_eval=False)
    size, side = training_sizes(train, image_size or data.image_size, data.store_size)
    n = len(train.dataset)
    spread = np.unique(np.linspace(0, n - 1, num=min(n, count)).astype(int)).tolist()
    rest = iter(sorted(set(range(n)) - set(spread)))
    rows, stores = spread, []
    while rows:
        few = dataclasses.replace(train, dataset=train.dataset.select(rows))
        try:
            store = decode_split(few, bad_images=data.bad_images, progress=False, labels=False,
                                 layout=Layout.frame(side))
        except UserError:
            if data.bad_images == "error":
                raise
            store = None  # every row of this handful was unreadable: try the next ones
        if store is not None:
            # Rows of the split, not of the handful.
            store.row_ids = torch.tensor(rows)[store.row_ids]
            store.skipped = [(rows[r] if r >= 0 else r, f, why) for r, f, why in store.skipped]
            stores.append(store)
        missing = count - sum(len(s) for s in stores)
        rows = [r for _, r in zip(range(max(missing, 0)), rest)]
    if not stores:
        raise UserError(f"none of the images of {train.split!r} could be decoded")
    return _joined(stores), size


def _joined(stores: list[ImageStore]) -> ImageStore:
    first = stores[0]
    return dataclasses.replace(
        first, images=torch.cat([s.images for s in stores]),
        row_ids=torch.cat([s.row_ids for s in stores]),
        sizes=torch.cat([s.sizes for s in stores]),  # type: ignore[misc]
        channel_counts=sum(s.channel_counts for s in stores),  # type: ignore[misc]
        files=[f for s in stores for f in s.files],
        # Rows skipped in every handful; files ignored as not images, listed once.
        skipped=[item for s in stores for item in s.skipped if item[0] >= 0]
        + [item for item in first.skipped if item[0] < 0],
        provenance=dict(first.provenance, images=sum(len(s) for s in stores)))


def show_augment(config: PretrainConfig, out: str | Path, count: int = 8,
                 epoch: int = 1) -> tuple[Path, int]:
    """Save a PNG grid: ``count`` training images next to the two views the run would make in
    ``epoch`` (counted from 1, as checkpoints and metrics count them); returns the file and the
    number of images drawn (fewer only when the split has fewer readable images)."""
    if epoch < 1:
        raise UserError(f"epoch {epoch}: epochs count from 1, as in checkpoints")
    store, size = sample_store(config.data, count)
    announce_skipped(store)
    mean, std = store_channel_stats(store)  # of the images' own pixels, not their padding
    augment = SimCLRAugment(config.augment, size, mean, std, config.seed)
    out = Path(out)
    save_view_grid(store.images, augment, out, epoch=epoch - 1,  # the keyed draws' 0-based index
                   sizes=store.sizes)
    return out, len(store)
