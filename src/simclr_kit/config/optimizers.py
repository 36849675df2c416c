"""The optimizers' defaults, one table: each optimizer's rate per 256 images, its scaling with
the batch, its weight decay and warm-up, and the ViT recipe.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from simclr_kit.config.fields import merge

# How the rate for a batch of 256 becomes the run's rate (see optim.effective_lr).
LR_SCALINGS = ("linear", "sqrt")


@dataclass(frozen=True)
class OptimizerDefaults:
    """What an optimizer takes for the pretraining fields left at ``None``: the learning rate
    for a batch of 256, how it scales to the global batch (:data:`LR_SCALINGS`), the weight
    decay and the warm-up in epochs."""

    lr: float
    lr_scaling: str
    weight_decay: float
    warmup_epochs: float = 10.0


# The one table of optimizers: every --optimizer by name, with its defaults; optim builds each
# row with the function named after it (optim.BUILDERS).
OPTIMIZER_DEFAULTS: dict[str, OptimizerDefaults] = {
    # SimCLR's LARS (appendix B.1: weight decay 1e-6, 10 warm-up epochs) with its square-root
    # rule, 0.075 x sqrt(B) = 1.2 x sqrt(B / 256); chosen on validation against 2.83 x sqrt(B / 256)
    # (bench/RESULTS.md, "Encoder quality").
    "lars": OptimizerDefaults(1.2, "sqrt", 1e-6),
    # lightly's CIFAR-10 SimCLR benchmark: 0.06 x B/128, weight decay 5e-4.
    "sgd": OptimizerDefaults(0.12, "linear", 5e-4),
    # Adam's own default rate (Kingma & Ba 2015) for a batch of 256, scaled linearly with the
    # batch (Goyal et al. 2017); L2 weight decay added to the gradient, SimCLR's 1e-6.
    "adam": OptimizerDefaults(1e-3, "linear", 1e-6),
    # The same rate with decoupled weight decay (Loshchilov & Hutter 2019) at DeiT's 0.05.
    "adamw": OptimizerDefaults(1e-3, "linear", 0.05),
}
OPTIMIZERS = tuple(OPTIMIZER_DEFAULTS)
# ViT backbones train with MoCo v3's ViT recipe (Chen, Xie & He 2021, "An Empirical Study of
# Training Self-Supervised Vision Transformers", section 4 and appendix): AdamW, lr 1.5e-4 x
# B/256, weight decay 0.1, 40 warm-up epochs, then cosine.
VIT_OPTIMIZER = "adamw"
VIT_DEFAULTS = OptimizerDefaults(1.5e-4, "linear", 0.1, 40.0)


def _per_optimizer(field_name: str) -> str:
    """The help's default of an :class:`OptimizerDefaults` field, from the tables themselves:
    ``"lars 1.2, sgd 0.12, adam/adamw 0.001; 0.00015 for a ViT's adamw"``."""
    def text(value: Any) -> str:
        return f"{value:g}" if isinstance(value, float) else str(value)

    names_by_value: dict[Any, list[str]] = {}
    for name, defaults in OPTIMIZER_DEFAULTS.items():
        names_by_value.setdefault(getattr(defaults, field_name), []).append(name)
    each = ", ".join(f"{'/'.join(names)} {text(value)}" for value, names in names_by_value.items())
    if len(names_by_value) == 1:
        each = text(next(iter(names_by_value)))
    return f"{each}; {text(getattr(VIT_DEFAULTS, field_name))} for a ViT's {VIT_OPTIMIZER}"


def merge_pretrain(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``overrides`` laid over ``base`` (dicts of :class:`PretrainConfig` fields) with
    :func:`merge`, except that an optimizer named in ``overrides`` other than the one ``base``
    names also drops ``base``'s rate, scaling, weight decay and warm-up (the fields of
    :class:`OptimizerDefaults`) that ``overrides`` leaves unset: they were chosen for ``base``'s
    optimizer, and the new one takes its own defaults."""
    named = overrides.get("optimizer")
    if named is not None and base.get("optimizer") not in (None, named):
        tied = {f.name for f in dataclasses.fields(OptimizerDefaults)}
        base = {k: v for k, v in base.items() if k not in tied}
    return merge(base, overrides)


def is_vit_name(backbone: str) -> bool:
    """Whether a backbone name is a plain Vision Transformer: torchvision's ``vit_*``, timm's
    ``timm/vit_*``, ``timm/deit*`` and ``timm/test_vit*``."""
    model = backbone.removeprefix("timm/")
    return model.startswith(("vit_", "deit", "test_vit"))
