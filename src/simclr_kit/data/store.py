"""Decode a split once to uint8 ``(N, 3, L, L)`` slots; cache the result on disk.

Each image becomes RGB and takes the split's :class:`~simclr_kit.data.pixels.Layout`
(:mod:`simclr_kit.data.pixels`): the evaluation **crop** at the working size S (the standard
centre crop, filling each slot), or, for pretraining, the training **frame**: the whole image,
aspect ratio kept, its longer side reduced to at most L and never enlarged, at the top-left of
its slot (zeros elsewhere), with its valid ``(height, width)`` in ``ImageStore.sizes``. The
random resized crops are then drawn over each image's own frame (augment/geometry.py), so they
reach every part of a photo, not just its centre square. Images already in their stored form
(CIFAR at 32 px) are kept as they are. Augmentation then works on the device from these bytes,
so nothing decodes twice.

Unreadable items (corrupt, truncated or empty files, files that are not images) follow the
``bad_images`` policy: ``skip`` counts and lists them
(:func:`~simclr_kit.data.skip_reports.skipped_report`), ``error`` stops at the first one, naming
it. A split where nothing decodes is always an error.

A split read from files (it has a fingerprint) is decoded once per machine, in chunks of rows
spread over ``--decode-workers`` processes, into a memory-mapped ``.npy`` that every process of
the machine maps (:mod:`simclr_kit.data.mapped`); ``ImageStore.images`` is a tensor over that
map, so the pixels take page cache, not process memory. The side L of the training frame
(:func:`~simclr_kit.data.size_policy.training_sizes`) is chosen so that most views are not
upsampled.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from simclr_kit.augment.stats import channel_stats, stats_from_counts
from simclr_kit.data import decode_pool, mapped
from simclr_kit.data.chunk_decoder import ChunkDecoder
from simclr_kit.data.columns import label_values
from simclr_kit.data.image_entries import raw_column
from simclr_kit.data.pixels import CROP_FRACTION, Layout
from simclr_kit.data.size_policy import working_size
from simclr_kit.data.splits import Split
from simclr_kit.errors import UserError


@dataclass
class ImageStore:
    """A decoded split: ``images: (N, 3, L, L) uint8``, ``labels: (N,) int64`` or None.

    ``sizes: (N, 2) int32``: the valid ``(height, width)`` at the top-left of each slot (the
    training frame; an evaluation crop fills its slot); None means every image fills its slot.
    ``image_size`` is the slot's side L.

    ``row_ids`` are the rows of the split the images came from (bad rows skipped leave gaps);
    ``files`` the file each came from ('' for images stored in the dataset without a name);
    ``skipped`` holds ``(row, file, reason)`` for each of those rows, and ``(-1, file, reason)``
    for files of an image folder that are not images and were ignored. ``provenance["images"]``
    counts the images kept, ``provenance["rows"]`` the rows of the split. ``key`` names the
    decoded cache the images were mapped from (a digest of the dataset's fingerprint, the image
    column, the size and the cache version; None for a set held in memory): it identifies the
    pixels without reading them. A store made from another with other images must not keep it.
    """

    images: Tensor
    labels: Tensor | None
    class_names: list[str] | None
    row_ids: Tensor
    image_size: int
    provenance: dict = field(default_factory=dict)
    skipped: list[tuple[int, str, str]] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    channel_counts: Tensor | None = None  # (3, 256) histograms of the images' uint8 values
    sizes: Tensor | None = None
    key: str | None = None

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.class_names) if self.class_names else 0


def cache_root() -> Path:
    return Path(os.environ.get("SIMCLR_KIT_CACHE", Path.home() / ".cache" / "simclr-kit"))


def _labels(split: Split, keep: np.ndarray, missing_labels: str) -> Tensor | None:
    """The labels ``(len(keep),)`` int64 of rows ``keep`` of ``split``, read as one column; a
    row without one (None or negative) is -1 with ``missing_labels="keep"``, else an error."""
    if split.label_column is None:
        return None
    picked = label_values(split.dataset, split.label_column)[keep]
    if missing_labels == "keep":  # as -1, for output that shows the labels it has
        return torch.from_numpy(np.maximum(picked, -1))
    missing = int((picked < 0).sum())
    if missing:  # hub test splits often carry -1 for "no label"
        raise UserError(f"split {split.split!r} has {missing} of {len(picked)} rows without a "
                        f"label in {split.label_column!r}: evaluate on a labelled split "
                        "(--eval-split) or name another --label-column")
    return torch.from_numpy(picked)


def _cache_dir(split: Split, layout: Layout) -> Path | None:
    if not split.dataset.cache_files:  # in-memory datasets have no stable fingerprint
        return None
    key = f"{split.dataset._fingerprint}|{split.image_column}|{layout.key}|v{mapped.VERSION}"
    return cache_root() / "decoded" / hashlib.sha256(key.encode()).hexdigest()[:24]


def _bad_image(split: Split, row: int, name: str, reason: str) -> UserError:
    where = f"row {row} of {split.split!r}" + (f" ({name})" if name else "")
    return UserError(f"{where} is not a readable image ({reason}); fix or remove it, or pass "
                     "--bad-images skip to skip such images")


def _decode(split: Split, layout: Layout, bad_images: str, progress: bool,
            workers: int) -> mapped.Decoded:
    """Decode (or map from the cache) every image of ``split`` in ``layout``'s form, in chunks
    of rows spread over ``workers`` processes; see :mod:`simclr_kit.data.mapped` for the file."""
    final, size = _cache_dir(split, layout), layout.side
    if final is not None:
        done = mapped.open_complete(final, size)
        if done is not None:
            return done
    raw = raw_column(split).select_columns([split.image_column])
    n = len(raw)
    if n == 0:
        raise UserError(f"none of the 0 images in {split.split!r} could be decoded, so there "
                        "is nothing to train on (first problem: empty split)")
    tmp = mapped.begin(final, n, size) if final is not None else None
    decoder = ChunkDecoder(raw, split.image_column, layout, tmp / "images.npy" if tmp else
                           np.zeros((n, 3, size, size), np.uint8))
    chunks = [(s, min(s + mapped.CHUNK_ROWS, n)) for s in range(0, n, mapped.CHUNK_ROWS)]
    records = {s: r for s, r in (mapped.done_chunks(tmp) if tmp else {}).items()
               if (s, r["stop"]) in chunks}  # a record of other chunk bounds is redone
    todo = [c for c in chunks if c[0] not in records]
    # The bar starts at the rows already decoded and counts only the chunks decoded now.
    bar = tqdm(total=n, initial=n - sum(e - s for s, e in todo), desc=f"decoding {split.split}",
               unit="img", disable=not progress, mininterval=1.0)
    # Forked workers write into a shared map; an array in RAM would be each worker's own copy.
    results = decode_pool.run_in_order(decoder, todo, workers if tmp is not None else 1)
    finished = False
    try:
        for start, stop in chunks:
            if start not in records:
                records[start] = next(results)
                if tmp is not None:
                    mapped.record_chunk(tmp, records[start])
                bar.update(stop - start)
            if bad_images == "error" and records[start]["skipped"]:
                raise _bad_image(split, *records[start]["skipped"][0])
        finished = True
    finally:
        results.close()
        bar.close()
        decoder.close()
        if tmp is not None and not finished:
            mapped.release(tmp)  # stopped early: kept for the next decode to continue
    ordered = [records[s] for s, _ in chunks]
    skipped = [tuple(x) for rec in ordered for x in rec["skipped"]]
    if len(skipped) == n:
        if tmp is not None:
            mapped.discard(tmp)  # nothing to continue: the next decode reads every row again
        first = f"row {skipped[0][0]} {skipped[0][1]}: {skipped[0][2]}"
        raise UserError(f"none of the {n} images in {split.split!r} could be decoded, so there "
                        f"is nothing to train on (first problem: {first})")
    if tmp is not None and final is not None:
        return mapped.publish(tmp, final, n, size, ordered)
    keep = np.setdiff1d(np.arange(n, dtype=np.int64), [r for r, _, _ in skipped])
    images = decoder.out
    assert isinstance(images, np.ndarray)
    mapped.compact_rows(images.reshape(n, -1), keep)
    return mapped.Decoded(images[:len(keep)], keep, [f for rec in ordered for f in rec["files"]],
                          skipped, mapped.total_counts(ordered),  # type: ignore[arg-type]
                          mapped.record_sizes(ordered))


def decode_split(split: Split, image_size: int | None = None, bad_images: str = "skip",
                 progress: bool = True, labels: bool = True,
                 missing_labels: str = "error", workers: int | None = None, *,
                 crop_fraction: float = CROP_FRACTION,
                 layout: Layout | None = None) -> ImageStore:
    """Decode every image of ``split`` once to ``(N, 3, L, L) uint8`` (cached on disk).

    The form is ``layout``; None is the evaluation crop at the working size S
    (:func:`~simclr_kit.data.size_policy.working_size` of ``image_size``) with
    ``crop_fraction`` (used above 64 px only). Pretraining passes ``Layout.frame(L)``
    (:func:`~simclr_kit.data.size_policy.training_sizes`).

    A split with a fingerprint (anything read from files) is decoded into a memory-mapped file
    shared by every process of the machine, and ``images`` is a tensor over that map (no copy);
    ``workers`` decoding processes (default: the machine's cores) fill it.
    ``labels=False`` leaves the labels out (pretraining needs none, so rows without one are fine).
    ``missing_labels="keep"`` gives rows without a label the label -1 instead of an error.
    """
    layout = layout or Layout.crop(working_size(split, image_size), crop_fraction)
    size = layout.side
    decoded = _decode(split, layout, bad_images, progress, max(1, workers or os.cpu_count() or 1))
    skipped = decoded.skipped
    if skipped and bad_images == "error":
        raise _bad_image(split, *skipped[0])
    keep = decoded.rows
    provenance = dict(split.provenance, images=len(keep), image_size=size, skipped=len(skipped),
                      ignored=len(split.ignored))
    skipped = skipped + [(-1, name, "not an image file (by its suffix): ignored")
                         for name in split.ignored]
    return ImageStore(images=torch.from_numpy(decoded.images),
                      labels=_labels(split, keep, missing_labels) if labels else None,
                      class_names=split.class_names, row_ids=torch.from_numpy(keep),
                      image_size=size, provenance=provenance, skipped=skipped, files=decoded.files,
                      channel_counts=None if decoded.counts is None
                      else torch.from_numpy(decoded.counts),
                      sizes=torch.from_numpy(decoded.sizes), key=decoded.key)


def store_channel_stats(store: ImageStore) -> tuple[tuple[float, float, float],
                                                    tuple[float, float, float]]:
    """:func:`~simclr_kit.augment.channel_stats` of ``store.images``, from the histograms
    counted while decoding when the store has them (no pass over a large set's pixels)."""
    if store.channel_counts is not None:
        return stats_from_counts(store.channel_counts)
    return channel_stats(store.images)
