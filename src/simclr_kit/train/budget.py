"""Fit a pretraining run's length to a wall-clock budget, from the speed of its first steps.

``--time-budget MINUTES`` replaces ``--epochs``: the loop runs a few untimed steps (compilation,
cuDNN autotuning and the allocator's first growth happen there), times the next ones, then sets
the number of epochs, and with it the warm-up + cosine schedule, so that the training steps end
inside the budget with a safety margin. The clock counts training only: data decoding and model
set-up come before it starts, and evaluation hooks (``--monitor-knn``) are paused out of it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

# Part of the budget left free: epoch ends, logging and checkpoints cost time that the timed
# steps do not show, and a GPU clocks down a little once it is warm.
SAFETY_MARGIN = 0.05
WARMUP_STEPS = 3  # untimed steps: the first one compiles, the next ones may still re-tune
MIN_TIMED_STEPS = 5
MIN_TIMED_SECONDS = 2.0  # at most; a tiny budget times for 2% of itself instead


@dataclass(frozen=True)
class BudgetFit:
    """The length chosen for the budget and the measurement it rests on."""

    epochs: int
    seconds_per_step: float
    timed_steps: int
    spent_seconds: float  # training seconds already spent when the length was chosen
    expected_seconds: float  # predicted training seconds for the whole run

    def as_record(self) -> dict[str, Any]:
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in asdict(self).items()}


class TimeBudget:
    """Times a run's first steps and picks the number of epochs that fits ``minutes``.

    Call :meth:`start` when training starts, :meth:`step_done` after every step until it
    returns True, then :meth:`choose`. ``sync`` waits for the device (``torch.cuda.synchronize``)
    at the two ends of the timed window, so queued GPU work is inside it; ``clock`` is injectable
    for tests.
    """

    def __init__(self, minutes: float, steps_per_epoch: int, sync: Callable[[], None] = lambda: None,
                 clock: Callable[[], float] = time.perf_counter, margin: float = SAFETY_MARGIN,
                 warmup_steps: int = WARMUP_STEPS) -> None:
        if minutes <= 0 or steps_per_epoch < 1:
            raise ValueError(f"need minutes > 0 and steps_per_epoch >= 1, got {minutes}, "
                             f"{steps_per_epoch}")
        self.seconds = minutes * 60.0
        self.steps_per_epoch = steps_per_epoch
        self.sync, self.clock, self.margin, self.warmup_steps = sync, clock, margin, warmup_steps
        self.fit: BudgetFit | None = None
        self._started = 0.0
        self._paused = 0.0
        self._steps = 0  # steps seen this session
        self._window_start: float | None = None
        self._window_seconds = 0.0

    def start(self) -> None:
        self._started, self._paused = self.clock(), 0.0

    def elapsed(self) -> float:
        """Training seconds since :meth:`start`, paused time excluded."""
        return self.clock() - self._started - self._paused

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent in the body does not count (evaluation during training)."""
        began = self.clock()
        try:
            yield
        finally:
            self._paused += self.clock() - began

    @property
    def min_timed_seconds(self) -> float:
        return min(MIN_TIMED_SECONDS, 0.02 * self.seconds)

    def step_done(self) -> bool:
        """Count a finished step; True once enough steps are timed to choose the length."""
        if self.fit is not None:
            return False
        self._steps += 1
        timed = self._steps - self.warmup_steps
        if timed == 0:
            self.sync()
            self._window_start = self.elapsed()
            return False
        if timed < MIN_TIMED_STEPS or self._window_start is None:
            return False
        if self.elapsed() - self._window_start < self.min_timed_seconds:
            return False  # the host may run ahead of the device, so only sync when it may be over
        self.sync()
        self._window_seconds = self.elapsed() - self._window_start
        return self._window_seconds >= self.min_timed_seconds

    def choose(self, global_step: int) -> BudgetFit:
        """The number of epochs whose remaining steps fit in the budget less the margin.

        ``global_step`` steps are done (all epochs count, so a run that lost its measurement to
        a restart still fits). At least the epoch in progress is finished.
        """
        timed = self._steps - self.warmup_steps
        per_step = self._window_seconds / max(timed, 1)
        spent = self.elapsed()
        usable = self.seconds * (1.0 - self.margin) - spent
        steps_left = max(0, math.floor(usable / per_step)) if per_step > 0 else 0
        epochs = (global_step + steps_left) // self.steps_per_epoch
        epochs = max(epochs, 1, math.ceil(global_step / self.steps_per_epoch))
        expected = spent + (epochs * self.steps_per_epoch - global_step) * per_step
        self.fit = BudgetFit(epochs, per_step, timed, spent, expected)
        return self.fit

    def fits_another(self, seconds: float) -> bool:
        """Whether ``seconds`` more training (the last epoch's length) still ends in the budget."""
        return self.elapsed() + seconds <= self.seconds


def describe(fit: BudgetFit, minutes: float, replaced_epochs: int, warmup_epochs: float) -> str:
    """The one line the run prints when it has chosen its length."""
    line = (f"time budget {minutes:g} min: {fit.seconds_per_step * 1000:.1f} ms/step over "
            f"{fit.timed_steps} timed steps -> {fit.epochs} epochs (replaces --epochs "
            f"{replaced_epochs}), about {fit.expected_seconds / 60:.2f} min of training, "
            f"warm-up {warmup_epochs:g} epochs")
    if fit.expected_seconds > minutes * 60:
        line += ("; over the budget: finishing the epoch in progress is the shortest run "
                 "(lower the batch size or image size, or raise the budget)")
    return line


__all__ = ["TimeBudget", "BudgetFit", "describe", "SAFETY_MARGIN"]
