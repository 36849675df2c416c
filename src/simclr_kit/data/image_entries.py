"""A split's image entries as PIL opens them: the column read undecoded, each entry (embedded
bytes, a file path, or an image) opened, and the name of the file it came from."""

from __future__ import annotations

import io

import datasets
from PIL import Image

from simclr_kit.data.splits import Split

Image.MAX_IMAGE_PIXELS = 20_000 * 20_000  # allow big photos; refuse decompression bombs beyond


def item_name(item: dict | Image.Image | None) -> str:
    """The file an image entry came from, when it says ('' for embedded bytes without a name)."""
    if isinstance(item, dict):
        return str(item.get("path") or "")
    return ""


def open_item(item: dict | Image.Image) -> Image.Image:
    if isinstance(item, Image.Image):
        return item
    if item.get("bytes"):
        return Image.open(io.BytesIO(item["bytes"]))
    if item.get("path"):
        return Image.open(item["path"])
    raise ValueError("empty image entry (no bytes and no path)")


def raw_column(split: Split) -> datasets.Dataset:
    return split.dataset.cast_column(split.image_column, datasets.Image(decode=False))
