"""Batched SimCLR views on the training device, with per-sample random parameters.

The view recipe is that of SimCLR (Chen et al. 2020, "A Simple Framework for Contrastive Learning
of Visual Representations", appendix A): random resized crop (scale 0.08-1, aspect 3/4-4/3) resized
back to the working size, horizontal flip, colour jitter (brightness, contrast, saturation, hue in
a random order) with probability 0.8, grayscale with probability 0.2, Gaussian blur (sigma 0.1-2,
kernel 10% of the image side) with probability 0.5, then normalisation; BYOL's solarize is optional.

Each operation reproduces ``torchvision.transforms.v2.functional`` on float images: the crop is an
integer box resized with antialiased bilinear weights (the same weights as PyTorch's
``interpolate(..., antialias=True)``), applied as two batched matrix products; colour operations run
in float32 without the uint8 rounding a PIL pipeline adds between steps. Differences from torchvision
are float32 rounding (max abs error ~1e-6 on the [0, 1] scale; under TF32 matmuls ~1e-3).

Randomness is a counter-based hash of (seed, epoch, sample index, view, slot) computed with int64
tensor ops on the images' device, so a sample's two views in an epoch do not depend on the batch
size, the order within the batch, the device or the number of processes. torchvision's v2
transforms applied to a batch draw one setting for the whole batch (pytorch/vision#8484); here every
sample draws its own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor
from torch.nn import functional as F

from simclr_kit.config import AugmentConfig

_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15  # splitmix64 increment (odd, 2^64 / golden ratio)
_SLOT_STEP = 0xD1B54A32D192ED03
_MIX1, _MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB  # splitmix64 finaliser constants
_LUMA = (0.2989, 0.587, 0.114)  # ITU-R 601 weights, as torchvision's rgb_to_grayscale

# Column layout of the uniform draws per (sample, view); fixed so that params never shift.
_TRIES = 10  # torchvision's RandomResizedCrop rejection attempts before a central crop
_AREA, _LOGR, _TOP, _LEFT = 0, _TRIES, 2 * _TRIES, 2 * _TRIES + 1
_FLIP, _JITTER, _FACTORS, _ORDER = 2 * _TRIES + 2, 2 * _TRIES + 3, 2 * _TRIES + 4, 2 * _TRIES + 8
_GRAY, _BLUR, _SIGMA, _SOLAR = 2 * _TRIES + 12, 2 * _TRIES + 13, 2 * _TRIES + 14, 2 * _TRIES + 15
_SLOTS = 2 * _TRIES + 16

BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3  # op ids in ``params["order"]``


def _signed(value: int) -> int:
    value &= _M64
    return value - (1 << 64) if value >= 1 << 63 else value


def _mix_int(value: int) -> int:
    """splitmix64 finaliser on a Python int (host side, for the scalar part of the key)."""
    value = ((value ^ (value >> 30)) * _MIX1) & _M64
    value = ((value ^ (value >> 27)) * _MIX2) & _M64
    return value ^ (value >> 31)


def _srl(x: Tensor, shift: int) -> Tensor:
    # torch's >> on int64 is arithmetic; the mixer needs a logical shift to stay a bijection.
    return (x >> shift) & ((1 << (64 - shift)) - 1)


def _mix(x: Tensor) -> Tensor:
    """splitmix64 finaliser on an int64 tensor; multiplications wrap modulo 2^64."""
    x = (x ^ _srl(x, 30)) * _signed(_MIX1)
    x = (x ^ _srl(x, 27)) * _signed(_MIX2)
    return x ^ _srl(x, 31)


def keyed_uniforms(indices: Tensor, seed: int, epoch: int, view: int, slots: int) -> Tensor:
    """Uniform floats in [0, 1) keyed by (seed, epoch, index, view, slot): ``(N,)`` -> ``(N, slots)``.

    A pure function of the key (no generator state), so any batching yields the same numbers.
    """
    key = _mix_int((seed * _GOLDEN + 1) & _M64)
    key = _mix_int((key + (epoch + 1) * _GOLDEN) & _M64)
    key = _mix_int((key + (view + 1) * _GOLDEN) & _M64)
    state = _mix(indices.to(torch.int64) * _signed(_GOLDEN) + _signed(key))
    slot = torch.arange(1, slots + 1, device=indices.device, dtype=torch.int64)
    bits = _mix(state[:, None] + slot * _signed(_SLOT_STEP))
    # The top 24 bits convert to float32 exactly: the same floats on every device.
    return _srl(bits, 40).to(torch.float32) * 2.0**-24


def _sample_crop(u: Tensor, height: int, width: int, cfg: AugmentConfig) -> Tensor:
    """torchvision's RandomResizedCrop.get_params, vectorised: ``u (N, _SLOTS)`` -> ``(N, 4)``.

    Rows are integer boxes (top, left, height, width). All ten rejection draws are made at once and
    the first valid one is kept; without one, the central crop of torchvision's fallback is used.
    Float64 keeps the rounding to integer sides stable across devices.
    """
    u64 = u.to(torch.float64)
    area = height * width * (cfg.crop_scale_min + (cfg.crop_scale_max - cfg.crop_scale_min)
                             * u64[:, _AREA:_AREA + _TRIES])
    lo, hi = math.log(cfg.crop_ratio_min), math.log(cfg.crop_ratio_max)
    aspect = torch.exp(lo + (hi - lo) * u64[:, _LOGR:_LOGR + _TRIES])
    w = torch.round(torch.sqrt(area * aspect)).to(torch.int64)
    h = torch.round(torch.sqrt(area / aspect)).to(torch.int64)
    valid = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = valid.to(torch.uint8).argmax(dim=1, keepdim=True)
    found = valid.any(dim=1)
    fh, fw = _fallback_box(height, width, cfg)
    h = torch.where(found, h.gather(1, first)[:, 0], fh)
    w = torch.where(found, w.gather(1, first)[:, 0], fw)
    top = (u64[:, _TOP] * (height - h + 1)).floor().to(torch.int64)
    left = (u64[:, _LEFT] * (width - w + 1)).floor().to(torch.int64)
    top = torch.where(found, top, (height - fh) // 2)
    left = torch.where(found, left, (width - fw) // 2)
    return torch.stack([top, left, h, w], dim=1)


def _fallback_box(height: int, width: int, cfg: AugmentConfig) -> tuple[int, int]:
    """(h, w) of torchvision's central fallback crop: the whole image clipped to the ratio range."""
    in_ratio = width / height
    if in_ratio < cfg.crop_ratio_min:
        return int(round(width / cfg.crop_ratio_min)), width
    if in_ratio > cfg.crop_ratio_max:
        return height, int(round(height * cfg.crop_ratio_max))
    return height, width


def _resize_weights(start: Tensor, length: Tensor, in_size: int, out_size: int) -> Tensor:
    """Antialiased bilinear resampling matrices for boxes along one axis: ``(N, out, in)``.

    The weights of PyTorch's ``interpolate(mode="bilinear", antialias=True, align_corners=False)``
    applied to the cropped box: a triangle filter widened by the scale when shrinking, taps outside
    the box dropped and the rest renormalised (which is also edge clamping when enlarging).
    """
    dev = start.device
    size = length.to(torch.float32)[:, None, None]
    scale = size / out_size
    support = scale.clamp(min=1.0)
    centre = scale * (torch.arange(out_size, device=dev, dtype=torch.float32)[None, :, None] + 0.5)
    pos = torch.arange(in_size, device=dev)[None, None, :] - start[:, None, None]
    pos = pos.to(torch.float32) + 0.5
    weight = (1.0 - (pos - centre).abs() / support).clamp_(min=0.0)
    weight = weight * ((pos > 0) & (pos < size))
    return weight / weight.sum(dim=2, keepdim=True)


def _crop_resize(images: Tensor, box: Tensor, flip: Tensor, size: int) -> Tensor:
    """Crop integer boxes, resize to ``size`` and flip: uint8 ``(N,3,H,W)`` -> float ``(N,3,S,S)``.

    Separable resampling as two batched matmuls, so one kernel serves every sample's box; the
    flip is a reversal of the horizontal weight rows and the 1/255 scale is folded into them too
    (raw 0-255 values are exact even in TF32).
    """
    n, c, height, width = images.shape
    wy = _resize_weights(box[:, 0], box[:, 2], height, size)
    wx = _resize_weights(box[:, 1], box[:, 3], width, size)
    wx = torch.where(flip[:, None, None], wx.flip(1), wx) * (1.0 / 255.0)
    rows = torch.bmm(images.to(torch.float32).view(n, c * height, width), wx.transpose(1, 2))
    return torch.einsum("nsh,nchw->ncsw", wy, rows.view(n, c, height, size))


def _gray(x: Tensor) -> Tensor:
    """Luma of RGB images ``(N, 3, P)`` -> ``(N, 1, P)``, torchvision's rgb_to_grayscale."""
    r, g, b = x.unbind(1)
    return r.mul(_LUMA[0]).add_(g, alpha=_LUMA[1]).add_(b, alpha=_LUMA[2]).unsqueeze(1)


def _blend(x: Tensor, op: Tensor, factor: Tensor) -> Tensor:
    """One brightness/contrast/saturation step per sample, in place: ``x (N, 3, P)``.

    All three are torchvision's ``_blend(image, ref, f) = clamp(f * image + (1 - f) * ref)`` with
    ref 0 (brightness), the mean luma (contrast) or the per-pixel luma (saturation); ``factor``
    1 makes the step an exact identity, which is how inactive samples pass through.
    """
    gray = _gray(x)
    rest = (1.0 - factor)[:, None, None]
    per_pixel = rest * (op == SATURATION)[:, None, None]
    constant = rest * (op == CONTRAST)[:, None, None] * gray.mean(dim=2, keepdim=True)
    ref = torch.addcmul(constant, gray, per_pixel)
    return x.mul_(factor[:, None, None]).add_(ref).clamp_(0.0, 1.0)


def _adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    """torchvision's adjust_hue per sample: RGB -> HSV, hue + shift (mod 1), -> RGB.

    ``x (N, 3, P)`` in [0, 1], ``shift (N,)`` in [-0.5, 0.5]. Value (max) and chroma (max - min)
    are unchanged by a hue rotation, so RGB is rebuilt from them with the closed form
    ``c = V - C * clamp(min(k, 4 - k), 0, 1)``, ``k = (n_c + 6 h) mod 6``, n = (5, 3, 1).
    """
    r, g, b = x.unbind(1)
    top = x.amax(dim=1)
    chroma = top - x.amin(dim=1)
    divisor = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    # The sextant formulas of torchvision's _rgb_to_hsv, with its precedence r, then g, then b.
    h6 = torch.where(top == r, (g - b) / divisor,
                     torch.where(top == g, (b - r) / divisor + 2.0, (r - g) / divisor + 4.0))
    h6 = torch.remainder(h6.add_(6.0 * shift[:, None]), 6.0)
    n = torch.tensor([5.0, 3.0, 1.0], device=x.device)[None, :, None]
    k = torch.remainder(h6[:, None, :] + n, 6.0)
    ramp = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return torch.addcmul(top[:, None, :], chroma[:, None, :], ramp, value=-1.0)


def _color_jitter(x: Tensor, params: dict[str, Tensor], hue: bool) -> Tensor:
    """ColorJitter with a per-sample random order, without per-sample branches: ``(N, 3, P)``.

    Hue, the costly op, runs once for the whole batch; the blends a sample applies before it sit in
    three slots before the hue step (right-aligned) and those after it in three slots after, with
    unused slots at factor 1 (identity). Any of the 24 orders is thus one fixed schedule.
    """
    on = params["jitter"]
    order = params["order"]
    factors = torch.stack([params["brightness"], params["contrast"], params["saturation"]], 1)
    is_hue = order == HUE
    hue_pos = is_hue.to(torch.uint8).argmax(dim=1, keepdim=True)
    blend_cols = torch.sort(is_hue.to(torch.uint8), dim=1, stable=True).indices[:, :3]
    blends = order.gather(1, blend_cols)  # the three blend ops in application order
    j = torch.arange(3, device=x.device)[None, :]
    slot = torch.cat([j - 3 + hue_pos, j + hue_pos], dim=1)  # index into ``blends`` per slot
    used = (slot >= 0) & (slot < 3) & on[:, None]
    ops = blends.gather(1, slot.clamp(0, 2))
    slot_factor = torch.where(used, factors.gather(1, ops), torch.ones_like(factors[:, :1]))
    for k in range(3):
        x = _blend(x, ops[:, k], slot_factor[:, k])
    if hue:
        x = torch.where(on[:, None, None], _adjust_hue(x, params["hue"]), x)
    for k in range(3, 6):
        x = _blend(x, ops[:, k], slot_factor[:, k])
    return x


def blur_kernel_size(image_size: int) -> int:
    """Odd kernel of ~10% of the image side (SimCLR appendix A): 23 at 224 px, 3 at 32 px."""
    return max(3, int(0.1 * image_size) // 2 * 2 + 1)


def _gaussian_blur(x: Tensor, sigma: Tensor, on: Tensor, ksize: int) -> Tensor:
    """Per-sample separable Gaussian blur, torchvision's reflect padding: ``(N, 3, S, S)``.

    Two depthwise convolutions (one group per sample and channel); samples without blur get a
    delta kernel, an exact identity.
    """
    n, c, _, _ = x.shape
    t = torch.arange(ksize, device=x.device, dtype=torch.float32) - ksize // 2
    kernel = torch.softmax(-(t[None, :] / sigma[:, None]) ** 2 / 2.0, dim=1)
    delta = (t == 0).to(torch.float32)[None, :]
    kernel = torch.where(on[:, None], kernel, delta).repeat_interleave(c, dim=0)
    pad = ksize // 2
    flat = F.pad(x, (pad, pad, pad, pad), mode="reflect").flatten(0, 1)[None]
    flat = F.conv2d(flat, kernel[:, None, None, :], groups=n * c)
    flat = F.conv2d(flat, kernel[:, None, :, None], groups=n * c)
    return flat.view(x.shape)
