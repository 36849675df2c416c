"""Forward metric records to the tools people already use: TensorBoard, Weights & Biases, MLflow.

The JSONL log (:class:`simclr_kit.report.metrics.MetricsLog`) is always written; these sinks are
extra copies. Each library is imported only when its logger is asked for, so none of them is a
dependency of the package; a missing one is a one-line error with the install command.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Protocol

from simclr_kit.config import flatten, unknown_choice
from simclr_kit.errors import UserError

# logger name -> (module that must be importable, pip extra that installs it)
LOGGERS: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
}
# Record fields that are positions or bookkeeping, not metrics to plot.
_NOT_METRICS = {"kind", "time", "epoch", "step"}


class MetricSink(Protocol):
    """Receives every record of the metrics log."""

    def write(self, kind: str, values: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def check_loggers(names: tuple[str, ...] | list[str]) -> None:
    """Raise a one-line UserError for an unknown logger or one whose library is not installed."""
    for name in names:
        if name not in LOGGERS:  # metrics.jsonl is always written: these are copies of it
            raise unknown_choice("logger", name, tuple(LOGGERS), "--logger")
        module, extra = LOGGERS[name]
        if importlib.util.find_spec(module) is None:
            raise UserError(f"--logger {name} needs the {module} package, which is not "
                            f"installed: pip install 'simclr-kit[{extra}]'")


def scalars(values: dict[str, Any]) -> dict[str, float]:
    """The numeric metric fields of a record (bools, strings and positions left out)."""
    return {k: float(v) for k, v in values.items()
            if k not in _NOT_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _step(values: dict[str, Any]) -> int | None:
    step = values.get("step", values.get("epoch"))
    return int(step) if isinstance(step, (int, float)) else None


class TensorBoardSink:
    """Scalars as ``KIND/FIELD`` (``train/loss``, ``knn/top1``) in ``RUN/tensorboard``."""

    def __init__(self, run_dir: Path, config: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.writer.add_text("config", "```\n" + _yaml(config) + "```")

    def write(self, kind: str, values: dict[str, Any]) -> None:
        step = _step(values)
        for key, value in scalars(values).items():
            self.writer.add_scalar(f"{kind}/{key}", value, global_step=step)

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """One wandb run per training run, its files under ``RUN/wandb``; project ``simclr-kit``
    unless ``WANDB_PROJECT`` says otherwise (``WANDB_MODE=offline`` works without an account)."""

    def __init__(self, run_dir: Path, config: dict[str, Any]) -> None:
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=None if _env("WANDB_PROJECT") else "simclr-kit",
                              name=run_dir.name, dir=str(run_dir), config=config)

    def write(self, kind: str, values: dict[str, Any]) -> None:
        data = {f"{kind}/{k}": v for k, v in scalars(values).items()}
        if data:
            self.run.log(data, step=_step(values) if kind == "train" else None)

    def close(self) -> None:
        self.run.finish()


class MLflowSink:
    """An MLflow run (tracking URI from ``MLFLOW_TRACKING_URI``, else ``RUN/mlruns``)."""

    def __init__(self, run_dir: Path, config: dict[str, Any]) -> None:
        import mlflow

        self.mlflow = mlflow
        if not _env("MLFLOW_TRACKING_URI"):
            mlflow.set_tracking_uri((run_dir / "mlruns").resolve().as_uri())
        self.run = mlflow.start_run(run_name=run_dir.name)
        mlflow.log_params(flatten(config))  # MLflow params are flat

    def write(self, kind: str, values: dict[str, Any]) -> None:
        data = {f"{kind}/{k}": v for k, v in scalars(values).items()}
        if data:
            self.mlflow.log_metrics(data, step=_step(values))

    def close(self) -> None:
        self.mlflow.end_run()


_SINKS = {"tensorboard": TensorBoardSink, "wandb": WandbSink, "mlflow": MLflowSink}


def open_loggers(names: tuple[str, ...] | list[str], run_dir: Path,
                 config: dict[str, Any]) -> list[MetricSink]:
    """One sink per name, in order; ``config`` (the resolved run config) is recorded with each."""
    check_loggers(names)
    return [_SINKS[name](run_dir, config) for name in names]


def _env(name: str) -> str | None:
    return os.environ.get(name) or None


def _yaml(config: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(config, sort_keys=False)
