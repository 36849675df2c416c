"""Pixel ops on the resized view: Gaussian blur (SimCLR) and solarize (BYOL), as torchvision's."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from simclr_kit.augment.op import Frame, Op
from simclr_kit.config import AugmentConfig


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


class Blur(Op):
    """Gaussian blur with probability ``blur_p`` (size-dependent default: off at <= 32 px), kernel
    ``blur_kernel_size(S)``; params ``blur (N,)`` bool and ``sigma (N,)`` float32, uniform in
    [blur_sigma_min, blur_sigma_max]."""

    name, slots, switch = "blur", 2, "blur_p"

    def sample(self, u: Tensor, cfg: AugmentConfig, frame: Frame) -> dict[str, Tensor]:
        sigma_span = cfg.blur_sigma_max - cfg.blur_sigma_min
        return {"blur": u[:, 0] < (cfg.blur_p or 0.0),
                "sigma": cfg.blur_sigma_min + sigma_span * u[:, 1]}

    def apply(self, x: Tensor, p: dict[str, Tensor], cfg: AugmentConfig, frame: Frame) -> Tensor:
        return _gaussian_blur(x, p["sigma"], p["blur"], blur_kernel_size(frame.size))


class Solarize(Op):
    """Solarize with probability ``solarize_p``: values at or above ``solarize_threshold`` inverted
    (torchvision's solarize); params ``solarize (N,)`` bool."""

    name, slots, switch = "solarize", 1, "solarize_p"

    def sample(self, u: Tensor, cfg: AugmentConfig, frame: Frame) -> dict[str, Tensor]:
        return {"solarize": u[:, 0] < cfg.solarize_p}

    def apply(self, x: Tensor, p: dict[str, Tensor], cfg: AugmentConfig, frame: Frame) -> Tensor:
        return torch.where(p["solarize"][:, None, None, None] & (x >= cfg.solarize_threshold),
                           1.0 - x, x)
