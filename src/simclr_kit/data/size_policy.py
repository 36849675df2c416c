"""The sizes a split is stored at: the working size S and the side L of the training frames,
chosen from the images' headers."""

from __future__ import annotations

import math

import numpy as np

from simclr_kit.data.image_entries import open_item, raw_column
from simclr_kit.data.splits import Split
from simclr_kit.errors import UserError

MAX_DEFAULT_SIZE = 224
# Default training frame: at most FRAME_SCALE x the training size, so that fewer than half of
# the views of a 4:3 photo are upsampled (Monte Carlo of the crops: bench/RESULTS.md, "Photos").
FRAME_SCALE = 2.0


def probe_sizes(split: Split, probe: int = 2048) -> set[tuple[int, int]]:
    """The ``(width, height)`` of the images in at most ``probe`` rows spread over the split,
    from their headers only (unreadable rows are left out: decode_split reports them)."""
    raw = raw_column(split)
    n = len(raw)
    rows = np.unique(np.linspace(0, n - 1, num=min(n, probe)).astype(int)) if n else []
    sizes: set[tuple[int, int]] = set()
    for r in rows:
        try:
            sizes.add(open_item(raw[int(r)][split.image_column]).size)
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
