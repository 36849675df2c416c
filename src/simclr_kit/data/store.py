"""Decode a split once to uint8 ``(N, 3, S, S)`` at the working size; cache the result on disk.

Every image, whatever its mode (L, RGBA, P, CMYK, 16-bit) or EXIF orientation, becomes RGB, is
resized on its shorter side to S and centre-cropped to a square. Images already S x S are kept
as they are. Augmentation then works on the device from these bytes, so nothing decodes twice.

Unreadable items (corrupt, truncated or empty files, files that are not images) follow the
``bad_images`` policy: ``skip`` counts and lists them (:func:`skipped_report`), ``error`` stops at
the first one, naming it. A split where nothing decodes is always an error.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor
from tqdm.auto import tqdm

from simclr_kit import distributed
from simclr_kit.atomic import atomic_file
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


def _cache_path(split: Split, size: int) -> Path | None:
    if not split.dataset.cache_files:  # in-memory datasets have no stable fingerprint
        return None
    key = f"{split.dataset._fingerprint}|{split.image_column}|{size}|v3"
    return cache_root() / "decoded" / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".npz")


def _bad_image(split: Split, row: int, name: str, reason: str) -> UserError:
    where = f"row {row} of {split.split!r}" + (f" ({name})" if name else "")
    return UserError(f"{where} is not a readable image ({reason}); fix or remove it, or pass "
                     "--bad-images skip to skip such images")


# (images (N, S, S, 3) uint8, kept rows, their files, skipped (row, file, reason))
Decoded = tuple[np.ndarray, list[int], list[str], list[tuple[int, str, str]]]


def _decode_all(split: Split, size: int, bad_images: str, progress: bool) -> Decoded:
    raw = _raw_column(split).select_columns([split.image_column])
    n = len(raw)
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    keep: list[int] = []
    files: list[str] = []
    skipped: list[tuple[int, str, str]] = []
    rows = tqdm(range(n), desc=f"decoding {split.split}", unit="img", disable=not progress,
                mininterval=1.0)
    for row in rows:
        item = None
        try:
            item = raw[row][split.image_column]
            with _open(item) as img:
                out[len(keep)] = resize_center_crop(to_rgb_array(img), size)
            keep.append(row)
            files.append(_item_name(item))
        except Exception as err:  # PIL raises many types for bad bytes; each is one bad row
            text = str(err).splitlines()[0] if str(err).strip() else ""
            text = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "embedded bytes", text)
            reason = f"{type(err).__name__}: {text}".strip()
            if bad_images == "error":
                raise _bad_image(split, row, _item_name(item), reason) from None
            skipped.append((row, _item_name(item), reason))
    if not keep:
        first = f"row {skipped[0][0]} {skipped[0][1]}: {skipped[0][2]}" if skipped else "empty split"
        raise UserError(f"none of the {n} images in {split.split!r} could be decoded, so there "
                        f"is nothing to train on (first problem: {first})")
    return out[:len(keep)], keep, files, skipped


def _read_cache(path: Path) -> Decoded | None:
    try:
        with np.load(path, allow_pickle=False) as f:
            skipped = [(int(r), str(p), str(m)) for r, p, m in
                       zip(f["skipped_rows"], f["skipped_files"], f["skipped_reasons"])]
            return f["images"], f["rows"].tolist(), [str(p) for p in f["files"]], skipped
    except Exception:  # a damaged cache file is only a lost optimisation: decode again
        return None


def decode_split(split: Split, image_size: int | None = None, bad_images: str = "skip",
                 progress: bool = True, labels: bool = True,
                 missing_labels: str = "error") -> ImageStore:
    """Decode every image of ``split`` once to ``(N, 3, S, S) uint8`` (cached on disk by fingerprint).

    ``labels=False`` leaves the labels out (pretraining needs none, so rows without one are fine).
    ``missing_labels="keep"`` gives rows without a label the label -1 instead of an error.
    """
    size = working_size(split, image_size)
    cache = _cache_path(split, size)
    cached = _read_cache(cache) if cache is not None and cache.is_file() else None
    if cached is not None:
        hwc, keep, files, skipped = cached
    else:
        hwc, keep, files, skipped = _decode_all(split, size, bad_images, progress)
        if cache is not None:
            _write_cache(cache, (hwc, keep, files, skipped))
    if skipped and bad_images == "error":
        raise _bad_image(split, *skipped[0])
    provenance = dict(split.provenance, images=len(keep), image_size=size, skipped=len(skipped),
                      ignored=len(split.ignored))
    skipped = skipped + [(-1, name, "not an image file (by its suffix): ignored")
                         for name in split.ignored]
    images = torch.from_numpy(np.ascontiguousarray(hwc)).permute(0, 3, 1, 2).contiguous()
    return ImageStore(images=images,
                      labels=_labels(split, keep, missing_labels) if labels else None,
                      class_names=split.class_names, row_ids=torch.tensor(keep, dtype=torch.int64),
                      image_size=size, provenance=provenance, skipped=skipped, files=files)


def _write_cache(path: Path, decoded: Decoded) -> None:
    hwc, keep, files, skipped = decoded
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as tmp, open(tmp, "wb") as f:  # a file object: no suffix added
            np.savez(f, images=hwc, rows=np.asarray(keep, dtype=np.int64),
                     files=np.asarray(files, dtype=str),
                     skipped_rows=np.asarray([r for r, _, _ in skipped], dtype=np.int64),
                     skipped_files=np.asarray([p for _, p, _ in skipped], dtype=str),
                     skipped_reasons=np.asarray([m for _, _, m in skipped], dtype=str))
    except OSError:  # the cache is an optimisation: a read-only or full disk must not stop a run
        pass


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


def skipped_report(store: ImageStore) -> str:
    """Tab-separated lines ``row, file, reason`` of every skipped or ignored item, with a header."""
    lines = ["row\tfile\treason"]
    lines += [f"{r}\t{p}\t{m}".replace("\n", " ") for r, p, m in store.skipped]
    return "\n".join(lines) + "\n"
