"""What happens around the training steps: logging, signals, the time budget, checkpoints.

:class:`LoopEvents` is the state of one session of the loop (:func:`simclr_kit.train.loop.fit`
calls each of its steps by name) and the decisions taken between steps. Under torchrun every
decision that makes the ranks act (stop, save, change the run's length) is taken by all ranks
at the same step: from shared counters, or agreed at the logging points, where they synchronise
anyway (:func:`simclr_kit.distributed.any_rank`).
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from simclr_kit import distributed
from simclr_kit.report.system import peak_memory_mb
from simclr_kit.train.budget import describe
from simclr_kit.train.checkpoints import NonFiniteLoss, save
from simclr_kit.train.optim import warmup_epochs_within
from simclr_kit.train.state import Trainer

ROLLING_CHECKPOINT_SECONDS = 300.0


class Interrupted(Exception):
    """Training stopped by a signal after saving; ``code`` is 128 + the signal number."""

    def __init__(self, signum: int, run_dir: Path) -> None:
        super().__init__(f"stopped by signal {signal.Signals(signum).name}; checkpoint saved: "
                         f"resume with: simclr pretrain --resume {run_dir}")
        self.exit_code = 128 + signum


def install_signal_handlers(events: LoopEvents) -> Callable[[], None]:
    """SIGINT/SIGTERM set ``events.stop_signal``: the current step finishes, then the loop saves
    and stops; a second signal stops at once (the last checkpoint stays). Returns the function
    that puts the old handlers back."""
    def handler(signum: int, _frame: Any) -> None:
        if events.stop_signal is not None:
            raise KeyboardInterrupt
        events.stop_signal = signum

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    return lambda: [signal.signal(s, h) for s, h in previous.items()]  # type: ignore[func-returns-value]


class LoopEvents:
    """One session of :func:`~simclr_kit.train.loop.fit` over the run ``t``; a context manager
    that installs the signal handlers and the progress bar and starts the budget's clock."""

    def __init__(self, t: Trainer) -> None:
        self.t = t
        self.bar: tqdm | None = None
        self.first_step = t.global_step
        self.started = 0.0
        self.epoch_started = 0.0
        self.seen = 0  # steps since the last metric line
        self.interval_started = 0.0
        self.losses = torch.zeros((), device=t.device)  # summed on the device, not yet checked
        self.stop_signal: int | None = None  # a signal this process received
        self.stopping = False  # the ranks agreed to stop after the current step
        self.last_save = 0.0
        self._restore_signals: Callable[[], None] = lambda: None

    def __enter__(self) -> LoopEvents:
        t = self.t
        self._restore_signals = install_signal_handlers(self)
        self.last_save = self.started = time.monotonic()
        if t.config.progress and distributed.is_main():
            self.bar = tqdm(total=t.total_epochs * t.steps_per_epoch, initial=t.global_step,
                            unit="step", desc="pretraining", dynamic_ncols=True)
        if t.budget is not None:
            t.budget.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()
        self._restore_signals()

    def start_epoch(self) -> None:
        t = self.t
        if self.bar is not None:
            self.bar.set_description(f"epoch {t.epoch + 1}/{t.total_epochs}")
        self.epoch_started = t.budget.elapsed() if t.budget is not None else 0.0
        t.ddp_model.train()
        self.losses = torch.zeros((), device=t.device)
        self.seen, self.interval_started = 0, time.perf_counter()

    def count(self, loss: Tensor) -> None:
        """Add a step's loss to the sum of the unchecked ones (a NaN stays NaN in the sum: it is
        caught at the next log or save, without a device sync per step)."""
        self.losses += loss
        self.seen += 1
        if self.bar is not None:
            self.bar.update(1)

    def log_due(self) -> bool:
        """Every ``log_every`` steps and at the epoch's end; the ranks' shared points."""
        t = self.t
        return self.seen == t.config.log_every or t.step_in_epoch == t.steps_per_epoch

    def agree_stop(self, sync_point: bool) -> bool:
        """Whether the run stops after this step: a signal arrived. A signal may reach the ranks
        of a torchrun job at different steps, and a rank that stopped alone would leave the
        others waiting in a collective: under torchrun the ranks agree at the logging points."""
        if distributed.world_size() == 1:
            self.stopping = self.stop_signal is not None
        elif sync_point:
            signum = distributed.max_over_ranks(self.stop_signal or 0)
            if signum:
                self.stop_signal, self.stopping = self.stop_signal or signum, True
        return self.stopping

    def fit_budget(self) -> None:
        """With ``--time-budget``, once the first steps are timed: set the run's length to fit
        it. Rank 0's measurement decides, so every rank takes the same length at the same step."""
        t = self.t
        if t.budget is None or t.budget.fit is not None:
            return
        ready = t.budget.step_done()
        if distributed.world_size() > 1:
            ready = distributed.broadcast_object(ready)
        if not ready:
            return
        fit = distributed.broadcast_object(t.budget.choose(t.global_step))
        t.budget.fit, replaced, t.total_epochs = fit, t.total_epochs, fit.epochs
        warmup = warmup_epochs_within(t.config.warmup_epochs, fit.epochs,
                                      t.config.warmup_fraction)
        t.log.write("budget", minutes=t.config.time_budget, replaced_epochs=replaced,
                    warmup_epochs=round(warmup, 4), step=t.global_step, **fit.as_record())
        if distributed.is_main():
            tqdm.write(describe(fit, t.config.time_budget or 0.0, replaced, warmup))
        if self.bar is not None:
            self.bar.total = t.total_epochs * t.steps_per_epoch
            self.bar.set_description(f"epoch {t.epoch + 1}/{t.total_epochs}")

    def rolling_save_due(self, sync_point: bool) -> bool:
        """Whether a rolling checkpoint is due inside an epoch: every ``checkpoint_every_steps``
        steps, and once ROLLING_CHECKPOINT_SECONDS have passed since the last save. Every rank
        must give the same answer (each joins :meth:`save`): the step count is shared; under
        torchrun the clocks are compared at the logging points."""
        t = self.t
        every = t.config.checkpoint_every_steps
        if every and t.global_step % every == 0:
            return True
        late = time.monotonic() - self.last_save > ROLLING_CHECKPOINT_SECONDS
        return (late if distributed.world_size() == 1
                else sync_point and distributed.any_rank(late))

    def save(self, keep: bool = False) -> Path | None:
        """Checkpoint the position (:func:`~simclr_kit.train.checkpoints.save`), after checking
        the losses since the last check and the weights for NaN."""
        path = save(self.t, keep, self.losses)
        self.last_save = time.monotonic()
        return path

    def after_epoch(self) -> None:
        """The epoch hooks (kNN monitor; not counted against a time budget), the budget's
        safety net, and the epoch's checkpoint: kept every ``checkpoint_every`` epochs, else a
        rolling one when due."""
        t = self.t
        epoch_seconds = t.budget.elapsed() - self.epoch_started if t.budget is not None else 0.0
        with t.budget.paused() if t.budget is not None else nullcontext():
            for hook in t.hooks:
                hook(t)
        if t.epoch < t.total_epochs and not self._budget_allows_next_epoch(epoch_seconds):
            t.log.write("budget_stop", epoch=t.epoch, planned_epochs=t.total_epochs,
                        training_s=round(t.budget.elapsed(), 2) if t.budget else None)
            t.total_epochs = t.epoch
        every = t.config.checkpoint_every
        kept = bool(every) and t.epoch % every == 0
        # Between kept checkpoints, rolling ones bound the work a crash can lose without
        # writing a checkpoint per (possibly 2-second) epoch.
        if t.epoch < t.total_epochs and (kept or self.rolling_save_due(sync_point=True)):
            self.save(keep=kept)

    def done(self) -> None:
        """The session's closing record: its wall time (a resumed run logs one per session),
        images per second and peak device memory."""
        t = self.t
        seconds = time.monotonic() - self.started
        t.log.write("done", epoch=t.epoch, step=t.global_step, wall_s=round(seconds, 2),
                    images_per_s=round((t.global_step - self.first_step) * t.batch_size
                                       / max(seconds, 1e-9), 1),
                    peak_memory_mb=peak_memory_mb(t.device))

    def log(self) -> None:
        """Log the mean loss of the last steps (and stop if it is NaN or infinite)."""
        t = self.t
        seconds = time.perf_counter() - self.interval_started
        loss = self.losses / self.seen
        value = float(distributed.all_reduce_sum(loss.detach()) / distributed.world_size())
        if not math.isfinite(value):
            raise NonFiniteLoss(t, f"the loss became {value}")
        self.losses.zero_()
        ips = self.seen * t.batch_size / max(seconds, 1e-9)
        lr = t.optimizer.param_groups[0]["lr"]
        # Epochs count from 1 in every record, as in checkpoint names and the progress bar.
        t.log.write("train", epoch=t.epoch + 1, step=t.global_step, loss=value, lr=lr,
                    images_per_s=round(ips, 1))
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{value:.4f}", img_s=f"{ips:.0f}", lr=f"{lr:.3g}")
        self.seen, self.interval_started = 0, time.perf_counter()

    def _budget_allows_next_epoch(self, epoch_seconds: float) -> bool:
        """False when another epoch as long as the last would overrun the budget (a safety net:
        the chosen length already ends inside it, unless the steps became slower). Every rank
        must agree: they all join the final save."""
        budget = self.t.budget
        if budget is None or budget.fit is None:
            return True
        return not distributed.any_rank(not budget.fits_another(epoch_seconds))


__all__ = ["Interrupted", "LoopEvents", "install_signal_handlers"]
