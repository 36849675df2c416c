"""Tests of the augmentation op list: the draws' layout per op, and ``only`` (fine-tuning's ops).

The layout test pins each op's columns of the keyed uniform draws to those the views have always
used, so the views of a seed stay what they were: a change to the list that moves an op's columns
(an op inserted before it, a slot count changed) fails here.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import Tensor

from simclr_kit.augment import OPS, Frame, Op, SimCLRAugment, keyed_uniforms, only, slot_layout
from simclr_kit.config import AugmentConfig
from simclr_kit.evaluation.finetune import FINETUNE_AUGMENT

# The columns each parameter has been drawn from: 10 crop areas, 10 log-ratios, top, left, flip,
# the jitter flag, its 4 factors and 4 order keys, grayscale, blur flag, sigma, solarize.
LAYOUT = {"crop": slice(0, 22), "flip": slice(22, 23), "jitter": slice(23, 32),
          "grayscale": slice(32, 33), "blur": slice(33, 35), "solarize": slice(35, 36)}


def _torchvision_box(u: list[float], height: int, width: int, cfg: AugmentConfig) -> list[int]:
    """RandomResizedCrop.get_params of torchvision, scalar, on the given draws (columns 0-21)."""
    for t in range(10):
        area = height * width * (cfg.crop_scale_min
                                 + (cfg.crop_scale_max - cfg.crop_scale_min) * u[t])
        lo, hi = math.log(cfg.crop_ratio_min), math.log(cfg.crop_ratio_max)
        aspect = math.exp(lo + (hi - lo) * u[10 + t])
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return [int(u[20] * (height - h + 1)), int(u[21] * (width - w + 1)), h, w]
    raise AssertionError("no valid draw: pick other indices")


def test_op_columns_are_the_views_columns() -> None:
    assert slot_layout(OPS) == LAYOUT
    cfg = AugmentConfig(blur_p=0.5, solarize_p=0.5, jitter_strength=1.0)
    aug = SimCLRAugment(cfg, 48, (0.0,) * 3, (1.0,) * 3, seed=4)
    assert aug.slots == 36
    ids = torch.tensor([0, 3, 17, 250, 9999])
    p = aug.sample_params(ids, epoch=2, view=1, height=40, width=56)
    u = keyed_uniforms(ids, 4, 2, (1,), 36)
    assert p["crop"].tolist() == [_torchvision_box(row, 40, 56, cfg) for row in u.tolist()]
    assert torch.equal(p["flip"], u[:, 22] < 0.5)
    assert torch.equal(p["jitter"], u[:, 23] < 0.8)
    for k, name in enumerate(("brightness", "contrast", "saturation")):
        assert torch.equal(p[name], 0.2 + 1.6 * u[:, 24 + k])  # strength 1: [0.2, 1.8]
    assert torch.equal(p["hue"], 0.2 * (2.0 * u[:, 27] - 1.0))
    assert torch.equal(p["order"], torch.argsort(u[:, 28:32], dim=1, stable=True))
    assert torch.equal(p["grayscale"], u[:, 32] < 0.2)
    assert torch.equal(p["blur"], u[:, 33] < 0.5)
    assert torch.equal(p["sigma"], 0.1 + 1.9 * u[:, 34])
    assert torch.equal(p["solarize"], u[:, 35] < 0.5)


@dataclasses.dataclass(frozen=True)
class _WithPosterize(AugmentConfig):
    posterize_p: float = 0.5


class _Posterize(Op):
    """A new op, as one would be added: 4 levels per channel where its flag is set."""

    name, slots, switch = "posterize", 1, "posterize_p"

    def sample(self, u: Tensor, cfg: AugmentConfig, frame: Frame) -> dict[str, Tensor]:
        return {"posterize": u[:, 0] < cfg.posterize_p}  # type: ignore[attr-defined]

    def apply(self, x: Tensor, p: dict[str, Tensor], cfg: AugmentConfig, frame: Frame) -> Tensor:
        return torch.where(p["posterize"][:, None, None, None], (x * 4).floor() / 4, x)


def test_fine_tuning_keeps_only_crop_and_flip() -> None:
    assert FINETUNE_AUGMENT == only(("crop", "flip"), crop_scale_min=0.5)
    assert FINETUNE_AUGMENT.crop_scale_min == 0.5 and FINETUNE_AUGMENT.flip_p == 0.5
    for size in (32, 96):  # blur's default is size-dependent
        cfg = FINETUNE_AUGMENT.resolved(size)
        assert [op.name for op in OPS if op.active(cfg)] == ["crop", "flip"]


def test_a_new_op_is_off_unless_fine_tuning_keeps_it() -> None:
    ops = OPS + (_Posterize(),)
    base = _WithPosterize()
    tuned = only(("crop", "flip"), base=base, ops=ops, crop_scale_min=0.5)
    assert tuned.posterize_p == 0.0 and not _Posterize().active(tuned)
    images = torch.randint(0, 256, (40, 3, 24, 24), dtype=torch.uint8)
    ids = torch.arange(40)

    def views(cfg: AugmentConfig, recipe: tuple[Op, ...]) -> Tensor:
        aug = SimCLRAugment(cfg, 16, (0.5,) * 3, (0.25,) * 3, seed=1, ops=recipe)
        return aug(images, ids, 3)[0]

    # Appended, the new op leaves the other ops' draws: off, the views are fine-tuning's.
    assert torch.equal(views(tuned, ops), views(FINETUNE_AUGMENT, OPS))
    kept = only(("crop", "flip", "posterize"), base=base, ops=ops, crop_scale_min=0.5)
    assert not torch.equal(views(kept, ops), views(FINETUNE_AUGMENT, OPS))


def test_only_rejects_unknown_always_on_and_contradictory_ops() -> None:
    with pytest.raises(ValueError, match="unknown"):
        only(("crop", "rotate"))
    with pytest.raises(ValueError, match="always on"):
        only(("flip",))
    with pytest.raises(ValueError, match="off"):
        only(("crop",), grayscale_p=0.3)
    with pytest.raises(ValueError, match="unique"):
        slot_layout(OPS + (OPS[1],))
