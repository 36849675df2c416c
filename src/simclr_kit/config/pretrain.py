"""The pretraining config: :class:`PretrainConfig` (and :class:`CheckConfig`, the distributed
check's, derived from it), and the data recipe rule.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from simclr_kit.config.data import AugmentConfig, DataConfig
from simclr_kit.config.fields import (ensure, flatten, from_dict, marked, one_of, recipe, setting,
                                      to_dict, unflagged)
from simclr_kit.config.optimizers import (LR_SCALINGS, OPTIMIZER_DEFAULTS, OPTIMIZERS, VIT_DEFAULTS,
                                          VIT_OPTIMIZER, OptimizerDefaults, _per_optimizer,
                                          is_vit_name, merge_pretrain)

BACKBONE_INITS = ("scratch", "imagenet")


@dataclass(frozen=True)
class PretrainConfig:
    """One SimCLR pretraining run. ``lr`` is the rate for a batch of 256, scaled to the global
    batch by ``lr_scaling``.

    The optimisation defaults (LARS at SimCLR's square-root rule, 0.075 x sqrt(B), and
    temperature 0.1) were chosen on validation in bench/RESULTS.md, "Encoder quality".
    """

    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    out: str | None = setting(None, "run directory; must not exist",
                              shown="runs/simclr-DATE-TIME", pinned_by_recipe=False)
    epochs: int = setting(100, "passes over the data", resumable=True, pinned_by_recipe=False)
    batch_size: int = setting(256, "global batch in images, divided over processes",
                              pinned_by_recipe=False)
    lr: float | None = setting(
        None, "learning rate for a batch of 256, scaled to the global batch by --lr-scaling",
        shown=f"the optimizer's: {_per_optimizer('lr')}")
    lr_scaling: str | None = setting(
        None, "'linear' (lr x B/256) or 'sqrt' (lr x sqrt(B/256), SimCLR's choice for small "
        "batches)", shown=f"the optimizer's: {_per_optimizer('lr_scaling')}")
    optimizer: str | None = setting(
        None, "'lars' (SimCLR), 'sgd', 'adam' (L2 weight decay) or 'adamw' (decoupled weight "
        "decay); warm-up then cosine, stepped per batch", shown="lars; adamw for a ViT backbone")
    momentum: float = setting(0.9, "momentum of lars and sgd")
    weight_decay: float | None = setting(
        None, "weight decay of the weights (never of biases, norms and embeddings)",
        shown=f"the optimizer's: {_per_optimizer('weight_decay')}")
    lars_eta: float = setting(0.001, "LARS trust coefficient: a layer moves by about lr x eta "
                                     "of its norm per step; larger learns faster, too large "
                                     "diverges")
    lars_clip: bool = setting(False, "cap each layer's LARS rate at the global rate "
                                     "(solo-learn's clip_lr)")
    warmup_epochs: float | None = setting(
        None, "linear warm-up length in epochs, at most --warmup-fraction of the run",
        shown=_per_optimizer("warmup_epochs"))
    warmup_fraction: float = setting(0.1, "longest warm-up as a fraction of the run: a 5-epoch "
                                          "run warms up for at most 0.5 epochs at 0.1")
    temperature: float = setting(0.1, "NT-Xent temperature: lower weighs the hardest negatives "
                                      "more (bench/RESULTS.md, \"Encoder quality\")")
    backbone: str = setting("resnet18", "any torchvision classification model, or timm/NAME for "
                                        "a timm model (pip install 'simclr-kit[timm]')")
    stem: str = setting("auto", "'auto' (CIFAR stem at <= 64 px), 'cifar' or 'imagenet'")
    init: str = setting("scratch", "'scratch', 'imagenet' (torchvision's or timm's weights) or "
                                   "a weights path")
    projection_dim: int = setting(256, "output size of the head")
    projection_hidden_dim: int | None = setting(None, "hidden size of the head",
                                                shown="the backbone's feature size")
    device: str = setting("auto", "'auto' (cuda, then mps, then cpu), 'cpu', 'cuda', 'mps'",
                          resumable=True)
    precision: str = setting("auto", "'auto' (bf16 autocast on CUDA, fp32 elsewhere), 'fp32', "
                                     "'bf16', 'fp16'")
    channels_last: bool = setting(True, "channels_last memory format")
    compile: bool | None = setting(  # None: devices.compile_by_default
        None, "torch.compile the model; the first step then takes up to a minute longer",
        shown="on with CUDA and Triton, off elsewhere")
    sync_bn: bool = setting(True, "SyncBatchNorm across GPUs under torchrun")
    stream: str = setting("auto", "training images: 'on' streams each batch from the decoded "
                                  "file (gathered ahead by a thread), 'off' holds the set whole "
                                  "(on the GPU), 'auto' streams a set over a quarter of the free "
                                  "GPU memory (on CPU: of the RAM)", resumable=True)
    seed: int = setting(0, "seed of weights, order and augmentation")
    checkpoint_every: int = setting(10, "epochs between kept checkpoints, 0 for only the last",
                                    resumable=True)
    checkpoint_every_steps: int = setting(
        0, "steps between rolling checkpoints, which replace each other; for long epochs on "
        "machines that may be taken away", shown="0, a rolling one every 5 minutes only",
        resumable=True)
    log_every: int = setting(10, "steps between metric lines", resumable=True)
    monitor_knn: int = setting(
        0, "run the kNN protocol every N epochs and after the last (k=200, T=0.1; keys: the "
        "labelled pretraining split, clean; queries: the evaluation split), logged as 'knn' "
        "records in metrics.jsonl and drawn in the report; costs about a sixth of an epoch "
        "each time", shown="0, off")
    time_budget: float | None = setting(
        None, "minutes of training (data decoding and evaluation not counted): the first steps "
        "are timed, then the epochs and the schedule are set to end inside it, replacing "
        "--epochs", shown="off")
    deterministic: bool = setting(False, "deterministic algorithms, slower")
    progress: bool = unflagged(True, "progress bars; the command line always shows them",
                               resumable=True)
    loggers: tuple[str, ...] = setting(
        (), "comma list of tensorboard, wandb, mlflow: copies of the metrics for those tools "
        "(metrics.jsonl is always written; each needs its library, e.g. pip install "
        "'simclr-kit[tensorboard]')", flag="--logger", resumable=True)
    allow_smaller_batch: bool = setting(False, "with fewer images than --batch-size, train on "
                                               "batches of all of them instead of stopping")

    def __post_init__(self) -> None:
        ensure(self.epochs >= 1, "epochs", "an integer >= 1", self.epochs)
        one_of(self, "stream", ("auto", "on", "off"), "stream setting")
        ensure(self.batch_size >= 2, "batch_size", "an integer >= 2 (NT-Xent needs negatives)",
               self.batch_size)
        if self.lr is not None:
            ensure(self.lr > 0 and math.isfinite(self.lr), "lr", "a finite number > 0", self.lr)
        if self.optimizer is not None:
            one_of(self, "optimizer", OPTIMIZERS, "optimizer")
        ensure(0 <= self.momentum < 1, "momentum", "in [0, 1)", self.momentum)
        if self.weight_decay is not None:
            ensure(self.weight_decay >= 0, "weight_decay", ">= 0", self.weight_decay)
        if self.lr_scaling is not None:
            one_of(self, "lr_scaling", LR_SCALINGS, "learning-rate scaling")
        ensure(0 < self.lars_eta and math.isfinite(self.lars_eta), "lars_eta", "a finite number > 0",
               self.lars_eta)
        if self.warmup_epochs is not None:
            ensure(self.warmup_epochs >= 0, "warmup_epochs", ">= 0", self.warmup_epochs)
        ensure(0 <= self.warmup_fraction <= 1, "warmup_fraction", "in [0, 1]", self.warmup_fraction)
        ensure(self.temperature > 0 and math.isfinite(self.temperature), "temperature",
               "a finite number > 0", self.temperature)
        one_of(self, "stem", ("auto", "cifar", "imagenet"), "stem")
        ensure(self.projection_dim >= 1, "projection_dim", "an integer >= 1", self.projection_dim)
        if self.projection_hidden_dim is not None:
            ensure(self.projection_hidden_dim >= 1, "projection_hidden_dim", "an integer >= 1",
                   self.projection_hidden_dim)
        one_of(self, "precision", ("auto", "fp32", "bf16", "fp16"), "precision")
        ensure(self.checkpoint_every >= 0, "checkpoint_every", "an integer >= 0 (0: only at the end)",
               self.checkpoint_every)
        ensure(self.checkpoint_every_steps >= 0, "checkpoint_every_steps",
               "an integer >= 0 (0: off)", self.checkpoint_every_steps)
        ensure(self.log_every >= 1, "log_every", "an integer >= 1", self.log_every)
        ensure(self.monitor_knn >= 0, "monitor_knn", "an integer >= 0 (0: off)", self.monitor_knn)
        if self.time_budget is not None:
            ensure(self.time_budget > 0, "time_budget", "> 0 minutes", self.time_budget)
        if self.device.split(":")[0] not in ("cpu", "cuda", "mps"):  # cuda:1 is a cuda device
            one_of(self, "device", ("auto", "cpu", "cuda", "cuda:N", "mps"), "device")

    def optimizer_defaults(self) -> tuple[str, OptimizerDefaults]:
        """The optimizer this config trains with and the defaults its ``None`` fields take:
        :data:`OPTIMIZER_DEFAULTS`, except that a ViT backbone (:func:`is_vit_name`) trains with
        :data:`VIT_OPTIMIZER` and :data:`VIT_DEFAULTS` unless another optimizer is named."""
        vit = is_vit_name(self.backbone)
        name = self.optimizer or (VIT_OPTIMIZER if vit else "lars")
        return name, VIT_DEFAULTS if vit and name == VIT_OPTIMIZER else OPTIMIZER_DEFAULTS[name]

    def resolved(self) -> PretrainConfig:
        """The same config with ``optimizer``, ``lr``, ``lr_scaling``, ``weight_decay`` and
        ``warmup_epochs`` filled in where they are ``None``, from :meth:`optimizer_defaults`:
        what a run records in its ``config.yaml``, so that a resume and a report see numbers."""
        name, defaults = self.optimizer_defaults()
        chosen = {"lr": self.lr, "lr_scaling": self.lr_scaling,
                  "weight_decay": self.weight_decay, "warmup_epochs": self.warmup_epochs}
        filled = {k: getattr(defaults, k) if v is None else v for k, v in chosen.items()}
        return dataclasses.replace(self, optimizer=name, **filled)

    @classmethod
    def from_recipe(cls, name: str, **overrides: Any) -> PretrainConfig:
        """A built-in recipe (``recipes/NAME.yaml``: ``digits``, ``cifar10``) with ``overrides``
        on top, as the command line builds it: ``PretrainConfig.from_recipe("digits", epochs=5)``.
        ``data`` and ``augment`` overrides may be dataclasses or dicts of their fields."""
        values = {k: to_dict(v) if dataclasses.is_dataclass(v) else v for k, v in overrides.items()}
        return from_dict(cls, merge_pretrain(recipe(name), values))


@dataclass(frozen=True)
class CheckConfig(PretrainConfig):
    """``simclr check-distributed``: ``nproc`` processes x ``batch_size / nproc`` images vs one
    process x ``batch_size``, one training step each
    (:mod:`simclr_kit.diagnostics.check_distributed`).

    A pretraining config: the step trains with its model, loss, augmentation and LARS fields.
    Below are the check's own fields, then the pretraining defaults it must change. Its flags
    are those of :data:`FLAGS`.
    """

    nproc: int = setting(2, "processes, one GPU each with cuda")
    image_size: int = setting(16, "pixels of the generated images")
    gather: str = unflagged("with-grad", "the all-gather NT-Xent uses; 'no-grad' is the known "
                            "bug, run to show that the check can fail (a hidden flag)")
    port: int | None = unflagged(None, "the process group's port on 127.0.0.1; None: a free one")
    # None: 8 images per process, so that the default splits evenly over any --nproc.
    batch_size: int | None = setting(  # type: ignore[assignment]
        None, "global batch B, divided over the processes", shown="8 per process")
    # The check starts gloo processes on the CPU or NCCL ones on cuda, nothing else.
    device: str = setting("auto", "'auto' (cuda if present), 'cpu' (gloo, BatchNorm per "
                                  "process) or 'cuda' (NCCL, SyncBatchNorm)")
    # One step at SimCLR's 0.3 x B/256 (the paper's linear rule) rather than the rate tuned for
    # learning: the check's tolerances were set on steps of this size.
    lr: float | None = setting(0.3, "learning rate for a batch of 256, scaled linearly to the "
                                    "global batch")

    # Its flags: its own fields and the pretraining fields that choose the model, the seed and
    # the BatchNorm; the API sets the others.
    FLAGS: ClassVar[tuple[str, ...]] = ("nproc", "batch_size", "device", "backbone",
                                        "image_size", "seed", "sync_bn")

    def __post_init__(self) -> None:
        if self.batch_size is None:  # the pretraining checks, on the batch None stands for
            dataclasses.replace(self, batch_size=self.global_batch)
        else:
            super().__post_init__()

    @property
    def global_batch(self) -> int:
        return self.batch_size if self.batch_size is not None else 8 * self.nproc

    @property
    def global_bn(self) -> bool:
        """Whether the distributed run normalises over the global batch (SyncBatchNorm)."""
        return self.device == "cuda" and self.sync_bn


def data_recipe(data: str | None) -> dict[str, Any]:
    """The recipe a config on ``data`` starts from when it names no config file: the digits
    recipe on the embedded digits (``data`` "digits", or not given), none on other data."""
    return recipe("digits") if data in (None, "digits") else {}


def with_data_recipe(cfg: PretrainConfig) -> tuple[PretrainConfig, list[str]]:
    """A built config with :func:`data_recipe` applied, as the command line applies it to its
    flags: a config that leaves every field the recipe pins (``pinned_by_recipe``, so not the
    dataset, the epochs, the batch or the run directory) at its generic default takes the
    recipe's values for them; returns the config and the fields taken. A config that chose any
    of them itself, or other data, is returned as is."""
    unpinned = set(marked(PretrainConfig, "pinned_by_recipe", False))
    pinned = {k: v for k, v in flatten(data_recipe(cfg.data.data)).items() if k not in unpinned}
    generic, current = flatten(to_dict(PretrainConfig())), flatten(to_dict(cfg))
    if not pinned or any(current[k] != generic[k] for k in pinned):
        return cfg, []  # the caller chose at least one of them: keep the config whole
    values = to_dict(cfg)
    for key, value in pinned.items():
        *parents, leaf = key.split(".")
        node = values
        for part in parents:
            node = node[part]
        node[leaf] = value
    return from_dict(PretrainConfig, values), list(pinned)
