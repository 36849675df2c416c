"""Colour ops: colour jitter (brightness, contrast, saturation, hue; random order) and grayscale.

Each reproduces ``torchvision.transforms.v2.functional`` on float images, in float32 without the
uint8 rounding a PIL pipeline adds between steps.
"""

from __future__ import annotations

import torch
from torch import Tensor

from simclr_kit.augment.op import Frame, Op
from simclr_kit.config import AugmentConfig

_LUMA = (0.2989, 0.587, 0.114)  # ITU-R 601 weights, as torchvision's rgb_to_grayscale
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3  # op ids in ``params["order"]``


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


class ColorJitter(Op):
    """Colour jitter with probability ``jitter_p``, strength from ``jitter_strength``.

    Params: ``jitter (N,)`` bool; float32 ``(N,)`` factors ``brightness``, ``contrast``,
    ``saturation`` (uniform in torchvision's [max(0, 1 - x), 1 + x]) and ``hue`` ([-x, x]);
    ``order (N, 4)`` int64, the ids BRIGHTNESS..HUE in the order applied. Draws: the flag, the four
    factors, then four sort keys for the order.
    """

    name, slots, switch = "jitter", 9, "jitter_p"

    def active(self, cfg: AugmentConfig) -> bool:
        return cfg.jitter_p > 0 and any(cfg.jitter)

    def sample(self, u: Tensor, cfg: AugmentConfig, frame: Frame) -> dict[str, Tensor]:
        params = {"jitter": u[:, 0] < cfg.jitter_p}
        for k, (name, x) in enumerate(zip(("brightness", "contrast", "saturation"), cfg.jitter)):
            lo = max(0.0, 1.0 - x)
            params[name] = lo + (1.0 + x - lo) * u[:, 1 + k]
        params["hue"] = cfg.jitter[3] * (2.0 * u[:, 4] - 1.0)
        params["order"] = torch.argsort(u[:, 5:9], dim=1, stable=True)
        return params

    def apply(self, x: Tensor, p: dict[str, Tensor], cfg: AugmentConfig, frame: Frame) -> Tensor:
        flat = _color_jitter_(x.view(len(x), 3, -1), p, hue=cfg.jitter[3] > 0)  # (N, 3, S*S)
        return flat.view(x.shape)


class Grayscale(Op):
    """Grayscale (luma in all three channels) with probability ``grayscale_p``; params
    ``grayscale (N,)`` bool."""

    name, slots, switch = "grayscale", 1, "grayscale_p"

    def sample(self, u: Tensor, cfg: AugmentConfig, frame: Frame) -> dict[str, Tensor]:
        return {"grayscale": u[:, 0] < cfg.grayscale_p}

    def apply(self, x: Tensor, p: dict[str, Tensor], cfg: AugmentConfig, frame: Frame) -> Tensor:
        flat = x.view(len(x), 3, -1)  # (N, 3, S*S)
        return flat.lerp_(_gray(flat), p["grayscale"].to(x.dtype)[:, None, None]).view(x.shape)
