"""Batched SimCLR views on the training device, with per-sample random parameters.

The recipe is SimCLR's (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual
Representations", appendix A): random resized crop (area 0.08-1, aspect 3/4-4/3) back to the working
size, horizontal flip, colour jitter (brightness, contrast, saturation, hue, in a random order) with
probability 0.8, grayscale with probability 0.2, Gaussian blur (sigma 0.1-2, kernel 10% of the side)
with probability 0.5, then normalisation; BYOL's solarize is optional.

Every operation reproduces ``torchvision.transforms.v2.functional`` on float images: the crop is an
integer box (as RandomResizedCrop draws) resized with the antialiased bilinear weights of PyTorch's
``interpolate(..., antialias=True)``, as two batched matmuls; colour runs in float32, without the
uint8 rounding a PIL pipeline adds between steps. The only differences are float32 rounding (max
abs error ~2e-6 on the [0, 1] scale; ~1e-3 if matmuls are allowed TF32).

Randomness is a counter-based hash of (seed, epoch, sample index, view, slot) in int64 tensor ops on
the images' device, so a sample's two views in an epoch do not depend on the batch size, the order
within the batch, the device or the number of processes. (torchvision's v2 transforms applied to a
batch draw one setting for the whole batch, pytorch/vision#8484; here every sample draws its own.)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor
from torch.nn import functional as F

from simclr_kit.config import AugmentConfig

_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15  # splitmix64 increment: odd, 2^64 / golden ratio
_SLOT_STEP = 0xD1B54A32D192ED03
_MIX1, _MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB  # splitmix64 finaliser constants
_LUMA = (0.2989, 0.587, 0.114)  # ITU-R 601 weights, as torchvision's rgb_to_grayscale

# Fixed columns of the uniform draws per (sample, view), so a parameter never shifts to another.
_TRIES = 10  # torchvision's RandomResizedCrop makes 10 draws before a central crop
_AREA, _LOGR, _TOP, _LEFT = 0, _TRIES, 2 * _TRIES, 2 * _TRIES + 1
_FLIP, _JITTER, _FACTORS, _ORDER = 2 * _TRIES + 2, 2 * _TRIES + 3, 2 * _TRIES + 4, 2 * _TRIES + 8
_GRAY, _BLUR, _SIGMA, _SOLAR = 2 * _TRIES + 12, 2 * _TRIES + 13, 2 * _TRIES + 14, 2 * _TRIES + 15
_SLOTS = 2 * _TRIES + 16

BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3  # op ids in ``params["order"]``
_CPU_CHUNK_PIXELS = 128 * 32 * 32  # output pixels per CPU chunk: 0.5 MB per float plane


def _signed(value: int) -> int:
    return (value & _M64) - (1 << 64) if value & (1 << 63) else value & _M64


def _mix_int(value: int) -> int:
    """splitmix64 finaliser on a Python int: the host-side (seed, epoch, view) part of the key."""
    value = ((value ^ (value >> 30)) * _MIX1) & _M64
    value = ((value ^ (value >> 27)) * _MIX2) & _M64
    return value ^ (value >> 31)


def _srl(x: Tensor, shift: int) -> Tensor:
    # torch's >> on int64 is arithmetic; the mixer needs a logical shift to stay a bijection.
    return (x >> shift) & ((1 << (64 - shift)) - 1)


def _mix(x: Tensor) -> Tensor:
    """splitmix64 finaliser on an int64 tensor; the multiplications wrap modulo 2^64."""
    x = (x ^ _srl(x, 30)) * _signed(_MIX1)
    x = (x ^ _srl(x, 27)) * _signed(_MIX2)
    return x ^ _srl(x, 31)


def keyed_uniforms(indices: Tensor, seed: int, epoch: int, views: Sequence[int],
                   slots: int) -> Tensor:
    """Uniform floats in [0, 1) keyed by (seed, epoch, index, view, slot).

    ``indices (N,)`` -> ``(len(views) * N, slots)``, the rows of each view in turn. A pure function
    of the key (no generator state), so every batching and device gives the same numbers.
    """
    seed_key = _mix_int((seed * _GOLDEN + 1) & _M64)
    epoch_key = _mix_int((seed_key + (epoch + 1) * _GOLDEN) & _M64)
    ids = indices.to(torch.int64) * _signed(_GOLDEN)
    states = [ids + _signed(_mix_int((epoch_key + (v + 1) * _GOLDEN) & _M64)) for v in views]
    state = _mix(torch.cat(states) if len(states) > 1 else states[0])
    slot = torch.arange(1, slots + 1, device=indices.device, dtype=torch.int64)
    bits = _mix(state[:, None] + slot * _signed(_SLOT_STEP))
    # The top 24 bits convert to float32 exactly: identical floats on every device.
    return _srl(bits, 40).to(torch.float32) * 2.0**-24


def _sample_crop(u: Tensor, height: int, width: int, cfg: AugmentConfig) -> Tensor:
    """torchvision's RandomResizedCrop.get_params, vectorised: ``u (N, _SLOTS)`` -> ``(N, 4)``.

    Rows are integer boxes (top, left, height, width). The ten rejection draws are made at once and
    the first valid one is kept; with none valid, torchvision's central fallback crop. Float64 keeps
    the rounding to integer sides the same on every device.
    """
    u64 = u.to(torch.float64)
    span = cfg.crop_scale_max - cfg.crop_scale_min
    area = height * width * (cfg.crop_scale_min + span * u64[:, _AREA:_AREA + _TRIES])
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
    top = torch.where(found, (u64[:, _TOP] * (height - h + 1)).to(torch.int64), (height - fh) // 2)
    left = torch.where(found, (u64[:, _LEFT] * (width - w + 1)).to(torch.int64), (width - fw) // 2)
    return torch.stack([top, left, h, w], dim=1)


def _fallback_box(height: int, width: int, cfg: AugmentConfig) -> tuple[int, int]:
    """(h, w) of torchvision's central fallback: the whole image clipped to the ratio range."""
    in_ratio = width / height
    if in_ratio < cfg.crop_ratio_min:
        return int(round(width / cfg.crop_ratio_min)), width
    if in_ratio > cfg.crop_ratio_max:
        return height, int(round(height * cfg.crop_ratio_max))
    return height, width


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


def _crop_resize(images: Tensor, box: Tensor, flip: Tensor, size: int) -> Tensor:
    """Crop integer boxes, resize to ``size`` and flip: uint8 ``(N,3,H,W)`` -> float ``(N,3,S,S)``.

    Separable resampling as two batched matmuls covering every sample's box at once (gathering the
    few non-zero taps instead is slower on CPU, and no faster on GPU for working-size images). The
    flip reverses the horizontal weight rows; the 1/255 scale is folded into them, so the matmul
    sees raw 0-255 values, exact even in TF32.
    """
    n, c, height, width = images.shape
    wy = _resize_weights(box[:, 0], box[:, 2], height, size)
    wx = _resize_weights(box[:, 1], box[:, 3], width, size)
    wx = torch.where(flip[:, None, None], wx.flip(1), wx).mul_(1.0 / 255.0)
    x = images.to(torch.float32, memory_format=torch.contiguous_format).view(n, c * height, width)
    x = torch.bmm(x, wx.transpose(1, 2))
    # Channels folded into the batch keep both products plain bmm calls, with no transposed copies.
    x = torch.bmm(wy.repeat_interleave(c, dim=0), x.view(n * c, height, size))
    return x.view(n, c, size, size)


def _gray(x: Tensor) -> Tensor:
    """Luma of RGB images ``(N, 3, P)`` -> ``(N, 1, P)``, torchvision's rgb_to_grayscale."""
    r, g, b = x.unbind(1)
    return r.mul(_LUMA[0]).add_(g, alpha=_LUMA[1]).add_(b, alpha=_LUMA[2]).unsqueeze(1)


def _blend_(x: Tensor, factor: Tensor, per_pixel: Tensor, constant: Tensor) -> Tensor:
    """One brightness, contrast or saturation step per sample, in place on ``x (N, 3, P)``.

    torchvision's ``_blend(image, ref, f) = clamp(f * image + (1 - f) * ref, 0, 1)``, with ref 0
    (brightness), the mean luma (contrast) or the luma (saturation): here ``(1 - f) * ref`` is
    ``per_pixel * luma + constant * mean luma``, coefficients ``(N, 1, 1)``. f = 1 is an identity.
    """
    gray = _gray(x)
    ref = gray.mean(dim=2, keepdim=True).mul_(constant)
    return x.mul_(factor).add_(gray.mul_(per_pixel).add_(ref)).clamp_(0.0, 1.0)


def _adjust_hue_(x: Tensor, shift: Tensor, on: Tensor) -> Tensor:
    """torchvision's adjust_hue where ``on``, in place: ``x (N, 3, P)`` in [0, 1], ``shift (N,)``.

    RGB -> HSV, hue + shift (mod 1), -> RGB. A hue rotation keeps the value (max) and the chroma
    C (max - min), so each channel is rebuilt in closed form as ``min + C * clamp(d - 1, 0, 1)``,
    d the distance of ``6 h + n_c - 2`` (n = 5, 3, 1 for r, g, b) to the nearest multiple of 6.
    Masks go through ``lerp``: exact at 0 and 1, and far faster than ``where`` on CPU.
    """
    r, g, b = x.unbind(1)
    top = torch.maximum(torch.maximum(r, g), b)
    bottom = torch.minimum(torch.minimum(r, g), b)
    chroma = top - bottom
    is_r = (top == r).to(x.dtype)
    is_g = (top == g).to(x.dtype)
    # torchvision's sextants, with its precedence r, then g, then b; grey pixels (C = 0) get hue 0.
    hue6 = torch.lerp(torch.lerp(r - g, b - r, is_g), g - b, is_r)
    hue6 = hue6.div_(chroma.clamp(min=torch.finfo(x.dtype).tiny))
    hue6 = hue6.add_(is_g.mul_(-2.0).add_(4.0).mul_(is_r.neg_().add_(1.0)))
    hue6 = hue6.add_(6.0 * shift[:, None])
    hue6 = hue6.sub_(torch.floor(hue6 * (1.0 / 6.0)).mul_(6.0))  # into [0, 6)
    offset = torch.arange(3.0, -2.0, -2.0, device=x.device, dtype=x.dtype)[None, :, None]
    # y = 6 h + n - 2 lies in [-1, 9): its distance to the nearest multiple of 6 is |3 - ||y| - 3||.
    ramp = (hue6[:, None, :] + offset).abs_().sub_(3.0).abs_().sub_(3.0).abs_()
    rgb = ramp.sub_(1.0).clamp_(0.0, 1.0).mul_(chroma[:, None, :]).add_(bottom[:, None, :])
    return x.lerp_(rgb, on.to(x.dtype)[:, None, None])


def _color_jitter_(x: Tensor, params: dict[str, Tensor], hue: bool) -> Tensor:
    """ColorJitter, random order per sample, without per-sample branches; in place on ``(N, 3, P)``.

    Hue, the costly op, runs once for the whole batch. The blends a sample applies before its hue
    fill three slots before the hue step (right-aligned), those after it three slots after (left-
    aligned); unused slots have factor 1, an identity. So all 24 orders share one schedule.
    """
    on, order = params["jitter"], params["order"]
    is_hue = (order == HUE).to(torch.uint8)
    hue_pos = is_hue.argmax(dim=1, keepdim=True)
    blends = order.gather(1, torch.sort(is_hue, dim=1, stable=True).indices[:, :3])
    j = torch.arange(3, device=x.device)[None, :]
    slot = torch.cat([j - 3 + hue_pos, j + hue_pos], dim=1)  # position in ``blends`` per slot
    ops = blends.gather(1, slot.clamp(0, 2))
    factors = torch.stack([params["brightness"], params["contrast"], params["saturation"]], 1)
    used = (slot >= 0) & (slot < 3) & on[:, None]
    factor = torch.where(used, factors.gather(1, ops), 1.0)[:, :, None, None]
    rest = 1.0 - factor
    coefs = zip(factor.unbind(1), (rest * (ops == SATURATION)[:, :, None, None]).unbind(1),
                (rest * (ops == CONTRAST)[:, :, None, None]).unbind(1))
    for k, (f, per_pixel, constant) in enumerate(coefs):
        if k == 3 and hue:
            x = _adjust_hue_(x, params["hue"], on)
        x = _blend_(x, f, per_pixel, constant)
    return x


def blur_kernel_size(image_size: int) -> int:
    """Odd kernel side of ~10% of the image side (SimCLR appendix A): 23 at 224 px, 3 at 32 px."""
    return max(3, int(0.1 * image_size) // 2 * 2 + 1)


def _gaussian_blur(x: Tensor, sigma: Tensor, on: Tensor, ksize: int) -> Tensor:
    """Per-sample separable Gaussian blur with torchvision's reflect padding: ``(N, 3, S, S)``.

    Two depthwise convolutions, one group per sample and channel; samples without blur get a delta
    kernel, an exact identity.
    """
    n, c = x.shape[:2]
    t = torch.arange(ksize, device=x.device, dtype=torch.float32) - ksize // 2
    kernel = torch.softmax((t[None, :] / sigma[:, None]).square().mul_(-0.5), dim=1)
    kernel = torch.where(on[:, None], kernel, (t == 0).to(torch.float32)).repeat_interleave(c, 0)
    pad = ksize // 2
    flat = F.pad(x, (pad, pad, pad, pad), mode="reflect").flatten(0, 1)[None]
    flat = F.conv2d(flat, kernel[:, None, None, :], groups=n * c)
    return F.conv2d(flat, kernel[:, None, :, None], groups=n * c).view(x.shape)


def _normalize_(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """``(x - mean) / std`` per channel, in place on float ``(N, 3, H, W)``.

    Python scalars, not tensors: building small tensors on a GPU would sync with the host.
    """
    for c in range(3):
        x[:, c].sub_(mean[c]).div_(std[c])
    return x


def _on_cpu_chunks(work: Callable[[slice], None], n: int, size: int) -> None:
    """Run ``work`` on slices of the batch of ``n`` views of side ``size``, on worker threads.

    On CPU, fresh full-batch buffers cost more (page faults) than the arithmetic filling them, and
    per-op OpenMP barriers stall whenever another process holds a core; cache-sized chunks on one
    thread each avoid both. Samples never interact, so the results do not depend on the chunking.
    """
    chunk = max(1, _CPU_CHUNK_PIXELS // (size * size))

    def run(start: int) -> None:
        torch.set_num_threads(1)  # this worker thread only; the caller's setting is untouched
        work(slice(start, start + chunk))

    starts = range(0, n, chunk)
    with ThreadPoolExecutor(max(1, min(torch.get_num_threads(), len(starts)))) as pool:
        list(pool.map(run, starts))


class SimCLRAugment:
    """Two SimCLR views per image, computed in batches on the images' device.

    Args:
        config: the augmentation settings; size-dependent ``None`` fields are resolved here with
            ``config.resolved(image_size)``.
        image_size: side S of the square output views, in pixels.
        mean, std: per-channel normalisation on the [0, 1] scale (see :func:`channel_stats`).
        seed: root of the keyed randomness; with the epoch and a sample's index it fixes the
            sample's views, whatever the batching, device or number of processes.
    """

    def __init__(self, config: AugmentConfig, image_size: int, mean: Sequence[float],
                 std: Sequence[float], seed: int = 0) -> None:
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1 pixel, got {image_size}")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std need 3 values each, std > 0; got {mean}, {std}")
        self.config = config.resolved(image_size)
        self.image_size = image_size
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.seed = int(seed)
        self.blur_kernel_size = blur_kernel_size(image_size)

    def __call__(self, images: Tensor, indices: Tensor, epoch: int) -> tuple[Tensor, Tensor]:
        """Both views of a batch: uint8 ``(B, 3, H, W)`` -> two float32 ``(B, 3, S, S)``.

        ``indices (B,)`` int64 are the samples' dataset row numbers, the key of their randomness.
        """
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images (B, 3, H, W), got {images.dtype} "
                             f"{tuple(images.shape)}")
        if indices.shape != images.shape[:1]:
            raise ValueError(f"expected indices of shape ({len(images)},), "
                             f"got {tuple(indices.shape)}")
        indices = indices.to(images.device, non_blocking=True)  # staged: no wait on the GPU
        n, size = len(images), self.image_size
        if images.device.type != "cpu":
            both = self._views(images, indices, epoch)
            return both[:n], both[n:]
        first, second = (torch.empty((n, 3, size, size)) for _ in range(2))

        def chunk(part: slice) -> None:
            both = self._views(images[part], indices[part], epoch)
            first[part], second[part] = both.chunk(2)

        _on_cpu_chunks(chunk, n, size)
        return first, second

    def _views(self, images: Tensor, indices: Tensor, epoch: int) -> Tensor:
        """Views 0 and 1 stacked, ``(2B, 3, S, S)``: one pass halves the launches per view."""
        params = self._sample(indices, epoch, (0, 1), *images.shape[2:])
        return self._apply(torch.cat([images, images]), params)

    def sample_params(self, indices: Tensor, epoch: int, view: int, height: int,
                      width: int) -> dict[str, Tensor]:
        """Per-sample parameters of one view of ``(height, width)`` images, on indices' device.

        Returns ``crop (N, 4)`` int64 boxes (top, left, height, width); bool ``(N,)`` flags
        ``flip``, ``jitter``, ``grayscale``, ``blur``, ``solarize``; float32 ``(N,)`` factors
        ``brightness``, ``contrast``, ``saturation`` (uniform in torchvision's range
        [max(0, 1 - x), 1 + x]), ``hue`` ([-x, x]) and blur ``sigma``; ``order (N, 4)`` int64, the
        jitter ops (0 brightness, 1 contrast, 2 saturation, 3 hue) in the order they are applied.
        """
        return self._sample(indices, epoch, (view,), height, width)

    def _sample(self, indices: Tensor, epoch: int, views: tuple[int, ...], height: int,
                width: int) -> dict[str, Tensor]:
        cfg = self.config
        u = keyed_uniforms(indices, self.seed, epoch, views, _SLOTS)
        params = {"crop": _sample_crop(u, height, width, cfg), "flip": u[:, _FLIP] < cfg.flip_p,
                  "jitter": u[:, _JITTER] < cfg.jitter_p}
        for k, (name, x) in enumerate(zip(("brightness", "contrast", "saturation"), cfg.jitter)):
            lo = max(0.0, 1.0 - x)
            params[name] = lo + (1.0 + x - lo) * u[:, _FACTORS + k]
        params["hue"] = cfg.jitter[3] * (2.0 * u[:, _FACTORS + 3] - 1.0)
        params["order"] = torch.argsort(u[:, _ORDER:_ORDER + 4], dim=1, stable=True)
        params["grayscale"] = u[:, _GRAY] < cfg.grayscale_p
        params["blur"] = u[:, _BLUR] < (cfg.blur_p or 0.0)
        sigma_span = cfg.blur_sigma_max - cfg.blur_sigma_min
        params["sigma"] = cfg.blur_sigma_min + sigma_span * u[:, _SIGMA]
        params["solarize"] = u[:, _SOLAR] < cfg.solarize_p
        return params

    def apply(self, images: Tensor, params: dict[str, Tensor]) -> Tensor:
        """One view per image from parameters: uint8 ``(N, 3, H, W)`` -> float32 ``(N, 3, S, S)``.

        Deterministic given ``params`` (as from :meth:`sample_params`). Operations whose configured
        probability (or jitter range) is 0 are skipped, whatever their flags say.
        """
        p = {k: v.to(images.device) for k, v in params.items()}
        if images.device.type != "cpu":
            return self._apply(images, p)
        out = torch.empty((len(images), 3, self.image_size, self.image_size))

        def chunk(part: slice) -> None:
            out[part] = self._apply(images[part], {k: v[part] for k, v in p.items()})

        _on_cpu_chunks(chunk, len(images), self.image_size)
        return out

    def _apply(self, images: Tensor, p: dict[str, Tensor]) -> Tensor:
        cfg = self.config
        n, size = images.shape[0], self.image_size
        x = _crop_resize(images, p["crop"], p["flip"], size).view(n, 3, size * size)
        if cfg.jitter_p > 0 and any(cfg.jitter):
            x = _color_jitter_(x, p, hue=cfg.jitter[3] > 0)
        if cfg.grayscale_p > 0:
            x = x.lerp_(_gray(x), p["grayscale"].to(x.dtype)[:, None, None])
        x = x.view(n, 3, size, size)
        if cfg.blur_p:
            x = _gaussian_blur(x, p["sigma"], p["blur"], self.blur_kernel_size)
        if cfg.solarize_p > 0:
            # torchvision's solarize: invert the values at or above the threshold.
            x = torch.where(p["solarize"][:, None, None, None] & (x >= cfg.solarize_threshold),
                            1.0 - x, x)
        return _normalize_(x, self.mean, self.std)


def normalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Evaluation input: uint8 ``(B, 3, H, W)`` -> float32 ``(x/255 - mean) / std``, unaugmented."""
    return _normalize_(images.to(torch.float32).div_(255.0), mean, std)


def channel_stats(images: Tensor, batch_size: int = 4096
                  ) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Per-channel mean and (population) std of uint8 ``(N, 3, H, W)`` images on the [0, 1] scale.

    Chunks of ``batch_size`` images are counted into per-channel 256-bin histograms (exact), from
    which the moments follow in float64, the variance around the mean (no cancellation). Memory
    stays at one chunk and the result does not depend on ``batch_size``.
    """
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[0] == 0:
        raise ValueError(f"expected a non-empty (N, 3, H, W) batch, got {tuple(images.shape)}")
    counts = torch.zeros(3, 256, dtype=torch.float64, device=images.device)
    for chunk in images.split(batch_size):
        for c in range(3):
            counts[c] += torch.bincount(chunk[:, c].reshape(-1), minlength=256).to(torch.float64)
    values = torch.arange(256, dtype=torch.float64, device=images.device) / 255.0
    total = counts.sum(dim=1)
    mean = (counts * values).sum(dim=1) / total
    std = ((counts * (values - mean[:, None]).square()).sum(dim=1) / total).sqrt()
    m, s = mean.tolist(), std.tolist()
    return (m[0], m[1], m[2]), (s[0], s[1], s[2])


def save_view_grid(images: Tensor, augment: SimCLRAugment, path: str | Path,
                   epoch: int = 0) -> None:
    """Write a PNG with one row per image: the original, view 1 and view 2 (de-normalised).

    ``images``: uint8 ``(B, 3, H, W)``; their sample indices are taken as 0..B-1.
    """
    from matplotlib.figure import Figure  # lazily: plotting is not on the training path

    images = images.cpu()
    views = augment(images, torch.arange(len(images)), epoch)
    mean = torch.tensor(augment.mean)[:, None, None]
    std = torch.tensor(augment.std)[:, None, None]
    fig = Figure(figsize=(3 * 1.5, len(images) * 1.5))
    axes = fig.subplots(len(images), 3, squeeze=False)
    for row, image in enumerate(images):
        cells = [image.float() / 255.0] + [(v[row] * std + mean).clamp(0.0, 1.0) for v in views]
        for ax, cell, title in zip(axes[row], cells, ("original", "view 1", "view 2")):
            ax.imshow(cell.permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_axis_off()
            if row == 0:
                ax.set_title(title, fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
