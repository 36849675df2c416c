"""Decode a split once to uint8 ``(N, 3, S, S)`` at the working size; cache the result on disk.

Every image, whatever its mode (L, RGBA, P, CMYK, 16-bit) or EXIF orientation, becomes RGB, is
resized on its shorter side to S and centre-cropped to a square. Images already S x S are kept
as they are. Augmentation then works on the device from these bytes, so nothing decodes twice.

Unreadable items (corrupt, truncated or empty files, files that are not images) follow the
``bad_images`` policy: ``skip`` counts and lists them (:func:`skipped_report`), ``error`` stops at
the first one, naming it. A split where nothing decodes is always an error.

A split read from files (it has a fingerprint) is decoded once per machine, in chunks of rows
spread over ``--decode-workers`` processes, into a memory-mapped ``.npy`` that every process of
the machine maps (:mod:`simclr_kit.data.mapped`); ``ImageStore.images`` is a tensor over that
map, so the pixels take page cache, not process memory. Training images may be stored larger
than the training size (:func:`training_sizes`), for random resized crops from more of each image.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor
from tqdm.auto import tqdm

from simclr_kit import distributed, faults
from simclr_kit.atomic import atomic_write_text
from simclr_kit.augment.stats import channel_stats, stats_from_counts
from simclr_kit.data import decode_pool, mapped
from simclr_kit.data.sources import Split
from simclr_kit.errors import UserError

MAX_DEFAULT_SIZE = 224
# A 16-bit PNG has pixel values up to 65535; PIL's convert("RGB") would clip them to 255.
_WIDE_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
Image.MAX_IMAGE_PIXELS = 20_000 * 20_000  # allow big photos; refuse decompression bombs beyond


@dataclass
class ImageStore:
    """A decoded split: ``images: (N, 3, S, S) uint8``, ``labels: (N,) int64`` or None.

    ``row_ids`` are the rows of the split the images came from (bad rows skipped leave gaps);
    ``files`` the file each came from ('' for images stored in the dataset without a name);
    ``skipped`` holds ``(row, file, reason)`` for each of those rows, and ``(-1, file, reason)``
    for files of an image folder that are not images and were ignored. ``provenance["images"]``
    counts the images kept, ``provenance["rows"]`` the rows of the split.
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

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.class_names) if self.class_names else 0


def cache_root() -> Path:
    return Path(os.environ.get("SIMCLR_KIT_CACHE", Path.home() / ".cache" / "simclr-kit"))


def _wide_range(img: Image.Image, arr: np.ndarray) -> float:
    """The white level of a 16-bit, 32-bit integer or float image."""
    if img.mode.startswith("I;16"):
        return 65535.0  # 16 bits by definition, however dark this image is
    top = float(arr.max(initial=0))
    if img.mode == "F" and top <= 1.0:
        return 1.0
    return 255.0 if top <= 255 else 65535.0


def to_rgb_array(img: Image.Image) -> np.ndarray:
    """Any PIL image -> ``(H, W, 3) uint8`` RGB, EXIF orientation applied."""
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block should not cost the picture: keep it unrotated
        img.load()
    if img.mode in _WIDE_MODES:
        arr = np.asarray(img, dtype=np.float32)
        arr = np.clip(arr * (255.0 / _wide_range(img, arr)), 0, 255).round().astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=2)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def resize_center_crop(arr: np.ndarray, size: int) -> np.ndarray:
    """``(H, W, 3) uint8`` -> ``(size, size, 3)``: shorter side to ``size`` (antialiased
    bilinear), then the centre square. Square images already at ``size`` are returned as they are.
    """
    h, w = arr.shape[:2]
    if h == size and w == size:
        return arr
    scale = size / min(h, w)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    img = Image.fromarray(arr).resize((new_w, new_h), Image.BILINEAR, reducing_gap=None)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return np.asarray(img)[top:top + size, left:left + size]


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


def working_size(split: Split, requested: int | None, probe: int = 2048) -> int:
    """The requested size, else the images' common size when they share one (up to 224), else 224.

    Only image headers are read, for at most ``probe`` rows spread over the split.
    """
    if requested is not None:
        return requested
    raw = _raw_column(split)
    n = len(raw)
    rows = np.unique(np.linspace(0, n - 1, num=min(n, probe)).astype(int)) if n else []
    sizes: set[tuple[int, int]] = set()
    for r in rows:
        try:
            sizes.add(_open(raw[int(r)][split.image_column]).size)
        except Exception:
            continue  # bad images are reported by decode_split
        if len(sizes) > 1:
            return MAX_DEFAULT_SIZE
    if len(sizes) == 1:
        (w, h), = sizes
        if w == h:
            return min(w, MAX_DEFAULT_SIZE)
    return MAX_DEFAULT_SIZE


def training_sizes(split: Split, image_size: int | None,
                   store_size: int | None) -> tuple[int, int]:
    """``(S, stored)``: the training size (:func:`working_size`) and the side the training
    images are stored at, from which the random resized crops are taken.

    ``store_size`` when given (at least S); else S at 64 px and below (small images are kept
    whole), and S when S is the images' own common size (nothing more to keep); else
    ``8 * ceil(S / 7)``, the smallest multiple of 8 at or above S / 0.875 (256 for 224: the
    resize-256 / centre-crop-224 ratio of ImageNet evaluation, so the crops see the border that a
    centre crop at S cuts off).
    """
    size = working_size(split, image_size)
    if store_size is not None:
        if store_size < size:
            raise UserError(f"--store-size {store_size} is below the training size {size} px: "
                            "the stored images must be at least as large as the views")
        return size, store_size
    if size <= 64 or (image_size is None and size < MAX_DEFAULT_SIZE):
        return size, size
    return size, -(-size // 7) * 8


def _labels(split: Split, keep: list[int], missing_labels: str) -> Tensor | None:
    if split.label_column is None:
        return None
    values = split.dataset.select_columns([split.label_column])[split.label_column]
    picked = [values[i] for i in keep]
    if missing_labels == "keep":  # as -1, for output that shows the labels it has
        return torch.tensor([-1 if v is None or v < 0 else v for v in picked], dtype=torch.int64)
    missing = sum(v is None or v < 0 for v in picked)
    if missing:  # hub test splits often carry -1 for "no label"
        raise UserError(f"split {split.split!r} has {missing} of {len(picked)} rows without a "
                        f"label in {split.label_column!r}: evaluate on a labelled split "
                        "(--eval-split) or name another --label-column")
    return torch.tensor(picked, dtype=torch.int64)


def _cache_dir(split: Split, size: int) -> Path | None:
    if not split.dataset.cache_files:  # in-memory datasets have no stable fingerprint
        return None
    key = f"{split.dataset._fingerprint}|{split.image_column}|{size}|v{mapped.VERSION}"
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
    """Decode rows ``[start, stop)`` of ``raw`` into the same rows of ``out``: an ``(N, 3, S, S)``
    uint8 array in RAM, or the path of a ``.npy`` that each process maps shared on first use.

    Returns a chunk record ``{start, stop, files, skipped, counts}`` (``counts``: the kept
    images' per-channel histograms, 3 x 256); a skipped row's slot keeps zeros.
    """

    def __init__(self, raw: datasets.Dataset, column: str, size: int,
                 out: np.ndarray | Path) -> None:
        self.raw, self.column, self.size, self.out = raw, column, size, out
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
        out, files, skipped = self._rows(), [], []
        counts = np.zeros((3, 256), np.int64)
        half = (start + stop) // 2
        for first in range(start, stop, 64):
            items = self._items(first, min(first + 64, stop))
            for row, item in enumerate(items, first):
                if row == half:
                    faults.point("decode-chunk")
                try:
                    item = self.raw[row][self.column] if item is None else item
                    with _open(item) as img:
                        hwc = resize_center_crop(to_rgb_array(img), self.size)
                    out[row] = hwc.transpose(2, 0, 1)  # (3, S, S): see data/mapped.py
                    for c in range(3):
                        counts[c] += np.bincount(hwc[..., c].ravel(), minlength=256)
                    files.append(_item_name(item))
                except Exception as err:  # PIL raises many types for bad bytes; each is one bad row
                    skipped.append((row, _item_name(item), _reason(err)))
        if self._map is not None:
            mm, array, offset = self._map[1]
            mapped.flush_rows(mm, offset, array[0].nbytes, start, stop)
        return {"start": start, "stop": stop, "files": files, "skipped": skipped,
                "counts": counts.tolist()}

    def close(self) -> None:
        if self._map is not None and self._map[0] == os.getpid():
            mm, array, _ = self._map[1]
            del array
            self._map = None
            mm.close()


def _decode(split: Split, size: int, bad_images: str, progress: bool,
            workers: int) -> mapped.Decoded:
    """Decode (or map from the cache) every image of ``split`` at ``size``, in chunks of rows
    spread over ``workers`` processes; see :mod:`simclr_kit.data.mapped` for the file."""
    final = _cache_dir(split, size)
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
    decoder = ChunkDecoder(raw, split.image_column, size, tmp / "images.npy" if tmp else
                           np.zeros((n, 3, size, size), np.uint8))
    chunks = [(s, min(s + mapped.CHUNK_ROWS, n)) for s in range(0, n, mapped.CHUNK_ROWS)]
    records = {s: r for s, r in (mapped.done_chunks(tmp) if tmp else {}).items()
               if (s, r["stop"]) in chunks}  # a record of other chunk bounds is redone
    todo = [c for c in chunks if c[0] not in records]
    bar = tqdm(total=n, initial=n - sum(e - s for s, e in todo), desc=f"decoding {split.split}",
               unit="img", disable=not progress, mininterval=1.0)
    # Forked workers write into a shared map; an array in RAM would be each worker's own copy.
    results = decode_pool.run_in_order(decoder, todo, workers if tmp is not None else 1)
    try:
        for start, stop in chunks:
            if start not in records:
                records[start] = next(results)
                if tmp is not None:
                    mapped.record_chunk(tmp, records[start])
            bar.update(stop - start)
            if bad_images == "error" and records[start]["skipped"]:
                raise _bad_image(split, *records[start]["skipped"][0])
    finally:
        results.close()
        bar.close()
        decoder.close()
    ordered = [records[s] for s, _ in chunks]
    skipped = [tuple(x) for rec in ordered for x in rec["skipped"]]
    if len(skipped) == n:
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
                          skipped, mapped.total_counts(ordered))  # type: ignore[arg-type]


def decode_split(split: Split, image_size: int | None = None, bad_images: str = "skip",
                 progress: bool = True, labels: bool = True,
                 missing_labels: str = "error", workers: int | None = None) -> ImageStore:
    """Decode every image of ``split`` once to ``(N, 3, S, S) uint8`` (cached on disk).

    A split with a fingerprint (anything read from files) is decoded into a memory-mapped file
    shared by every process of the machine, and ``images`` is a tensor over that map (no copy);
    ``workers`` decoding processes (default: the machine's cores) fill it.
    ``labels=False`` leaves the labels out (pretraining needs none, so rows without one are fine).
    ``missing_labels="keep"`` gives rows without a label the label -1 instead of an error.
    """
    size = working_size(split, image_size)
    decoded = _decode(split, size, bad_images, progress, max(1, workers or os.cpu_count() or 1))
    skipped = decoded.skipped
    if skipped and bad_images == "error":
        raise _bad_image(split, *skipped[0])
    keep = decoded.rows
    provenance = dict(split.provenance, images=len(keep), image_size=size, skipped=len(skipped),
                      ignored=len(split.ignored))
    skipped = skipped + [(-1, name, "not an image file (by its suffix): ignored")
                         for name in split.ignored]
    return ImageStore(images=torch.from_numpy(decoded.images),
                      labels=_labels(split, keep.tolist(), missing_labels) if labels else None,
                      class_names=split.class_names, row_ids=torch.from_numpy(keep),
                      image_size=size, provenance=provenance, skipped=skipped, files=decoded.files,
                      channel_counts=None if decoded.counts is None
                      else torch.from_numpy(decoded.counts))


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
