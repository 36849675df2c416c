"""Frozen, validated configuration: dataclass defaults, YAML files and command-line overrides.

Every field is checked in ``__post_init__`` so a bad value fails with one line naming the field
and its allowed range before any data is read.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from simclr_kit.errors import UserError

# How the rate for a batch of 256 becomes the run's rate (see optim.effective_lr).
LR_SCALINGS = ("linear", "sqrt")


class ConfigError(UserError):
    """A configuration value outside its allowed range."""


def _check(ok: bool, name: str, allowed: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{name} = {value!r} is out of range: must be {allowed}")


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

    crop_scale_min: float = 0.08
    crop_scale_max: float = 1.0
    crop_ratio_min: float = 3 / 4
    crop_ratio_max: float = 4 / 3
    flip_p: float = 0.5
    jitter_p: float = 0.8
    jitter_strength: float | None = None
    grayscale_p: float = 0.2
    blur_p: float | None = None
    blur_sigma_min: float = 0.1
    blur_sigma_max: float = 2.0
    solarize_p: float = 0.0
    solarize_threshold: float = 0.5

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

    data: str = "digits"
    data_config: str | None = None
    revision: str | None = None
    train_split: str | None = None
    eval_split: str | None = None
    image_column: str | None = None
    label_column: str | None = None
    image_size: int | None = None
    val_fraction: float = 0.2
    split_seed: int = 0
    bad_images: str = "skip"
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if self.image_size is not None:
            _check(8 <= self.image_size <= 1024, "image_size", "an integer in [8, 1024] pixels",
                   self.image_size)
        _check(0 < self.val_fraction < 1, "val_fraction", "in (0, 1)", self.val_fraction)
        _check(self.bad_images in ("skip", "error"), "bad_images", "'skip' or 'error'",
               self.bad_images)


@dataclass(frozen=True)
class EvalConfig:
    """Downstream protocols on a frozen (or fine-tuned) encoder; defaults are the standard ones.

    ``linear_min_steps``: the linear probe (and each label-fraction probe) trains at least this
    many Adam steps, adding epochs when ``linear_epochs`` gives fewer: 100 epochs of 1% of
    CIFAR-10 are only 200 steps, which measures the step count rather than the features (see
    ``evaluation/linear.py``). 0 keeps the plain epoch count.
    """

    protocols: tuple[str, ...] = ("linear", "knn")
    knn_k: tuple[int, ...] = (200,)
    knn_temperature: float = 0.1
    linear_epochs: int = 100
    linear_lr: float = 1e-3
    linear_batch_size: int = 256
    linear_weight_decay: float = 0.0
    linear_min_steps: int = 2000
    probe_augment: bool = False
    finetune_epochs: int = 30
    finetune_lr: float = 1e-3
    finetune_backbone_lr_mult: float = 0.1
    finetune_batch_size: int = 128
    finetune_weight_decay: float = 0.0
    seeds: int = 3
    fractions: tuple[float, ...] = (0.01, 0.1, 1.0)
    shots: tuple[int, ...] = (1, 5, 10)
    baselines: tuple[str, ...] = ()
    batch_size: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        allowed = {"knn", "linear", "finetune", "fractions"}
        for p in self.protocols:
            _check(p in allowed, "protocols", f"a subset of {sorted(allowed)}", self.protocols)
        for k in self.knn_k:
            _check(k >= 1, "knn_k", "integers >= 1", self.knn_k)
        _check(self.knn_temperature > 0, "knn_temperature", "> 0", self.knn_temperature)
        for name in ("linear_epochs", "finetune_epochs", "seeds"):
            _check(getattr(self, name) >= 1, name, "an integer >= 1", getattr(self, name))
        for name in ("linear_lr", "finetune_lr", "finetune_backbone_lr_mult"):
            _check(getattr(self, name) > 0, name, "> 0", getattr(self, name))
        for name in ("linear_batch_size", "finetune_batch_size", "batch_size"):
            _check(getattr(self, name) >= 1, name, "an integer >= 1", getattr(self, name))
        for b in self.baselines:
            _check(b in ("random", "imagenet"), "baselines", "'random' and/or 'imagenet'",
                   self.baselines)
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

    The optimisation defaults were chosen from a table of measurements (bench/RESULTS.md,
    "Encoder quality"): LARS at 2.83 x sqrt(B / 256) (2.0 at batch 128; the paper's square-root
    rule, which it recommends for small batches) with SimCLR's temperature 0.1 learned best at
    small batch and short budgets (0.2 was level, 0.5 worse), ahead of lightly 1.6's CIFAR-10
    recipe on both kNN and the linear probe.
    """

    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    out: str | None = None
    epochs: int = 100
    batch_size: int = 256
    lr: float = 2.83
    lr_scaling: str = "sqrt"
    optimizer: str = "lars"
    momentum: float = 0.9
    weight_decay: float = 1e-6
    lars_eta: float = 0.001
    lars_clip: bool = False
    warmup_epochs: float = 10.0
    warmup_fraction: float = 0.1
    temperature: float = 0.1
    backbone: str = "resnet18"
    stem: str = "auto"
    init: str = "scratch"
    projection_dim: int = 256
    projection_hidden_dim: int | None = None
    device: str = "auto"
    precision: str = "auto"
    channels_last: bool = True
    compile: bool | None = None  # None: on with CUDA (see devices.compile_by_default)
    sync_bn: bool = True
    seed: int = 0
    checkpoint_every: int = 10
    checkpoint_every_steps: int = 0
    log_every: int = 10
    monitor_knn: int = 0
    time_budget: float | None = None
    deterministic: bool = False
    progress: bool = True
    loggers: tuple[str, ...] = ()
    allow_smaller_batch: bool = False

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "epochs", "an integer >= 1", self.epochs)
        _check(self.batch_size >= 2, "batch_size", "an integer >= 2 (NT-Xent needs negatives)",
               self.batch_size)
        _check(self.lr > 0 and math.isfinite(self.lr), "lr", "a finite number > 0", self.lr)
        _check(self.optimizer in ("lars", "sgd", "adam"), "optimizer", "'lars', 'sgd' or 'adam'",
               self.optimizer)
        _check(0 <= self.momentum < 1, "momentum", "in [0, 1)", self.momentum)
        _check(self.weight_decay >= 0, "weight_decay", ">= 0", self.weight_decay)
        _check(self.lr_scaling in LR_SCALINGS, "lr_scaling", " or ".join(map(repr, LR_SCALINGS)),
               self.lr_scaling)
        _check(0 < self.lars_eta and math.isfinite(self.lars_eta), "lars_eta", "a finite number > 0",
               self.lars_eta)
        _check(self.warmup_epochs >= 0, "warmup_epochs", ">= 0", self.warmup_epochs)
        _check(0 <= self.warmup_fraction <= 1, "warmup_fraction", "in [0, 1]", self.warmup_fraction)
        _check(self.temperature > 0 and math.isfinite(self.temperature), "temperature",
               "a finite number > 0", self.temperature)
        _check(self.stem in ("auto", "cifar", "imagenet"), "stem", "'auto', 'cifar' or 'imagenet'",
               self.stem)
        _check(self.projection_dim >= 1, "projection_dim", "an integer >= 1", self.projection_dim)
        if self.projection_hidden_dim is not None:
            _check(self.projection_hidden_dim >= 1, "projection_hidden_dim", "an integer >= 1",
                   self.projection_hidden_dim)
        _check(self.precision in ("auto", "fp32", "bf16", "fp16"), "precision",
               "'auto', 'fp32', 'bf16' or 'fp16'", self.precision)
        _check(self.checkpoint_every >= 0, "checkpoint_every", "an integer >= 0 (0: only at the end)",
               self.checkpoint_every)
        _check(self.checkpoint_every_steps >= 0, "checkpoint_every_steps",
               "an integer >= 0 (0: off)", self.checkpoint_every_steps)
        _check(self.log_every >= 1, "log_every", "an integer >= 1", self.log_every)
        _check(self.monitor_knn >= 0, "monitor_knn", "an integer >= 0 (0: off)", self.monitor_knn)
        if self.time_budget is not None:
            _check(self.time_budget > 0, "time_budget", "> 0 minutes", self.time_budget)
        _check(self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda", "mps"),
               "device", "'auto', 'cpu', 'cuda[:N]' or 'mps'", self.device)
        from simclr_kit.models import check_backbone_name
        from simclr_kit.report.loggers import check_loggers

        check_backbone_name(self.backbone)
        check_loggers(self.loggers)  # a missing library fails now, not after data decoding

    @classmethod
    def from_recipe(cls, name: str, **overrides: Any) -> PretrainConfig:
        """A built-in recipe (``recipes/NAME.yaml``: ``digits``, ``cifar10``) with ``overrides``
        on top, as the command line builds it: ``PretrainConfig.from_recipe("digits", epochs=5)``.
        ``data`` and ``augment`` overrides may be dataclasses or dicts of their fields."""
        values = {k: to_dict(v) if dataclasses.is_dataclass(v) else v for k, v in overrides.items()}
        return from_dict(cls, merge(recipe(name), values))


@dataclass(frozen=True)
class ClassifierConfig:
    """The downstream classifier: a new head on the extracted backbone, cross-entropy and Adam."""

    head: str = "linear"
    finetune: bool = False
    epochs: int = 30
    lr: float = 1e-3
    backbone_lr_mult: float = 0.1
    batch_size: int = 64
    weight_decay: float = 0.0
    hidden_dim: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.head in ("linear", "mlp"), "head", "'linear' or 'mlp'", self.head)
        _check(self.epochs >= 1, "epochs", "an integer >= 1", self.epochs)
        _check(self.lr > 0, "lr", "> 0", self.lr)
        _check(self.backbone_lr_mult > 0, "backbone_lr_mult", "> 0", self.backbone_lr_mult)
        _check(self.batch_size >= 1, "batch_size", "an integer >= 1", self.batch_size)
        _check(self.weight_decay >= 0, "weight_decay", ">= 0", self.weight_decay)


C = TypeVar("C")
_NESTED: dict[str, type] = {"data": DataConfig, "augment": AugmentConfig}


def _typed(value: Any, hint: Any) -> tuple[bool, Any]:
    """(whether ``value`` fits the annotation ``hint``, the value converted to it)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        for arm in typing.get_args(hint):
            ok, converted = (value is None, None) if arm is type(None) else _typed(value, arm)
            if ok:
                return True, converted
        return False, value
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, (list, tuple)):
            return False, value
        checked = [_typed(v, typing.get_args(hint)[0]) for v in value]
        return all(ok for ok, _ in checked), tuple(v for _, v in checked)
    if hint is float and isinstance(value, str):
        try:  # PyYAML reads 3e-4 (no dot) as text, not as a number
            return True, float(value)
        except ValueError:
            return False, value
    if hint is float:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        return number, float(value) if number else value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint in (bool, str):
        return isinstance(value, hint), value
    return True, value


def _field_names(cls: type) -> list[str]:
    return [f.name for f in fields(cls)]  # type: ignore[arg-type]


def normalize_keys(cls: type, values: dict[str, Any], where: str = "config") -> dict[str, Any]:
    """``values`` with the keys spelled as the dataclass fields, for files written like flags.

    A key may use the flag's dashes (``batch-size``). In a pretraining config the data and
    augmentation fields may also stand at the top level, as their flags do (``image_size: 32``,
    ``flip_p: 0``), and ``data: NAME`` means ``data: {data: NAME}``. A field given twice
    (``batch-size`` and ``batch_size``, or ``image_size`` and ``data.image_size``) is an error
    rather than a guess. Unknown keys are left for :func:`from_dict` to name.
    """
    if not isinstance(values, dict):
        return values
    out: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for key, value in values.items():
        name = key.replace("-", "_") if isinstance(key, str) else key
        if name in out:
            raise ConfigError(f"{where}: {name!r} is given twice ({spelled[name]!r} and {key!r})")
        out[name], spelled[name] = value, key
    if cls is not PretrainConfig:
        return out
    if isinstance(out.get("data"), str):
        out["data"] = {"data": out["data"]}
    for section, nested in _NESTED.items():
        if isinstance(out.get(section), dict):
            out[section] = normalize_keys(nested, out[section], f"{where}.{section}")
    top = set(_field_names(PretrainConfig))
    for name in [k for k in out if k not in top]:
        sections = [s for s, nested in _NESTED.items() if name in _field_names(nested)]
        if len(sections) != 1 or not isinstance(out.get(sections[0], {}), dict):
            continue  # unknown, or a section of the wrong type: from_dict names the problem
        section = out.setdefault(sections[0], {})
        if name in section:
            raise ConfigError(f"{where}: {name!r} is given twice (as {sections[0]}.{name} too)")
        section[name] = out.pop(name)
    return out


def _unknown_keys(where: str, unknown: list[str], known: list[str]) -> ConfigError:
    hints = [f"{u!r} -> {m[0]!r}" for u in unknown
             if (m := difflib.get_close_matches(u.replace("-", "_"), known, n=1, cutoff=0.75))]
    hint = f" (did you mean {', '.join(hints)}?)" if hints else ""
    return ConfigError(f"{where}: unknown key(s) {unknown}{hint}; known keys: {sorted(known)}")


def from_dict(cls: type[C], values: dict[str, Any], where: str = "config") -> C:
    """Build a (nested) config dataclass from a plain dict; unknown keys and values of the wrong
    type are one-line errors naming the field. Keys may be spelled as :func:`normalize_keys`
    accepts."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping of field names to values")
    values = normalize_keys(cls, values, where)
    known = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise _unknown_keys(where, unknown, list(known))
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        if cls is PretrainConfig and name in _NESTED:
            value = from_dict(_NESTED[name], value, f"{where}.{name}")
        else:
            ok, value = _typed(value, hints[name])
            if not ok:
                label = name if where == "config" else f"{where}.{name}"
                hint = hints[name]
                expected = hint.__name__ if isinstance(hint, type) else \
                    str(hint).replace("typing.", "").replace("NoneType", "None")
                raise ConfigError(f"{label} = {value!r} has the wrong type: expected {expected}")
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ConfigError(f"{where}: {err}") from None


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON/YAML-safe dict of a config, nested dataclasses included."""
    return dataclasses.asdict(config)


def to_yaml(config: Any) -> str:
    """The config as the YAML that ``config.yaml`` holds and ``--config`` reads, fields in
    declaration order."""
    import yaml

    return yaml.safe_dump(to_dict(config), sort_keys=False)


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"data": {"data": "digits"}}`` -> ``{"data.data": "digits"}``."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _recipe_folder() -> Any:
    from importlib import resources

    return resources.files("simclr_kit").joinpath("recipes")


def recipe_names() -> list[str]:
    """The built-in recipes: ``recipes/NAME.yaml`` in the package."""
    return sorted(f.name.removesuffix(".yaml") for f in _recipe_folder().iterdir()
                  if f.name.endswith(".yaml"))


def recipe(name: str) -> dict[str, Any]:
    """A built-in recipe (``recipes/NAME.yaml`` in the package) as a dict of config fields."""
    import yaml

    folder = _recipe_folder()
    known = recipe_names()
    if name not in known:
        raise ConfigError(f"unknown recipe {name!r}; built-in recipes: {known}")
    return yaml.safe_load(folder.joinpath(f"{name}.yaml").read_text()) or {}


# Fields of a recipe that say how long to train, not how: a config that sets only these (or
# nothing) on the embedded digits still gets the rest of the digits recipe.
_RUN_LENGTH = {"data", "epochs", "batch_size", "out"}


def with_data_recipe(cfg: PretrainConfig) -> tuple[PretrainConfig, list[str]]:
    """On the embedded digits, a config that leaves every field of the digits recipe (other than
    the run's length) at its generic default takes the recipe's values for them, as the command
    line does; returns the config and the fields taken. Any other config is returned as is."""
    if cfg.data.data != "digits":
        return cfg, []
    demo, generic, current = recipe("digits"), to_dict(PretrainConfig()), to_dict(cfg)
    taken: list[str] = []
    for key, value in demo.items():
        if key in _RUN_LENGTH:
            continue
        pairs = value.items() if isinstance(value, dict) else [(None, value)]
        for sub, v in pairs:
            here, default = (current[key], generic[key]) if sub is None else \
                (current[key][sub], generic[key][sub])
            if here != default:
                return cfg, []  # the caller chose at least one of them: keep the config whole
            taken.append(key if sub is None else f"{key}.{sub}")
    return from_dict(PretrainConfig, merge(current, {k: v for k, v in demo.items()
                                                     if k not in _RUN_LENGTH})), taken


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


def load_yaml(path: str | Path, cls: type | None = None) -> dict[str, Any]:
    """Read a YAML config file into a dict (validated when turned into a dataclass); with
    ``cls``, its keys spelled as that dataclass's fields (:func:`normalize_keys`), so that flags
    merged on top of it meet the same keys."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {p} does not exist")
    import yaml  # lazily: the training step and the benchmarks need no YAML

    try:
        values = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"config file {p} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise UserError(f"config file {p} must hold a mapping of field names to values")
    return normalize_keys(cls, values) if cls is not None else values


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Recursively overlay ``overrides`` (None values ignored) on ``base``."""
    out = dict(base)
    for key, value in overrides.items():
        if value is None:
            continue
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out
