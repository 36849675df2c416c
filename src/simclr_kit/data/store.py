"""Decode a split once to uint8 ``(N, 3, S, S)`` at the working size; cache the result on disk.

Every image, whatever its mode (L, RGBA, P, CMYK, 16-bit) or EXIF orientation, becomes RGB, is
resized on its shorter side to S and centre-cropped to a square. Images already S x S are kept
as they are. Augmentation then works on the device from these bytes, so nothing decodes twice.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor
from tqdm.auto import tqdm

from simclr_kit.data.sources import Split
from simclr_kit.errors import UserError

MAX_DEFAULT_SIZE = 224
# A 16-bit PNG has pixel values up to 65535; PIL's convert("RGB") would clip them to 255.
_WIDE_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
Image.MAX_IMAGE_PIXELS = 20_000 * 20_000  # allow big photos; refuse decompression bombs beyond


@dataclass
class ImageStore:
    """A decoded split: ``images: (N, 3, S, S) uint8``, ``labels: (N,) int64`` or None.

    ``row_ids`` are the rows of the split the images came from (bad rows skipped leave gaps).
    """

    images: Tensor
    labels: Tensor | None
    class_names: list[str] | None
    row_ids: Tensor
    image_size: int
    provenance: dict = field(default_factory=dict)
    skipped: list[tuple[int, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.class_names) if self.class_names else 0


def cache_root() -> Path:
    return Path(os.environ.get("SIMCLR_KIT_CACHE", Path.home() / ".cache" / "simclr-kit"))


def to_rgb_array(img: Image.Image) -> np.ndarray:
    """Any PIL image -> ``(H, W, 3) uint8`` RGB, EXIF orientation applied."""
    img = ImageOps.exif_transpose(img)
    if img.mode in _WIDE_MODES:
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.max(initial=0) > 255 else 255.0
        arr = np.clip(arr / top * 255.0, 0, 255).round().astype(np.uint8)
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


def _labels(split: Split, keep: list[int]) -> Tensor | None:
    if split.label_column is None:
        return None
    values = split.dataset.select_columns([split.label_column])[split.label_column]
    picked = [values[i] for i in keep]
    if any(v is None or v < 0 for v in picked):
        raise UserError(f"split {split.split!r} has rows without a label in "
                        f"{split.label_column!r}")
    return torch.tensor(picked, dtype=torch.int64)


def _cache_path(split: Split, size: int) -> Path | None:
    if not split.dataset.cache_files:  # in-memory datasets have no stable fingerprint
        return None
    key = f"{split.dataset._fingerprint}|{split.image_column}|{size}|v1"
    return cache_root() / "decoded" / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".npz")


def _decode_all(split: Split, size: int, bad_images: str,
                progress: bool) -> tuple[np.ndarray, list[int], list[tuple[int, str]]]:
    raw = _raw_column(split).select_columns([split.image_column])
    n = len(raw)
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    keep: list[int] = []
    skipped: list[tuple[int, str]] = []
    rows = tqdm(range(n), desc=f"decoding {split.split}", unit="img", disable=not progress,
                mininterval=1.0)
    for row in rows:
        try:
            with _open(raw[row][split.image_column]) as img:
                out[len(keep)] = resize_center_crop(to_rgb_array(img), size)
            keep.append(row)
        except Exception as err:
            reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            if bad_images == "error":
                raise UserError(f"row {row} of {split.split!r} is not a readable image "
                                f"({reason}); use --bad-images skip to skip such rows") from None
            skipped.append((row, reason))
    if not keep:
        raise UserError(f"none of the {n} images in {split.split!r} could be decoded "
                        f"(first problem: {skipped[0][1] if skipped else 'empty split'})")
    return out[:len(keep)], keep, skipped


def decode_split(split: Split, image_size: int | None = None, bad_images: str = "skip",
                 progress: bool = True) -> ImageStore:
    """Decode every image of ``split`` once to ``(N, 3, S, S) uint8`` (cached on disk by fingerprint)."""
    size = working_size(split, image_size)
    cache = _cache_path(split, size)
    if cache is not None and cache.is_file():
        with np.load(cache) as f:
            hwc, keep = f["images"], f["rows"].tolist()
            skipped = [(int(r), str(m)) for r, m in zip(f["skipped_rows"], f["skipped_reasons"])]
    else:
        hwc, keep, skipped = _decode_all(split, size, bad_images, progress)
        if cache is not None:
            _write_cache(cache, hwc, keep, skipped)
    if skipped and bad_images == "error":
        raise UserError(f"row {skipped[0][0]} of {split.split!r} is not a readable image "
                        f"({skipped[0][1]})")
    images = torch.from_numpy(np.ascontiguousarray(hwc)).permute(0, 3, 1, 2).contiguous()
    return ImageStore(images=images, labels=_labels(split, keep), class_names=split.class_names,
                      row_ids=torch.tensor(keep, dtype=torch.int64), image_size=size,
                      provenance=dict(split.provenance, image_size=size, skipped=len(skipped)),
                      skipped=skipped)


def _write_cache(path: Path, hwc: np.ndarray, keep: list[int],
                 skipped: list[tuple[int, str]]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
        np.savez(tmp, images=hwc, rows=np.asarray(keep, dtype=np.int64),
                 skipped_rows=np.asarray([r for r, _ in skipped], dtype=np.int64),
                 skipped_reasons=np.asarray([m for _, m in skipped], dtype=str))
        os.replace(tmp, path)
    except OSError:
        pass  # the cache is an optimisation: a read-only or full disk must not stop a run


def skipped_summary(store: ImageStore) -> str:
    """One line: how many rows were skipped and the commonest reasons."""
    reasons = Counter(m.split(":")[0] for _, m in store.skipped)
    common = ", ".join(f"{k} x{v}" for k, v in reasons.most_common(3))
    return f"skipped {len(store.skipped)} unreadable image(s) in {store.provenance.get('split')} ({common})"
