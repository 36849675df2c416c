"""What an augmentation op is: a step of the view recipe that describes itself.

An op says its ``name``, how many uniform draws (``slots``) it reads per (sample, view), how it
turns its draws and the config into per-sample parameters (``sample``), how it applies them to a
batch (``apply``), and which config field switches it off (``switch``). ``SimCLRAugment`` walks a
list of ops (``recipe.OPS``): the draws' columns are laid out in list order (``slot_layout``), the
ops applied in list order.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from simclr_kit.config import AugmentConfig


@dataclass(frozen=True)
class Frame:
    """The sizes an op may need, in pixels: input ``height`` x ``width``, output side ``size``,
    and ``sizes (N, 2)`` int: each sample's own image, the valid ``(height, width)`` at the
    top-left of its input (a training frame, data/pixels.py); None when every image fills the
    input."""

    height: int
    width: int
    size: int
    sizes: Tensor | None = None


class Op(ABC):
    """One step of the view recipe.

    Class attributes:
        name: the op's name in ``only(...)`` and in the recipe; unique within a recipe.
        slots: uniform draws it reads per (sample, view): ``sample`` gets ``u (N, slots)``.
        switch: the ``AugmentConfig`` field (a probability) that turns it off at 0, so that
            ``only`` can turn it off; ``None`` for a step that is always on (the crop, which also
            brings every view to the output size).
    """

    name: ClassVar[str]
    slots: ClassVar[int]
    switch: ClassVar[str | None]

    def active(self, cfg: AugmentConfig) -> bool:
        """Whether ``apply`` runs under ``cfg`` (a resolved config): its switch is non-zero."""
        return self.switch is None or bool(getattr(cfg, self.switch))

    @abstractmethod
    def sample(self, u: Tensor, cfg: AugmentConfig, frame: Frame) -> dict[str, Tensor]:
        """Per-sample parameters from this op's uniform draws ``u (N, slots)`` in [0, 1).

        Returns tensors with a leading dimension N, under keys no other op uses. Called whether
        or not the op is active, so ``sample_params`` always has every key.
        """

    @abstractmethod
    def apply(self, x: Tensor, p: dict[str, Tensor], cfg: AugmentConfig, frame: Frame) -> Tensor:
        """The op on a batch, given every op's parameters ``p`` (rows match ``x``).

        The first op (the crop) takes uint8 ``(N, 3, H, W)`` and returns float32 ``(N, 3, S, S)``
        on the [0, 1] scale; every later op maps float32 ``(N, 3, S, S)`` to the same, in place
        where it can. Only called when ``active(cfg)``.
        """


def slot_layout(ops: Sequence[Op]) -> dict[str, slice]:
    """Each op's columns of the uniform draws: consecutive, in list order.

    Appending an op leaves the columns, so the views, of the ops before it unchanged; inserting
    one shifts the columns of every op after it (their draws for a given seed change).
    """
    names = [op.name for op in ops]
    if len(set(names)) != len(names):
        raise ValueError(f"op names must be unique, got {names}")
    ends = list(itertools.accumulate(op.slots for op in ops))
    return {op.name: slice(end - op.slots, end) for op, end in zip(ops, ends)}
