"""A training run's checkpoints: what a :class:`~simclr_kit.train.state.Trainer` saves, the guard
that keeps a NaN from ever being saved, and the restore that a resumed run starts with.

The files themselves (safetensors weights, ``state.pt``, sidecars, atomic publishing) are
:mod:`simclr_kit.checkpoint_files`'s; this module decides what goes in them and when they are good.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from tqdm.auto import tqdm

from simclr_kit import distributed
from simclr_kit.checkpoint_files import (latest_checkpoint, load_into, load_train_state,
                                         load_weights, save_checkpoint)
from simclr_kit.errors import UserError
from simclr_kit.report.system import hardware_info

if TYPE_CHECKING:
    from simclr_kit.train.state import Trainer

_STATE_KEYS = ("optimizer", "epoch", "step_in_epoch", "global_step", "rng_cpu")


class NonFiniteLoss(UserError):
    """The loss or the weights became NaN or infinite; nothing after the last good checkpoint
    was saved."""

    def __init__(self, t: Trainer, what: str) -> None:
        last = latest_checkpoint(t.run_dir, required=False)
        kept = f"the last good checkpoint, {last}, is kept" if last else "no checkpoint was saved"
        super().__init__(f"training stopped at epoch {t.epoch + 1} step {t.step_in_epoch}: "
                         f"{what}; {kept}. Start again with a lower --lr, a higher --temperature "
                         "or --precision fp32")


def check_finite(t: Trainer, loss: Tensor | None = None) -> None:
    """Raise :class:`NonFiniteLoss` unless ``loss`` (the sum of the losses since the last check)
    and every weight and buffer are finite: one device sync, run before anything is saved."""
    tensors = [v for v in t.model.state_dict().values() if v.is_floating_point()]
    flags = [~torch.isfinite(v).all() for v in tensors]
    if loss is not None:
        flags.append(~torch.isfinite(loss))
    if float(distributed.all_reduce_sum(torch.stack(flags).any().float())) > 0:
        raise NonFiniteLoss(t, "the loss or the weights became NaN or infinite")


def checkpoint_name(epoch: int, step_in_epoch: int) -> str:
    """Epochs count from 1 in every name, as in the progress bar: ``epoch-0002`` ends the second
    epoch, ``epoch-0002-step-000008`` is step 8 of it (``epoch`` is the 0-based epoch index)."""
    if step_in_epoch:
        return f"epoch-{epoch + 1:04d}-step-{step_in_epoch:06d}"
    return f"epoch-{epoch:04d}"


def save(t: Trainer, keep: bool = False, loss: Tensor | None = None) -> Path | None:
    """Checkpoint the current position (rank 0 writes; every rank waits for it).

    Refused (:class:`NonFiniteLoss`) when ``loss`` (the losses not yet checked) or a weight is
    NaN or infinite, so the last checkpoint is always a good one. A failed write on rank 0 is
    raised on every rank.
    """
    check_finite(t, loss)
    path, error = None, None
    if distributed.is_main():
        name = checkpoint_name(t.epoch, t.step_in_epoch)
        state = {"optimizer": t.optimizer.state_dict(), "epoch": t.epoch,
                 "step_in_epoch": t.step_in_epoch, "global_step": t.global_step,
                 "total_epochs": t.total_epochs, "rng_cpu": torch.get_rng_state(),
                 "budget_fitted": t.config.time_budget is not None
                 and (t.budget is None or t.budget.fit is not None)}
        if t.device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(t.device)
        if t.scaler is not None:
            state["grad_scaler"] = t.scaler.state_dict()
        meta = dict(t.meta, epoch=t.epoch, step_in_epoch=t.step_in_epoch,
                    global_step=t.global_step)
        try:
            path = save_checkpoint(t.run_dir, name, t.model, meta, state, keep)
        except UserError as err:  # a full disk: the other ranks must not wait for rank 0
            error = str(err)
    if distributed.world_size() > 1:
        error = distributed.broadcast_object(error)
    if error is not None:
        raise UserError(error)
    return path


def restore(t: Trainer) -> None:
    """Put a resumed run back where its latest checkpoint left it: weights, optimizer, position,
    RNG states, loss scale, and the length a time budget chose."""
    ckpt = latest_checkpoint(t.run_dir, required=False)
    if ckpt is None:
        # Killed before its first checkpoint: the model was just built from the run's seed, so
        # starting again from step 0 is exactly the run it would have been.
        if distributed.is_main():
            tqdm.write(f"{t.run_dir} has no checkpoint yet: starting it from the beginning")
        t.log.write("resume", epoch=0, step_in_epoch=0, checkpoint=None,
                    hardware=hardware_info(t.device))
        return
    state = load_train_state(ckpt)
    missing = [k for k in _STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise UserError(f"{ckpt / 'state.pt'} is not a simclr-kit training state (missing "
                        f"{missing}); it cannot be resumed")
    try:
        load_into(t.model, load_weights(ckpt / "model.safetensors"))
        t.optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as err:
        raise UserError(f"checkpoint {ckpt} does not fit this run's model or optimizer "
                        f"({str(err).strip().splitlines()[0][:200]})") from None
    t.epoch, t.step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
    t.global_step = int(state["global_step"])
    if t.config.time_budget is not None and state.get("budget_fitted"):
        t.total_epochs = int(state["total_epochs"])  # the budget fixed the length: keep it
        t.budget = None
    torch.set_rng_state(state["rng_cpu"])
    if t.scaler is not None and "grad_scaler" in state:
        t.scaler.load_state_dict(state["grad_scaler"])
    if t.device.type == "cuda" and "rng_cuda" in state:
        torch.cuda.set_rng_state(state["rng_cuda"], t.device)
    # The epoch of the checkpoint's name, counted from 1: a mid-epoch one is in the next epoch.
    t.log.write("resume", epoch=t.epoch + (1 if t.step_in_epoch else 0),
                step_in_epoch=t.step_in_epoch, checkpoint=ckpt.name,
                hardware=hardware_info(t.device))
    if distributed.is_main():
        tqdm.write(f"resuming from {ckpt.name} in {t.run_dir}")


__all__ = ["NonFiniteLoss", "check_finite", "checkpoint_name", "restore", "save"]
