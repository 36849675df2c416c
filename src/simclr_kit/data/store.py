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
``bad_images`` policy: ``skip`` counts and lists them (:func:`skipped_report`), ``error`` stops at
the first one, naming it. A split where nothing decodes is always an error.

A split read from files (it has a fingerprint) is decoded once per machine, in chunks of rows
spread over ``--decode-workers`` processes, into a memory-mapped ``.npy`` that every process of
the machine maps (:mod:`simclr_kit.data.mapped`); ``ImageStore.images`` is a tensor over that
map, so the pixels take page cache, not process memory. The side L of the training frame
(:func:`training_sizes`) is chosen so that most views are not upsampled.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from simclr_kit import distributed
from simclr_kit.atomic import atomic_write_text
from simclr_kit.augment.stats import channel_stats, stats_from_counts
from simclr_kit.data import decode_pool, mapped
from simclr_kit.data.chunk_digests import rows_digest
from simclr_kit.data.columns import label_values
from simclr_kit.data.pixels import CROP_FRACTION, Layout, decode_image
from simclr_kit.data.splits import Split
from simclr_kit.errors import UserError

MAX_DEFAULT_SIZE = 224
# Default training frame: at most FRAME_SCALE x the training size, so that fewer than half of
# the views of a 4:3 photo are upsampled (Monte Carlo of the crops: bench/RESULTS.md, "Photos").
FRAME_SCALE = 2.0
Image.MAX_IMAGE_PIXELS = 20_000 * 20_000  # allow big photos; refuse decompression bombs beyond


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


def _item_name(item: dict | Image.Image | None) -> str:
    """The file an image entry came from, when it says ('' for embedded bytes without a name)."""
    if isinstance(item, dict):
        return str(item.get("path") or "")
    return ""


def _open(item: dict | Image.Image) -> Image.Image:
    if isinstance(item, Image.Image):
        return item
    if item.get("bytes"):
        return Image.open(io.BytesIO(item["bytes"]))
    if item.get("path"):
        return Image.open(item["path"])
    raise ValueError("empty image entry (no bytes and no path)")


def _raw_column(split: Split) -> datasets.Dataset:
    return split.dataset.cast_column(split.image_column, datasets.Image(decode=False))


def probe_sizes(split: Split, probe: int = 2048) -> set[tuple[int, int]]:
    """The ``(width, height)`` of the images in at most ``probe`` rows spread over the split,
    from their headers only (unreadable rows are left out: decode_split reports them)."""
    raw = _raw_column(split)
    n = len(raw)
    rows = np.unique(np.linspace(0, n - 1, num=min(n, probe)).astype(int)) if n else []
    sizes: set[tuple[int, int]] = set()
    for r in rows:
        try:
            sizes.add(_open(raw[int(r)][split.image_column]).size)
        except Exception:
            continue
    return sizes


def _own_size(sizes: set[tuple[int, int]]) -> int:
    """The images' common size when they share one square size (up to 224), else 224."""
    if len(sizes) == 1:
        (w, h), = sizes
        if w == h:
            return min(w, MAX_DEFAULT_SIZE)
    return MAX_DEFAULT_SIZE


def working_size(split: Split, requested: int | None, probe: int = 2048) -> int:
    """The requested size, else the images' common size when they share one (up to 224), else 224.

    Only image headers are read, for at most ``probe`` rows spread over the split.
    """
    return requested if requested is not None else _own_size(probe_sizes(split, probe))


def frame_cap(size: int) -> int:
    """The default longest stored side for training at ``size``: ``FRAME_SCALE x size``, up to
    a multiple of 8 (448 for 224, 64 for 32)."""
    return 8 * math.ceil(FRAME_SCALE * size / 8)


def training_sizes(split: Split, image_size: int | None,
                   store_size: int | None) -> tuple[int, int]:
    """``(S, L)``: the training size (:func:`working_size`) and the side L of the training
    frames: the longest side an image is stored at (:class:`~simclr_kit.data.pixels.Layout`),
    the random resized crops being drawn over each image's whole frame.

    L is ``store_size`` when given (at least S); else the smaller of :func:`frame_cap` and the
    largest side among the probed image headers: an image is never stored larger than it is,
    so 224 x 224 images are stored at 224, and the stored form of a set does not depend on
    whether ``image_size`` was typed out or defaulted to the same value.
    """
    sizes = probe_sizes(split) if image_size is None or store_size is None else set()
    size = image_size if image_size is not None else _own_size(sizes)
    if store_size is not None:
        if store_size < size:
            raise UserError(f"--store-size {store_size} is below the training size {size} px: "
                            "the stored images must be at least as large as the views")
        return size, store_size
    largest = max((max(s) for s in sizes), default=frame_cap(size))
    return size, min(frame_cap(size), largest)


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


def _reason(err: Exception) -> str:
    text = str(err).splitlines()[0] if str(err).strip() else ""
    text = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "embedded bytes", text)
    return f"{type(err).__name__}: {text}".strip()


class ChunkDecoder:
    """Decode rows ``[start, stop)`` of ``raw`` in ``layout``'s form into the same rows of
    ``out``: an ``(N, 3, L, L)`` uint8 array in RAM, or the path of a ``.npy`` that each process
    maps shared on first use. Each image goes to the top-left of its slot, zeros elsewhere.

    Returns a chunk record ``{start, stop, files, skipped, counts, sizes}`` (``counts``: the kept
    images' per-channel histograms, 3 x 256, of their valid pixels only; ``sizes``: each kept
    image's ``[height, width]``); a skipped row's slot keeps zeros.
    """

    def __init__(self, raw: datasets.Dataset, column: str, layout: Layout,
                 out: np.ndarray | Path) -> None:
        self.raw, self.column, self.layout, self.out = raw, column, layout, out
        self._map: tuple[int, Any] | None = None  # (pid, (mmap, array, offset))

    def _rows(self) -> np.ndarray:
        if isinstance(self.out, np.ndarray):
            return self.out
        if self._map is None or self._map[0] != os.getpid():  # a forked worker maps its own
            self._map = (os.getpid(), mapped.map_rows(self.out))
        return self._map[1][1]

    def _items(self, start: int, stop: int) -> list[Any]:
        try:  # one Arrow read per slice; a row that cannot be read fails alone, below
            return list(self.raw[start:stop][self.column])
        except Exception:
            return [None] * (stop - start)

    def __call__(self, start: int, stop: int) -> dict:
        out, files, skipped, sizes = self._rows(), [], [], []
        counts = np.zeros((3, 256), np.int64)
        for first in range(start, stop, 64):
            items = self._items(first, min(first + 64, stop))
            for row, item in enumerate(items, first):
                try:
                    item = self.raw[row][self.column] if item is None else item
                    with _open(item) as img:
                        hwc = decode_image(img, self.layout)
                    h, w = hwc.shape[:2]
                    out[row, :, :h, :w] = hwc.transpose(2, 0, 1)  # (3, h, w): see data/mapped.py
                    out[row, :, h:] = 0  # the padding is zero whatever the file held before
                    out[row, :, :h, w:] = 0
                    for c in range(3):
                        counts[c] += np.bincount(hwc[..., c].ravel(), minlength=256)
                    files.append(_item_name(item))
                    sizes.append([h, w])
                except Exception as err:  # PIL raises many types for bad bytes; each is one bad row
                    skipped.append((row, _item_name(item), _reason(err)))
        record = {"start": start, "stop": stop, "files": files, "skipped": skipped,
                  "counts": counts.tolist(), "sizes": sizes}
        if self._map is not None:
            mm, array, offset = self._map[1]
            mapped.flush_rows(mm, offset, array[0].nbytes, start, stop)
            bad = {r for r, _, _ in skipped}
            record["sha256"] = rows_digest(array, [r for r in range(start, stop)
                                                   if r not in bad])
        return record

    def close(self) -> None:
        if self._map is not None and self._map[0] == os.getpid():
            mm, array, _ = self._map[1]
            del array
            self._map = None
            mm.close()


def _decode(split: Split, layout: Layout, bad_images: str, progress: bool,
            workers: int) -> mapped.Decoded:
    """Decode (or map from the cache) every image of ``split`` in ``layout``'s form, in chunks
    of rows spread over ``workers`` processes; see :mod:`simclr_kit.data.mapped` for the file."""
    final, size = _cache_dir(split, layout), layout.side
    if final is not None:
        done = mapped.open_complete(final, size)
        if done is not None:
            return done
    raw = _raw_column(split).select_columns([split.image_column])
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
    (:func:`working_size` of ``image_size``) with ``crop_fraction`` (used above 64 px only).
    Pretraining passes ``Layout.frame(L)`` (:func:`training_sizes`).

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


def skipped_summary(store: ImageStore) -> str:
    """One line: how many rows were skipped, the commonest reasons, how many files were ignored."""
    bad = [m for r, _, m in store.skipped if r >= 0]
    ignored = len(store.skipped) - len(bad)
    common = ", ".join(f"{k} x{v}" for k, v in Counter(m.split(":")[0] for m in bad).most_common(3))
    parts = [f"skipped {len(bad)} unreadable image(s) in {store.provenance.get('split')!r} "
             f"({common}), kept {len(store)}"] if bad else []
    if ignored:
        parts.append(f"ignored {ignored} file(s) that are not images")
    return "; ".join(parts)


def announce_skipped(store: ImageStore, consequence: str = "") -> None:
    """Print :func:`skipped_summary` when anything was skipped or ignored (the main process
    only); every command that decodes says it the same way, whether the decode came from the
    disk cache or not. ``consequence`` ends the line ("; listed in RUN/skipped.txt")."""
    if store.skipped and distributed.is_main():
        tqdm.write(skipped_summary(store) + consequence)


def skipped_report(store: ImageStore, *more: ImageStore) -> str:
    """Tab-separated lines ``row, file, reason`` of every skipped or ignored item, with a header;
    of several stores (an evaluation's two splits), each line led by its ``split``."""
    def split(s: ImageStore) -> str:
        return f"{s.provenance.get('split')}\t" if more else ""

    lines = [("split\t" if more else "") + "row\tfile\treason"]
    lines += [f"{split(s)}{r}\t{p}\t{m}".replace("\n", " ")
              for s in (store, *more) for r, p, m in s.skipped]
    return "\n".join(lines) + "\n"


def list_skipped(path: Path, *stores: ImageStore) -> str:
    """Write the :func:`skipped_report` of ``stores`` to ``path`` (rank 0) when they skipped
    anything, else remove a list an earlier run left there; returns the end of
    :func:`announce_skipped`'s line: "; listed in PATH", or ""."""
    if not any(s.skipped for s in stores):
        if distributed.is_main():
            path.unlink(missing_ok=True)
        return ""
    if distributed.is_main():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, skipped_report(*stores))
    return f"; listed in {path}"
