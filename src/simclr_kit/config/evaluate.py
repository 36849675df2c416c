"""The downstream configs: :class:`EvalConfig` (the protocols of ``simclr evaluate``) and
:class:`ClassifierConfig` (``simclr train-classifier``, on the linear probe's fields).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from simclr_kit.config.fields import ensure, one_of, setting


@dataclass(frozen=True)
class EvalConfig:
    """Downstream protocols on a frozen (or fine-tuned) encoder; defaults are the standard ones.

    ``linear_min_steps``: the linear probe (and each label-fraction probe) trains at least this
    many Adam steps, adding epochs when ``linear_epochs`` gives fewer: 100 epochs of 1% of
    CIFAR-10 are only 200 steps, which measures the step count rather than the features (see
    ``evaluation/linear.py``). 0 keeps the plain epoch count.
    """

    protocols: tuple[str, ...] = setting(("linear", "knn"),
                                         "comma list of knn, linear, finetune, fractions")
    knn_k: tuple[int, ...] = setting((200,), "neighbours, a comma list to sweep")
    knn_temperature: float = setting(0.1, "kNN vote temperature")
    linear_epochs: int = setting(100, "linear probe epochs")
    linear_lr: float = setting(1e-3, "linear probe Adam rate")
    linear_batch_size: int = setting(256, "linear probe: features per step")
    linear_weight_decay: float = setting(0.0, "linear probe: Adam weight decay")
    linear_min_steps: int = setting(
        2000, "train every linear probe (label fractions too) for at least this many steps, "
        "adding epochs: 100 epochs of a 500-image subset are only 200 steps, too few to "
        "converge; 0 keeps the epochs")
    probe_augment: bool = setting(
        False, "train the linear probe on augmented views (crop + flip) through the frozen "
        "backbone instead of cached features: a backbone forward per batch, much slower")
    finetune_epochs: int = setting(30, "fine-tune protocol: epochs over the train split")
    finetune_lr: float = setting(1e-3, "fine-tune: Adam rate of the new head, cosine to 0")
    finetune_backbone_lr_mult: float = setting(
        0.1, "fine-tune: backbone rate = head rate x this; lower it if accuracy falls during "
        "the first epochs")
    finetune_batch_size: int = setting(128, "fine-tune: images per step")
    finetune_weight_decay: float = setting(0.0, "fine-tune: Adam weight decay")
    seeds: int = setting(3, "runs per label-fraction subset, reported as mean and std")
    fractions: tuple[float, ...] = setting((0.01, 0.1, 1.0), "comma list of label fractions for "
                                           "the fractions protocol, class-stratified")
    shots: tuple[int, ...] = setting((1, 5, 10), "comma list of examples per class for the "
                                     "fractions protocol's k-shot subsets")
    baselines: tuple[str, ...] = setting(
        (), "also evaluate 'random' and/or 'imagenet' encoders under the same protocols",
        flag="--baseline", shown="none for evaluate, random for run")
    batch_size: int = setting(512, "feature extraction: images per forward pass",
                              flag="--eval-batch-size")
    seed: int = setting(0, "seed of the probes", flag="--eval-seed")

    def __post_init__(self) -> None:
        one_of(self, "protocols", ("knn", "linear", "finetune", "fractions"), "protocol")
        for k in self.knn_k:
            ensure(k >= 1, "knn_k", "integers >= 1", self.knn_k)
        ensure(self.knn_temperature > 0, "knn_temperature", "> 0", self.knn_temperature)
        for name in ("linear_epochs", "finetune_epochs", "seeds"):
            ensure(getattr(self, name) >= 1, name, "an integer >= 1", getattr(self, name))
        for name in ("linear_lr", "finetune_lr", "finetune_backbone_lr_mult"):
            ensure(getattr(self, name) > 0, name, "> 0", getattr(self, name))
        for name in ("linear_batch_size", "finetune_batch_size", "batch_size"):
            ensure(getattr(self, name) >= 1, name, "an integer >= 1", getattr(self, name))
        one_of(self, "baselines", ("random", "imagenet"), "baseline")
        ensure(self.linear_min_steps >= 0, "linear_min_steps", "an integer >= 0 (0: off)",
               self.linear_min_steps)
        for name in ("linear_weight_decay", "finetune_weight_decay"):
            ensure(getattr(self, name) >= 0, name, ">= 0", getattr(self, name))
        for f in self.fractions:
            ensure(0 < f <= 1, "fractions", "label fractions in (0, 1]", self.fractions)
        for k in self.shots:
            ensure(k >= 1, "shots", "integers >= 1 (examples per class)", self.shots)
        ensure(bool(self.fractions or self.shots) or "fractions" not in self.protocols,
               "fractions/shots", "not both empty with the fractions protocol",
               (self.fractions, self.shots))


def _probe(name: str, help: str, **kwargs: Any) -> Any:
    """A classifier field whose default is that of the linear probe's field ``name``
    (:class:`EvalConfig`): a frozen head trains as ``evaluate``'s probe does."""
    return setting(EvalConfig.__dataclass_fields__[name].default, help, **kwargs)


_PROBE_EPOCHS, _PROBE_BATCH = (EvalConfig.__dataclass_fields__[name].default
                               for name in ("linear_epochs", "linear_batch_size"))


@dataclass(frozen=True)
class ClassifierConfig:
    """The downstream classifier: a new head on the extracted backbone, cross-entropy and Adam.
    With a frozen backbone it trains as ``evaluate``'s linear probe: the fields they share take
    the probe's defaults (:func:`_probe`)."""

    head: str = setting("linear", "'linear' or 'mlp'")
    finetune: bool = setting(False, "train the whole network", shown="False, a frozen backbone")
    epochs: int | None = setting(None, "passes over the training split",
                                 shown=f"{_PROBE_EPOCHS} frozen, as evaluate's linear probe; 30 "
                                 "with --finetune")
    lr: float = _probe("linear_lr", "Adam rate of the head")
    backbone_lr_mult: float = _probe("finetune_backbone_lr_mult",
                                     "backbone rate = lr x this, with --finetune")
    batch_size: int | None = setting(None, "images per step",
                                     shown=f"{_PROBE_BATCH} frozen, as evaluate's linear probe; "
                                     "64 with --finetune")
    weight_decay: float = _probe("linear_weight_decay", "Adam weight decay")
    hidden_dim: int = setting(512, "hidden units of the mlp head")
    seed: int = _probe("seed", "seed of the head's weights and of the batch order")
    min_steps: int = _probe("linear_min_steps", "frozen backbone: train at least this many Adam "
                            "steps, adding epochs, as evaluate's --linear-min-steps; 0 keeps the "
                            "epochs")

    def __post_init__(self) -> None:
        one_of(self, "head", ("linear", "mlp"), "head")
        ensure(self.epochs is None or self.epochs >= 1, "epochs", "an integer >= 1", self.epochs)
        ensure(self.lr > 0, "lr", "> 0", self.lr)
        ensure(self.backbone_lr_mult > 0, "backbone_lr_mult", "> 0", self.backbone_lr_mult)
        ensure(self.batch_size is None or self.batch_size >= 1, "batch_size", "an integer >= 1",
               self.batch_size)
        ensure(self.weight_decay >= 0, "weight_decay", ">= 0", self.weight_decay)
        ensure(self.min_steps >= 0, "min_steps", "an integer >= 0 (0: off)", self.min_steps)
