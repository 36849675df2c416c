"""The SimCLR training loop: one path for CPU, one GPU and torchrun.

A map for newcomers. :func:`pretrain` is the whole run: :func:`~simclr_kit.train.prepare.prepare`
builds everything before the first step (data, model, optimizer, run directory, resume) into a
:class:`~simclr_kit.train.state.Trainer`; :func:`fit` is the loop, which reads top to bottom,
each thing a step does named on its line; :func:`train_step` is one step. The decisions
between steps (when to log, to stop, to save, the time budget) and the progress bar and signals
are :class:`~simclr_kit.train.events.LoopEvents`'; what a checkpoint holds and the NaN guard
before each save are in :mod:`simclr_kit.train.checkpoints`; the order of the images and each
rank's share of a batch in :mod:`simclr_kit.data.loader`.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

from torch import Tensor
from tqdm.auto import tqdm

from simclr_kit import distributed
from simclr_kit.config import PretrainConfig, with_data_recipe
from simclr_kit.data.loader import batch_indices, epoch_permutation
from simclr_kit.devices import autocast_dtype, out_of_memory_error
from simclr_kit.errors import UserError
from simclr_kit.train.checkpoints import NonFiniteLoss, check_finite, checkpoint_name, save
from simclr_kit.train.events import Interrupted, LoopEvents
from simclr_kit.train.optim import set_lr
from simclr_kit.train.prepare import prepare
from simclr_kit.train.state import Trainer
from simclr_kit.train.step import simclr_step


def train_step(t: Trainer, idx: Tensor,
               gather: Callable[[Tensor], Tensor] = distributed.all_gather_with_grad) -> Tensor:
    """One optimisation step on this rank's images ``idx: (b,)``; returns the loss (device).
    ``gather`` collects the other ranks' projections for the loss's negatives."""
    set_lr(t.optimizer, t.learning_rate())
    images = t.batches.gather(idx)  # (b, 3, L, L) uint8 on the device
    sizes = None if t.sizes is None else t.sizes[idx.to(t.sizes.device, non_blocking=True)]
    v1, v2 = t.augment(images, idx, t.epoch, sizes)  # each (b, 3, S, S) float
    return simclr_step(t.ddp_model, t.optimizer, v1, v2, t.config.temperature,
                       autocast_dtype(t.config.precision, t.device), t.config.channels_last,
                       t.scaler, gather)


def _step_failure(t: Trainer, err: RuntimeError) -> UserError | None:
    """One line for a step that cannot go on: out of memory (what to lower), or another
    process of the torchrun job gone; None for any other error (raised as it is)."""
    cfg = t.config
    return (out_of_memory_error(err, t.device, t.batch_size, distributed.world_size(),
                                t.meta["image_size"], cfg.precision, cfg.channels_last)
            or distributed.peer_failure(err, f"training step {t.global_step + 1}"))


def fit(t: Trainer) -> Path:
    """Train from ``t``'s position to ``t.total_epochs``; returns the final checkpoint.

    A signal (SIGINT, SIGTERM) ends the current step, saves and raises :class:`Interrupted`.
    """
    with LoopEvents(t) as events:  # the progress bar, the signal handlers, the budget's clock
        while t.epoch < t.total_epochs:
            events.start_epoch()
            for idx in t.batches.epoch(t.epoch, t.step_in_epoch, t.steps_per_epoch):
                try:
                    loss = train_step(t, idx)  # rate, batch, views, forward, backward, update
                except RuntimeError as err:  # out of memory, or a torchrun peer gone: one line
                    failure = _step_failure(t, err)
                    if failure is None:
                        raise
                    raise failure from None
                t.step_in_epoch += 1
                t.global_step += 1
                events.count(loss)  # no sync: a NaN is caught at the next log or save
                logged = events.log_due()
                if logged:
                    events.log()  # the mean loss (the ranks' mean); NaN or infinite stops here
                if events.agree_stop(sync_point=logged):
                    break
                events.fit_budget()  # --time-budget: the run's length, once steps are timed
                if t.step_in_epoch < t.steps_per_epoch and events.rolling_save_due(logged):
                    events.save()
            if events.stopping:
                events.save()
                raise Interrupted(events.stop_signal or signal.SIGTERM, t.run_dir)
            t.epoch += 1
            t.step_in_epoch = 0
            events.after_epoch()  # epoch hooks, the budget's safety net, kept checkpoints
        final = events.save(keep=True)
        events.done()
    return final or t.run_dir


def pretrain(config: PretrainConfig, resume: str | Path | None = None,
             report: bool = True, allow_changed_data: bool = False) -> Path:
    """Pretrain (or resume) a SimCLR encoder; returns the run directory.

    ``resume``: a run directory to continue. ``config`` must equal its ``config.yaml`` except
    for the fields declared resumable (``epochs`` among them; see
    :mod:`simclr_kit.train.resume`), and a run that has trained all its epochs is refused,
    unchanged. Data whose fingerprint differs from the one its last checkpoint recorded
    (regenerated under the same name) is refused too, unless ``allow_changed_data``.

    ``report``: write ``RUN/report.html`` at the end with the sections that need no forward
    passes over the data (``simclr report RUN`` adds the embedding sections).
    """
    config, taken = with_data_recipe(config)
    if taken and distributed.is_main():
        tqdm.write(f"digits: the demo recipe's {', '.join(taken)} (recipes/digits.yaml, "
                   "as `simclr run` uses it; PretrainConfig.from_recipe('digits') asks for it)")
    trainer = prepare(config, Path(resume) if resume is not None else None,
                      allow_changed_data)
    try:
        fit(trainer)
    finally:
        trainer.log.close()
    if report and distributed.is_main():
        from simclr_kit.report.html import write_report_safely

        write_report_safely(trainer.run_dir, embeddings=False)
    return trainer.run_dir


def summary(run_dir: Path) -> str:
    """The lines ``simclr pretrain`` ends with: the epochs trained, the final loss (and the
    last monitored kNN accuracy), the checkpoint, the report and the command to run next.
    Empty on ranks other than 0, which write no metrics."""
    from simclr_kit.checkpoint_files import latest_checkpoint
    from simclr_kit.report.metrics import read_metrics

    if not distributed.is_main():
        return ""
    records = read_metrics(run_dir / "metrics.jsonl")
    last = {r.get("kind"): r for r in records}  # the last record of each kind
    facts = [f"{(last.get('done') or {}).get('epoch', '?')} epoch(s) trained"]
    if "train" in last:
        facts.append(f"final loss {last['train']['loss']:.4f}")
    if "knn" in last:
        facts.append(f"kNN top-1 {last['knn']['top1']:.2f}% (k={last['knn'].get('k')})")
    lines = [f"pretrained {run_dir}: {', '.join(facts)}",
             f"checkpoint: {latest_checkpoint(run_dir, required=False) or 'none'}"]
    if (run_dir / "report.html").is_file():
        lines.append(f"report: {run_dir / 'report.html'}")
    labelled = ((records[0] if records else {}).get("dataset") or {}).get("label_column")
    lines.append(f"next: simclr evaluate {run_dir}" + (
        "   (on its own labelled dataset; --data chooses another)" if labelled else
        " --data LABELLED_DATASET   (its images have no labels)"))
    return "\n".join(lines)


__all__ = ["Interrupted", "NonFiniteLoss", "Trainer", "batch_indices", "check_finite",
           "checkpoint_name", "epoch_permutation", "fit", "prepare", "pretrain", "save",
           "summary", "train_step"]
