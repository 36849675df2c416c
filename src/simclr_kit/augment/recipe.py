"""The SimCLR view recipe as a list of ops (``OPS``), and ``only``: a config keeping a few of them.

``OPS`` is the order the ops are applied in and the order their uniform draws are laid out in
(``op.slot_layout``). A new op goes at the end to keep every existing op's draws, so the views of
a seed stay what they were while the new op is off.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

from simclr_kit.augment.colour import ColorJitter, Grayscale
from simclr_kit.augment.filters import Blur, Solarize
from simclr_kit.augment.geometry import Crop, Flip
from simclr_kit.augment.op import Op
from simclr_kit.config import AugmentConfig

OPS: tuple[Op, ...] = (Crop(), Flip(), ColorJitter(), Grayscale(), Blur(), Solarize())


def only(keep: Iterable[str], *, base: AugmentConfig | None = None,
         ops: Sequence[Op] = OPS, **fields: Any) -> AugmentConfig:
    """``base`` (default ``AugmentConfig()``) with ``fields`` set and every op not in ``keep`` off.

    Each op left out has its switch field set to 0, so an op added to the recipe later is off
    under this config unless it is named here. ``only(("crop", "flip"), crop_scale_min=0.5)`` is
    crops and flips only. Raises ValueError for an unknown name, for leaving out an op that cannot
    be off (the crop), or for a field that sets the switch of an op left out.
    """
    keep = set(keep)
    unknown = keep - {op.name for op in ops}
    if unknown:
        raise ValueError(f"unknown augmentation ops {sorted(unknown)}; "
                         f"known: {[op.name for op in ops]}")
    off: dict[str, float] = {}
    for op in ops:
        if op.name in keep:
            continue
        if op.switch is None:
            raise ValueError(f"augmentation op {op.name!r} is always on: keep it")
        if op.switch in fields:
            raise ValueError(f"{op.switch}={fields[op.switch]} set for {op.name!r}, which is off")
        off[op.switch] = 0.0
    return dataclasses.replace(base or AugmentConfig(), **fields, **off)
