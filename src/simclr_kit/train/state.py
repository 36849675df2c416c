"""One training run's state: :class:`Trainer`, built by :func:`simclr_kit.train.prepare.prepare`.

It holds what a checkpoint saves (the model, the optimizer and the run's position) and what a
step needs (the batches, the augmentation, the schedule's rate); the loop is
:mod:`simclr_kit.train.loop`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from simclr_kit.augment import SimCLRAugment
from simclr_kit.config import PretrainConfig
from simclr_kit.data.loader import ResidentBatches
from simclr_kit.data.store import ImageStore
from simclr_kit.data.stream import StreamedBatches
from simclr_kit.models.heads import SimCLR
from simclr_kit.report.metrics import MetricsLog
from simclr_kit.train.budget import TimeBudget
from simclr_kit.train.optim import warmup_cosine, warmup_epochs_within


@dataclass
class Trainer:
    """One training run: what a step needs and what a checkpoint saves; built by
    :func:`~simclr_kit.train.prepare.prepare`.

    The fields up to ``steps_per_epoch`` are fixed for the run. ``total_epochs``, ``epoch``,
    ``step_in_epoch`` and ``global_step`` are its length and position, saved in every checkpoint
    with the model, the optimizer and ``scaler``. What one session of the loop keeps (the losses
    not yet checked, a signal, the time of the last save) is
    :class:`~simclr_kit.train.events.LoopEvents`'.
    """

    config: PretrainConfig
    run_dir: Path
    device: torch.device
    store: ImageStore
    eval_store: ImageStore | None
    batches: ResidentBatches | StreamedBatches  # each step's images (data/loader.py, stream.py)
    model: SimCLR
    ddp_model: nn.Module
    augment: SimCLRAugment
    optimizer: torch.optim.Optimizer
    meta: dict[str, Any]
    log: MetricsLog
    base_lr: float
    steps_per_epoch: int
    total_epochs: int
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    hooks: list[Callable[[Trainer], None]] = field(default_factory=list)
    # With --time-budget: times the first steps, chooses the length, then guards the end.
    # None on a resumed run whose length the budget already chose.
    budget: TimeBudget | None = None
    scaler: torch.amp.GradScaler | None = None  # fp16 loss scaling (devices.grad_scaler)
    # (N, 2) int32 on the device: each training image's (height, width) in its slot (None: all
    # fill it); a step indexes it with the batch's indices, where they live.
    sizes: Tensor | None = None

    @property
    def batch_size(self) -> int:
        """The global batch the run trains with: the config's, or the whole (smaller) set that
        ``allow_smaller_batch`` allows (:func:`_check_batch`)."""
        return self.batches.global_batch

    @property
    def images(self) -> Tensor:
        """The training set's uint8 images ``(N, 3, L, L)``, where the batch source keeps them."""
        return self.batches.images

    def learning_rate(self) -> float:
        """The schedule's rate for the step at ``global_step``: linear warm-up, then cosine to 0
        over the run's steps (the run's length may change once, when a time budget fits it)."""
        total_steps = self.total_epochs * self.steps_per_epoch
        warmup = round(warmup_epochs_within(self.config.warmup_epochs, self.total_epochs,
                                            self.config.warmup_fraction) * self.steps_per_epoch)
        return warmup_cosine(self.global_step, total_steps, min(warmup, total_steps), self.base_lr)
