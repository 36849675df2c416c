"""One image to uint8 pixels in the form a split is stored in: the training frame or the
evaluation crop (:class:`Layout`).

Every image, whatever its mode (L, RGBA, P, CMYK, 16-bit) or EXIF orientation, becomes RGB
(:func:`to_rgb_array`). Then:

- the training **frame** keeps the whole image, aspect ratio kept: resized (antialiased
  bilinear) so that its longer side is at most the slot's side L, never enlarged. It sits at
  the top-left of an L x L slot; its ``(height, width)`` says which part of the slot is image;
- the evaluation **crop** is the standard one (:func:`resize_center_crop`): above 64 px the
  shorter side is resized to round(S / f) and the centre S x S kept (f = 0.875: 256 -> 224, as
  the SimCLR paper, torchvision, timm and FFCV evaluate); at 64 px and below the shorter side
  is resized to S (no border is cut from tiny images).

A JPEG that is reduced by 2x or more is decoded at a reduced scale first (PIL's ``draft``: the
JPEG decoder's own 1/2, 1/4, 1/8 DCT scaling, which never goes below the size asked for), then
resized exactly: a 10000 x 10000 photo never needs its 300 MB of full-size pixels. Other formats
are decoded whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

SMALL_SIZE = 64  # at and below: no border cut at evaluation (and the CIFAR stem, models.py)
CROP_FRACTION = 0.875  # the evaluation crop's side over the resized shorter side: 224 / 256
# The most pixels a decoding worker decodes of one image: a decode peaks at ~17 bytes per pixel,
# 1.1 GB at 8000 x 8000 (bench/RESULTS.md); a larger image is skipped, naming this limit.
MAX_DECODE_PIXELS = 8000 * 8000
# A 16-bit PNG has pixel values up to 65535; PIL's convert("RGB") would clip them to 255.
_WIDE_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


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


def resize_side(size: int, crop_fraction: float) -> int:
    """The side the shorter side is resized to before the centre crop at ``size``:
    ``round(size / crop_fraction)`` above 64 px, ``size`` at 64 px and below."""
    return size if size <= SMALL_SIZE else round(size / crop_fraction)


def _short_side_to(height: int, width: int, side: int) -> tuple[int, int]:
    """``(h, w)`` with the shorter side at ``side``, the longer one as torchvision's ``Resize``
    computes it (truncated)."""
    if height <= width:
        return side, int(side * width / height)
    return int(side * height / width), side


def _resize(arr: np.ndarray, height: int, width: int) -> np.ndarray:
    """``(h, w, 3) uint8`` resized to ``(height, width)``: PIL's antialiased bilinear, as
    torchvision's ``Resize`` on a PIL image; an array already that size is returned as it is."""
    if arr.shape[:2] == (height, width):
        return arr
    img = Image.fromarray(arr).resize((width, height), Image.BILINEAR, reducing_gap=None)
    return np.asarray(img)


def _center_crop(arr: np.ndarray, size: int) -> np.ndarray:
    """The centre ``size x size`` of ``(h, w, 3)``, offsets as torchvision's ``CenterCrop``."""
    h, w = arr.shape[:2]
    if h == size and w == size:
        return arr
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return arr[top:top + size, left:left + size]


def resize_center_crop(arr: np.ndarray, size: int, crop_fraction: float = 1.0) -> np.ndarray:
    """``(H, W, 3) uint8`` -> ``(size, size, 3)``, the evaluation crop: the shorter side resized
    to :func:`resize_side` (antialiased bilinear), then the centre square; what torchvision's
    ``Resize(resize_side(size, f))`` + ``CenterCrop(size)`` make of a PIL image. Square images
    already at ``size`` (at 64 px and below, or with ``crop_fraction`` 1) are returned as is.
    """
    h, w = arr.shape[:2]
    return _center_crop(_resize(arr, *_short_side_to(h, w, resize_side(size, crop_fraction))),
                        size)


def frame_size(height: int, width: int, side: int) -> tuple[int, int]:
    """``(h, w)`` of a ``height x width`` image in a training frame of ``side``: the longer side
    reduced to ``side`` (aspect ratio kept, each side at least 1 px), never enlarged."""
    scale = side / max(height, width)
    if scale >= 1:
        return height, width
    return max(1, round(height * scale)), max(1, round(width * scale))


@dataclass(frozen=True)
class Layout:
    """How a split's images are stored: each row a ``(3, side, side)`` uint8 slot.

    ``kind`` "frame" (training): the whole image reduced to :func:`frame_size`, at the top-left
    of the slot, zeros elsewhere. ``kind`` "crop" (evaluation): :func:`resize_center_crop` at
    ``side`` with ``crop_fraction``, filling the slot. Build them with :meth:`frame` and
    :meth:`crop`.
    """

    kind: str
    side: int
    crop_fraction: float = 1.0

    @classmethod
    def frame(cls, side: int) -> Layout:
        return cls("frame", side)

    @classmethod
    def crop(cls, side: int, crop_fraction: float = CROP_FRACTION) -> Layout:
        # At 64 px and below the fraction changes nothing: one form, one cache key.
        return cls("crop", side, 1.0 if side <= SMALL_SIZE else float(crop_fraction))

    @property
    def key(self) -> str:
        """What the stored pixels depend on, for the decoded cache's key."""
        if self.kind == "frame":
            return f"frame-{self.side}"
        return f"crop-{self.side}-{self.crop_fraction!r}"

    def target(self, height: int, width: int) -> tuple[int, int]:
        """``(h, w)`` a ``height x width`` image is resized to (before the crop, for "crop")."""
        if self.kind == "frame":
            return frame_size(height, width, self.side)
        return _short_side_to(height, width, resize_side(self.side, self.crop_fraction))

    def fit(self, arr: np.ndarray, target: tuple[int, int]) -> np.ndarray:
        """``(H, W, 3) uint8`` (the image, or a reduced decode of it) in this form: resized to
        ``target`` (from :meth:`target` on the image's full size), cropped for "crop"."""
        arr = _resize(arr, *target)
        return arr if self.kind == "frame" else _center_crop(arr, self.side)


class ImageTooLarge(ValueError):
    """An image that would decode to more than :data:`MAX_DECODE_PIXELS` pixels: skipped (or
    named, under ``--bad-images error``) before any pixel of it is decoded."""


def decode_image(img: Image.Image, layout: Layout) -> np.ndarray:
    """An opened (not yet loaded) image -> ``(h, w, 3) uint8`` in ``layout``'s form.

    A JPEG reduced by 2x or more on both sides is decoded at the largest DCT scale that stays
    at or above the target (``draft``); the exact resize then finishes the job. An image that
    would still decode to more than :data:`MAX_DECODE_PIXELS` raises :class:`ImageTooLarge`.
    """
    width, height = img.size  # as stored in the file: EXIF may turn it by 90 degrees
    th, tw = layout.target(height, width)
    if img.format == "JPEG" and 2 * th <= height and 2 * tw <= width:
        img.draft(None, (tw, th))
    reduced = img.size
    if reduced[0] * reduced[1] > MAX_DECODE_PIXELS:
        raise ImageTooLarge(f"{width}x{height} pixels, more than the "
                            f"{MAX_DECODE_PIXELS / 1e6:.0f} megapixels decoded per image (to "
                            "bound each decoding process's memory); downscale it to keep it")
    arr = to_rgb_array(img)
    if arr.shape[:2] != (reduced[1], reduced[0]):  # EXIF turned it: so does the target
        th, tw = tw, th
    return layout.fit(arr, (th, tw))


def chosen_crop_fraction(given: float | None, meta: dict | None = None) -> float:
    """The evaluation crop's fraction: ``given`` (``--crop-fraction``), else the one a run
    recorded in its metadata ``meta``, else :data:`CROP_FRACTION`."""
    if given is not None:
        return float(given)
    return float((meta or {}).get("crop_fraction", CROP_FRACTION))
