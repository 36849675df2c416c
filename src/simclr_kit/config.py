"""The configs: frozen, validated dataclasses for pretraining, data, augmentation, evaluation,
the distributed check and the downstream classifier.

Each field is declared once, here: its type, its default and (with
:func:`~simclr_kit.config_fields.setting`) what it means, with its units; the command-line
flags are derived from these declarations (:mod:`simclr_kit.flags`), and YAML files and recipes
are read into them by :mod:`simclr_kit.config_fields` (whose functions are importable from
here too). Every value is range-checked in ``__post_init__`` so that a bad one
fails with one line naming the field and its allowed range before any data is read. Whether the
machine can serve a value (a backbone that torchvision or timm knows, a logger's library) is
checked where the run is set up (:func:`simclr_kit.trainer.prepare`, before any data is read),
not here: this module depends on nothing above it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from simclr_kit.config_fields import (  # noqa: F401 - the config API: simclr_kit.config.*
    ConfigError, config_source, flag_name, flatten, from_dict, load_yaml, marked, merge,
    normalize_keys, recipe, recipe_names, setting, to_dict, to_yaml, unflagged, unknown_choice)

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
    # SimCLR's LARS (appendix B.1: weight decay 1e-6, 10 warm-up epochs) at the rate measured
    # for small batches (bench/RESULTS.md, "Encoder quality").
    "lars": OptimizerDefaults(2.83, "sqrt", 1e-6),
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
    ``"lars 2.83, sgd 0.12, adam/adamw 0.001; 0.00015 for a ViT's adamw"``."""
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


def _check(ok: bool, name: str, allowed: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{name} = {value!r} is out of range: must be {allowed}")


def _one_of(config: Any, name: str, choices: tuple[str, ...], what: str) -> None:
    """A choice-valued field (each item of a tuple field): an unknown value names the flag, the
    choices and the closest one."""
    value = getattr(config, name)
    for item in value if isinstance(value, tuple) else (value,):
        if item not in choices:
            raise unknown_choice(what, item, choices, flag_name(type(config), name))


def _prob(name: str, value: float | None) -> None:
    if value is not None:
        _check(0.0 <= value <= 1.0, name, "a probability in [0, 1]", value)


@dataclass(frozen=True)
class AugmentConfig:
    """SimCLR view augmentation (Chen et al. 2020, appendix A); ``None`` means size-dependent.

    Colour jitter strength s gives brightness/contrast/saturation 0.8 s and hue 0.2 s; the paper
    uses s=0.5 for CIFAR-10 and s=1.0 for ImageNet, so ``None`` picks 0.5 at <= 64 px, else 1.0.
    Blur is off at <= 32 px (it destroys tiny images) and p=0.5 above.
    """

    crop_scale_min: float = setting(0.08, "smallest crop area, a fraction of the image's")
    crop_scale_max: float = setting(1.0, "largest crop area, a fraction of the image's")
    crop_ratio_min: float = setting(3 / 4, "smallest crop aspect ratio, width / height")
    crop_ratio_max: float = setting(4 / 3, "largest crop aspect ratio, width / height")
    flip_p: float = setting(0.5, "horizontal flip probability")
    jitter_p: float = setting(0.8, "colour jitter probability")
    jitter_strength: float | None = setting(
        None, "colour strength s: brightness, contrast, saturation 0.8 s, hue 0.2 s",
        shown="0.5 at <= 64 px, 1.0 above")
    grayscale_p: float = setting(0.2, "grayscale probability")
    blur_p: float | None = setting(None, "Gaussian blur probability",
                                   shown="0 at <= 32 px, 0.5 above")
    blur_sigma_min: float = setting(0.1, "smallest blur sigma, in pixels")
    blur_sigma_max: float = setting(2.0, "largest blur sigma, in pixels")
    solarize_p: float = setting(0.0, "solarize probability")
    solarize_threshold: float = setting(0.5, "solarize inverts pixels >= this, on a 0-1 scale")

    def __post_init__(self) -> None:
        _check(0 < self.crop_scale_min <= self.crop_scale_max <= 1, "augment.crop_scale_min/max",
               "0 < min <= max <= 1", (self.crop_scale_min, self.crop_scale_max))
        _check(0 < self.crop_ratio_min <= self.crop_ratio_max, "augment.crop_ratio_min/max",
               "0 < min <= max", (self.crop_ratio_min, self.crop_ratio_max))
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p"):
            _prob(f"augment.{name}", getattr(self, name))
        if self.jitter_strength is not None:
            _check(0 <= self.jitter_strength <= 1.25, "augment.jitter_strength", "in [0, 1.25]",
                   self.jitter_strength)
        _check(0 < self.blur_sigma_min <= self.blur_sigma_max, "augment.blur_sigma_min/max",
               "0 < min <= max", (self.blur_sigma_min, self.blur_sigma_max))
        _check(0 <= self.solarize_threshold <= 1, "augment.solarize_threshold", "in [0, 1]",
               self.solarize_threshold)

    def resolved(self, image_size: int) -> AugmentConfig:
        """The same config with the size-dependent ``None`` defaults filled in."""
        strength = self.jitter_strength
        if strength is None:
            strength = 0.5 if image_size <= 64 else 1.0
        blur_p = self.blur_p
        if blur_p is None:
            blur_p = 0.0 if image_size <= 32 else 0.5
        return dataclasses.replace(self, jitter_strength=strength, blur_p=blur_p)

    @property
    def jitter(self) -> tuple[float, float, float, float]:
        """(brightness, contrast, saturation, hue) from the strength s: 0.8s, 0.8s, 0.8s, 0.2s."""
        s = 0.5 if self.jitter_strength is None else self.jitter_strength
        return 0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from and how they are read."""

    data: str = setting("digits", "images: 'digits' (embedded), a hub id, a save_to_disk folder, "
                        "a Parquet folder or glob, or an image folder", shown="",
                        pinned_by_recipe=False)
    data_config: str | None = setting(None, "hub dataset configuration name", shown="none")
    revision: str | None = setting(None, "hub dataset revision: branch, tag or commit",
                                   shown="the main branch")
    train_split: str | None = setting(None, "split to train on",
                                      shown="'train' or the only split")
    eval_split: str | None = setting(None, "split to evaluate on", shown="'validation', else "
                                     "'test', else a stratified part of train")
    image_column: str | None = setting(None, "image column", shown="the Image feature")
    label_column: str | None = setting(None, "label column", shown="the ClassLabel feature")
    image_size: int | None = setting(None, "working size in pixels", shown="the images' own "
                                     "size when they share one, up to 224")
    val_fraction: float = setting(0.2, "part split off for validation when there is a single "
                                       "split")
    split_seed: int = setting(0, "seed of that split")
    bad_images: str = setting("skip", "unreadable images: 'skip' (counted and listed) or 'error'")
    store_size: int | None = setting(
        None, "pretraining: the longer side, in pixels, of the stored training images (whole "
        "images, aspect ratio kept, never enlarged); the random resized crops are drawn over "
        "each whole image, so a larger side gives sharper views and a larger decoded file",
        shown="2 x --image-size up to a multiple of 8 (448 for 224), or the largest image's "
        "longer side when smaller")
    crop_fraction: float | None = setting(
        None, "evaluation crop above 64 px: resize the shorter side to --image-size / this, "
        "then keep the centre --image-size square (0.875: 256 -> 224); 1 keeps the whole "
        "shorter side. Used by the kNN monitor, evaluate, embed, train-classifier and predict",
        shown="the run's recorded value, else 0.875")
    decode_workers: int | None = setting(None, "processes that decode the images, once per "
                                               "machine, into the shared cache file",
                                         shown="the machine's cores", resumable=True)
    cache_dir: str | None = unflagged(None, "not read by anything; accepted so that config "
                                            "files that name it still load")

    def __post_init__(self) -> None:
        if self.image_size is not None:
            _check(8 <= self.image_size <= 1024, "image_size", "an integer in [8, 1024] pixels",
                   self.image_size)
        _check(0 < self.val_fraction < 1, "val_fraction", "in (0, 1)", self.val_fraction)
        _one_of(self, "bad_images", ("skip", "error"), "bad-images policy")
        if self.store_size is not None:
            _check(8 <= self.store_size <= 2048, "store_size", "an integer in [8, 2048] pixels",
                   self.store_size)
        if self.crop_fraction is not None:
            _check(0.5 <= self.crop_fraction <= 1, "crop_fraction", "in [0.5, 1]",
                   self.crop_fraction)
        if self.decode_workers is not None:
            _check(self.decode_workers >= 1, "decode_workers", "at least 1", self.decode_workers)


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
        _one_of(self, "protocols", ("knn", "linear", "finetune", "fractions"), "protocol")
        for k in self.knn_k:
            _check(k >= 1, "knn_k", "integers >= 1", self.knn_k)
        _check(self.knn_temperature > 0, "knn_temperature", "> 0", self.knn_temperature)
        for name in ("linear_epochs", "finetune_epochs", "seeds"):
            _check(getattr(self, name) >= 1, name, "an integer >= 1", getattr(self, name))
        for name in ("linear_lr", "finetune_lr", "finetune_backbone_lr_mult"):
            _check(getattr(self, name) > 0, name, "> 0", getattr(self, name))
        for name in ("linear_batch_size", "finetune_batch_size", "batch_size"):
            _check(getattr(self, name) >= 1, name, "an integer >= 1", getattr(self, name))
        _one_of(self, "baselines", ("random", "imagenet"), "baseline")
        _check(self.linear_min_steps >= 0, "linear_min_steps", "an integer >= 0 (0: off)",
               self.linear_min_steps)
        for name in ("linear_weight_decay", "finetune_weight_decay"):
            _check(getattr(self, name) >= 0, name, ">= 0", getattr(self, name))
        for f in self.fractions:
            _check(0 < f <= 1, "fractions", "label fractions in (0, 1]", self.fractions)
        for k in self.shots:
            _check(k >= 1, "shots", "integers >= 1 (examples per class)", self.shots)
        _check(bool(self.fractions or self.shots) or "fractions" not in self.protocols,
               "fractions/shots", "not both empty with the fractions protocol",
               (self.fractions, self.shots))


BACKBONE_INITS = ("scratch", "imagenet")


@dataclass(frozen=True)
class PretrainConfig:
    """One SimCLR pretraining run. ``lr`` is the rate for a batch of 256, scaled to the global
    batch by ``lr_scaling``.

    The optimisation defaults (LARS at 2.83 x sqrt(B / 256), the paper's rule for small batches,
    and temperature 0.1) learned best of those measured in bench/RESULTS.md, "Encoder quality".
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
        _check(self.epochs >= 1, "epochs", "an integer >= 1", self.epochs)
        _one_of(self, "stream", ("auto", "on", "off"), "stream setting")
        _check(self.batch_size >= 2, "batch_size", "an integer >= 2 (NT-Xent needs negatives)",
               self.batch_size)
        if self.lr is not None:
            _check(self.lr > 0 and math.isfinite(self.lr), "lr", "a finite number > 0", self.lr)
        if self.optimizer is not None:
            _one_of(self, "optimizer", OPTIMIZERS, "optimizer")
        _check(0 <= self.momentum < 1, "momentum", "in [0, 1)", self.momentum)
        if self.weight_decay is not None:
            _check(self.weight_decay >= 0, "weight_decay", ">= 0", self.weight_decay)
        if self.lr_scaling is not None:
            _one_of(self, "lr_scaling", LR_SCALINGS, "learning-rate scaling")
        _check(0 < self.lars_eta and math.isfinite(self.lars_eta), "lars_eta", "a finite number > 0",
               self.lars_eta)
        if self.warmup_epochs is not None:
            _check(self.warmup_epochs >= 0, "warmup_epochs", ">= 0", self.warmup_epochs)
        _check(0 <= self.warmup_fraction <= 1, "warmup_fraction", "in [0, 1]", self.warmup_fraction)
        _check(self.temperature > 0 and math.isfinite(self.temperature), "temperature",
               "a finite number > 0", self.temperature)
        _one_of(self, "stem", ("auto", "cifar", "imagenet"), "stem")
        _check(self.projection_dim >= 1, "projection_dim", "an integer >= 1", self.projection_dim)
        if self.projection_hidden_dim is not None:
            _check(self.projection_hidden_dim >= 1, "projection_hidden_dim", "an integer >= 1",
                   self.projection_hidden_dim)
        _one_of(self, "precision", ("auto", "fp32", "bf16", "fp16"), "precision")
        _check(self.checkpoint_every >= 0, "checkpoint_every", "an integer >= 0 (0: only at the end)",
               self.checkpoint_every)
        _check(self.checkpoint_every_steps >= 0, "checkpoint_every_steps",
               "an integer >= 0 (0: off)", self.checkpoint_every_steps)
        _check(self.log_every >= 1, "log_every", "an integer >= 1", self.log_every)
        _check(self.monitor_knn >= 0, "monitor_knn", "an integer >= 0 (0: off)", self.monitor_knn)
        if self.time_budget is not None:
            _check(self.time_budget > 0, "time_budget", "> 0 minutes", self.time_budget)
        if self.device.split(":")[0] not in ("cpu", "cuda", "mps"):  # cuda:1 is a cuda device
            _one_of(self, "device", ("auto", "cpu", "cuda", "cuda:N", "mps"), "device")

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
    process x ``batch_size``, one training step each (:mod:`simclr_kit.check_distributed`).

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
        _one_of(self, "head", ("linear", "mlp"), "head")
        _check(self.epochs is None or self.epochs >= 1, "epochs", "an integer >= 1", self.epochs)
        _check(self.lr > 0, "lr", "> 0", self.lr)
        _check(self.backbone_lr_mult > 0, "backbone_lr_mult", "> 0", self.backbone_lr_mult)
        _check(self.batch_size is None or self.batch_size >= 1, "batch_size", "an integer >= 1",
               self.batch_size)
        _check(self.weight_decay >= 0, "weight_decay", ">= 0", self.weight_decay)
        _check(self.min_steps >= 0, "min_steps", "an integer >= 0 (0: off)", self.min_steps)


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


def layered_data(recorded: dict[str, Any] | None,
                 given: DataConfig | str | dict[str, Any] | None) -> DataConfig | None:
    """The data config from ``given`` (a DataConfig, a ``--data`` string, or a dict of
    DataConfig fields) laid over ``recorded`` (the fields a run recorded); None when neither
    names a dataset. A ``given`` that names another dataset starts from the defaults instead:
    the recorded columns and splits belong to the recorded dataset."""
    if isinstance(given, DataConfig):
        return given
    overrides = normalize_keys(DataConfig, {"data": given} if isinstance(given, str) else
                               dict(given or {}), "data")
    base = normalize_keys(DataConfig, dict(recorded or {}), "data")
    if "data" in overrides and overrides["data"] != base.get("data"):
        base = {}
    if "data" not in base and "data" not in overrides:
        return None
    return from_dict(DataConfig, merge(base, overrides), "data")
