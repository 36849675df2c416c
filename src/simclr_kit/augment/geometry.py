"""Geometric ops: random resized crop (to the output size) and horizontal flip.

The crop is torchvision's RandomResizedCrop: an integer box drawn as ``get_params`` does, resized
with the antialiased bilinear weights of PyTorch's ``interpolate(..., antialias=True)``, as two
batched matmuls. The flip is folded into the crop's horizontal weights (exact and free).

Each sample's box is drawn over its own image: a training frame (data/pixels.py) fills only the
top-left ``(height, width)`` of its slot, so scale and ratio are relative to that image's own
area and shape, as torchvision's RandomResizedCrop on the original photo, with its central
fallback per sample. The box lies inside the image and the resampling weights drop every tap
outside the box, so the padding around a frame never reaches a view.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from simclr_kit.augment.op import Frame, Op
from simclr_kit.config import AugmentConfig

_TRIES = 10  # torchvision's RandomResizedCrop makes 10 draws before a central crop
# The crop's columns of its uniform draws: 10 areas, 10 log-ratios, then top and left.
_AREA, _LOGR, _TOP, _LEFT = 0, _TRIES, 2 * _TRIES, 2 * _TRIES + 1


def _sample_crop(u: Tensor, height: Tensor, width: Tensor, cfg: AugmentConfig) -> Tensor:
    """torchvision's RandomResizedCrop.get_params, vectorised: ``u (N, 22)`` -> ``(N, 4)``.

    ``height, width: (N,) int64``: each sample's own image size. Rows are integer boxes (top,
    left, height, width) inside that image. The ten rejection draws are made at once and the
    first valid one is kept; with none valid, torchvision's central fallback crop. Float64 keeps
    the rounding to integer sides the same on every device.
    """
    u64 = u.to(torch.float64)
    height, width = height[:, None], width[:, None]  # (N, 1): against the N x 10 draws
    span = cfg.crop_scale_max - cfg.crop_scale_min
    area = (height * width).to(torch.float64) * (cfg.crop_scale_min
                                                  + span * u64[:, _AREA:_AREA + _TRIES])
    lo, hi = math.log(cfg.crop_ratio_min), math.log(cfg.crop_ratio_max)
    aspect = torch.exp(lo + (hi - lo) * u64[:, _LOGR:_LOGR + _TRIES])
    w = torch.round(torch.sqrt(area * aspect)).to(torch.int64)
    h = torch.round(torch.sqrt(area / aspect)).to(torch.int64)
    valid = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = valid.to(torch.uint8).argmax(dim=1, keepdim=True)
    found = valid.any(dim=1)
    height, width = height[:, 0], width[:, 0]
    fh, fw = _fallback_box(height, width, cfg)
    h = torch.where(found, h.gather(1, first)[:, 0], fh)
    w = torch.where(found, w.gather(1, first)[:, 0], fw)
    top = torch.where(found, (u64[:, _TOP] * (height - h + 1)).to(torch.int64), (height - fh) // 2)
    left = torch.where(found, (u64[:, _LEFT] * (width - w + 1)).to(torch.int64), (width - fw) // 2)
    return torch.stack([top, left, h, w], dim=1)


def _fallback_box(height: Tensor, width: Tensor, cfg: AugmentConfig) -> tuple[Tensor, Tensor]:
    """``(h, w)``, each ``(N,) int64``, of torchvision's central fallback per sample: the whole
    image clipped to the ratio range (float64, rounded half to even as Python's ``round``)."""
    h64, w64 = height.to(torch.float64), width.to(torch.float64)
    in_ratio = w64 / h64
    narrow, wide = in_ratio < cfg.crop_ratio_min, in_ratio > cfg.crop_ratio_max
    fh = torch.where(narrow, torch.round(w64 / cfg.crop_ratio_min).to(torch.int64), height)
    fw = torch.where(wide, torch.round(h64 * cfg.crop_ratio_max).to(torch.int64), width)
    return fh, fw


def frame_sizes(frame: Frame, n: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Each of ``n`` samples' own ``(height, width)``, two ``(n,) int64``: ``frame.sizes``, or
    the whole input when it has none."""
    if frame.sizes is None:
        full = torch.tensor([frame.height, frame.width], dtype=torch.int64, device=device)
        return full[0].expand(n), full[1].expand(n)
    sizes = frame.sizes.to(device=device, dtype=torch.int64)
    return sizes[:, 0], sizes[:, 1]


def _resize_weights(start: Tensor, length: Tensor, in_size: int, out_size: int) -> Tensor:
    """Antialiased bilinear resampling matrices for integer boxes along one axis: ``(N, out, in)``.

    The weights of PyTorch's ``interpolate(mode="bilinear", antialias=True, align_corners=False)``
    on the cropped box: a triangle filter widened by the scale when shrinking, taps outside the box
    dropped and the rest renormalised (which is edge clamping when enlarging).
    """
    dev = start.device
    size = length.to(torch.float32)[:, None, None]
    scale = size / out_size
    centre = scale * (torch.arange(out_size, device=dev, dtype=torch.float32)[None, :, None] + 0.5)
    pos = torch.arange(in_size, device=dev)[None, None, :] - start[:, None, None]
    pos = pos.to(torch.float32) + 0.5  # pixel centres in box coordinates
    weight = (1.0 - (pos - centre).abs_() / scale.clamp(min=1.0)).clamp_(min=0.0)
    weight = weight.mul_((pos > 0) & (pos < size))
    return weight.div_(weight.sum(dim=2, keepdim=True))


def crop_resize(images: Tensor, box: Tensor, flip: Tensor | None, size: int) -> Tensor:
    """Crop integer boxes, resize to ``size`` and flip: uint8 ``(N,3,H,W)`` -> float ``(N,3,S,S)``.

    Separable resampling as two batched matmuls covering every sample's box at once (gathering the
    few non-zero taps instead is slower on CPU, and no faster on GPU for working-size images). The
    flip reverses the horizontal weight rows; the 1/255 scale is folded into them, so the matmul
    sees raw 0-255 values, exact even in TF32. ``flip (N,)`` bool, or None for no flips.
    """
    n, c, height, width = images.shape
    wy = _resize_weights(box[:, 0], box[:, 2], height, size)
    wx = _resize_weights(box[:, 1], box[:, 3], width, size)
    if flip is not None:
        wx = torch.where(flip[:, None, None], wx.flip(1), wx)
    wx = wx.mul_(1.0 / 255.0)
    x = images.to(torch.float32, memory_format=torch.contiguous_format).view(n, c * height, width)
    x = torch.bmm(x, wx.transpose(1, 2))
    # Channels folded into the batch keep both products plain bmm calls, with no transposed copies.
    x = torch.bmm(wy.repeat_interleave(c, dim=0), x.view(n * c, height, size))
    return x.view(n, c, size, size)


class Crop(Op):
    """Random resized crop to the output size; params ``crop (N, 4)`` int64 boxes (top, left,
    height, width), each inside its sample's own image (``frame.sizes``). Always on: it is also
    the step from uint8 ``(N, 3, H, W)`` to float32 ``(N, 3, S, S)``, and it applies the
    ``flip`` flags (``Flip``) in its resampling weights."""

    name, slots, switch = "crop", 2 * _TRIES + 2, None

    def sample(self, u: Tensor, cfg: AugmentConfig, frame: Frame) -> dict[str, Tensor]:
        return {"crop": _sample_crop(u, *frame_sizes(frame, len(u), u.device), cfg)}

    def apply(self, x: Tensor, p: dict[str, Tensor], cfg: AugmentConfig, frame: Frame) -> Tensor:
        return crop_resize(x, p["crop"], p.get("flip"), frame.size)  # no flip op: no flips


class Flip(Op):
    """Horizontal flip with probability ``flip_p``; params ``flip (N,)`` bool.

    The crop applies it, by reversing its horizontal resampling weights, so ``apply`` has nothing
    left to do.
    """

    name, slots, switch = "flip", 1, "flip_p"

    def sample(self, u: Tensor, cfg: AugmentConfig, frame: Frame) -> dict[str, Tensor]:
        return {"flip": u[:, 0] < cfg.flip_p}

    def apply(self, x: Tensor, p: dict[str, Tensor], cfg: AugmentConfig, frame: Frame) -> Tensor:
        return x
