"""The sections of the run report built from the run directory's files (and a few images).

The sections that embed whole splits live in ``embedding_sections.py``.

Every builder returns a :class:`~simclr_kit.report.page.Section`; an input that is missing
(no evaluation yet, no monitored kNN, no labels, the dataset not reachable) gives a note that
says what is missing and how to get it, never an exception.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from simclr_kit.config import AugmentConfig, DataConfig, from_dict, layered_data
from simclr_kit.errors import UserError
from simclr_kit.evaluation.tables import side_by_side
from simclr_kit.models.encoder import Encoder
from simclr_kit.report import plots
from simclr_kit.report.loggers import scalars
from simclr_kit.report.metrics import read_metrics
from simclr_kit.report.page import (Missing, Section, caption, esc, folded, image, key_values, note,
                                    preformatted, table)

VIEW_IMAGES = 6
_KNOWN_KINDS = {"run", "resume", "train", "done", "knn"}


@dataclass
class ReportContext:
    """What the sections read: the run's files, loaded once, and lazily the encoder and data.

    ``data`` is the labelled dataset the encoder is looked at on (confusion matrix, map,
    retrieval): the one the run's last evaluation used, else its pretraining data;
    ``train_data`` the pretraining data, whose images the augmented views show. Data flags
    given to the report go on top of both.
    """

    run: Path
    config: dict[str, Any]
    records: list[dict[str, Any]]
    eval_result: dict[str, Any] | None
    data: DataConfig | None
    device: str = "auto"
    progress: bool = False
    _cache: dict[str, Any] = field(default_factory=dict)
    train_data: DataConfig | None = None

    @classmethod
    def load(cls, run: Path, data: DataConfig | str | dict[str, Any] | None, device: str,
             progress: bool) -> ReportContext:
        from simclr_kit.provenance import EVAL_JSON, evaluated_data

        config = _read_yaml(run / "config.yaml")
        eval_path = run / EVAL_JSON
        eval_result = json.loads(eval_path.read_text()) if eval_path.is_file() else None
        recorded = config.get("data") if isinstance(config.get("data"), dict) else None
        return cls(run, config, read_metrics(run / "metrics.jsonl"), eval_result,
                   layered_data(evaluated_data(run) or recorded, data), device, progress,
                   train_data=layered_data(recorded, data))

    def kind(self, name: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("kind") == name]

    def labelled_pretraining(self) -> bool | None:
        """Whether the pretraining split had labels; None when the run did not record it."""
        dataset = (self.kind("run") or [{}])[0].get("dataset")
        if not isinstance(dataset, dict) or "label_column" not in dataset:
            return None
        return dataset["label_column"] is not None

    def evaluate_command(self) -> str:
        """The command that evaluates this run: on its own dataset, or on a labelled one when
        it was pretrained on unlabeled images."""
        labelled = self.labelled_pretraining() is not False
        return f"simclr evaluate {self.run}" + ("" if labelled else " --data LABELLED_DATASET")

    def encoder(self) -> Encoder:
        if "encoder" not in self._cache:
            from simclr_kit.models.encoder import load_encoder

            try:
                self._cache["encoder"] = load_encoder(self.run)
            except UserError as err:
                raise Missing(f"no encoder to look at: {err}") from None
        return self._cache["encoder"]

    def data_config(self, pretraining: bool = False) -> DataConfig:
        """The evaluation's dataset, or with ``pretraining`` the one the run trained on."""
        data = self.train_data if pretraining else self.data
        if data is None:
            raise Missing(f"no dataset: config.yaml names none; run  simclr report {self.run} "
                          "--data DATASET")
        return data


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    loaded = yaml.safe_load(path.read_text())
    return loaded if isinstance(loaded, dict) else {}


def config_section(ctx: ReportContext) -> Section:
    """The datasets' provenance, and the resolved config folded (it is long)."""
    parts = []
    sources: list[tuple[str, Any]] = [("pretraining data", (ctx.kind("run") or [{}])[0].get("dataset"))]
    if ctx.eval_result:
        sources += [("evaluation: train split", ctx.eval_result.get("train")),
                    ("evaluation: evaluated split", ctx.eval_result.get("eval"))]
    blocks = [f"<div><h3>{esc(name)}</h3>{key_values(prov)}</div>"
              for name, prov in sources if isinstance(prov, dict)]
    parts.append(f'<div class="cols">{"".join(blocks)}</div>' if blocks
                 else note("no dataset provenance recorded in metrics.jsonl"))
    if ctx.config:
        parts.append(folded("Resolved configuration (config.yaml)",
                            preformatted(yaml.safe_dump(ctx.config, sort_keys=False))))
    else:
        parts.append(note("config.yaml is missing from the run directory."))
    return Section("config", "Configuration and data", "\n".join(parts))


def _sessions(records: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Records grouped by process: each 'run' or 'resume' record starts a new session."""
    out: list[list[dict[str, Any]]] = []
    for r in records:
        if r.get("kind") in ("run", "resume") or not out:
            out.append([])
        out[-1].append(r)
    return out


def wall_time(ctx: ReportContext) -> str:
    """The training's wall time, every session of a resumed run summed."""
    sessions = _sessions(ctx.records)
    wall = sum(s[-1].get("time", 0) - s[0].get("time", 0) for s in sessions)
    return f"{wall / 60:.1f} min ({wall:.0f} s) over {len(sessions)} session(s)"


def images_per_second(ctx: ReportContext) -> str | None:
    """The median training speed of the logged intervals, None when none was logged."""
    rates = [r["images_per_s"] for r in ctx.kind("train")
             if isinstance(r.get("images_per_s"), (int, float))]
    return f"{statistics.median(rates):.1f}" if rates else None


def hardware_section(ctx: ReportContext) -> Section:
    if not ctx.records:
        raise Missing("metrics.jsonl is missing or empty: nothing was logged for this run")
    start = (ctx.kind("run") or ctx.kind("resume") or [{}])[0]
    done, train = ctx.kind("done"), ctx.kind("train")
    facts: dict[str, Any] = {"device": start.get("device", "not recorded"),
                             "processes (world size)": start.get("world_size", "not recorded")}
    hardware = next((r["hardware"] for r in reversed(ctx.records) if "hardware" in r), None)
    facts.update(hardware or {"hardware": "not recorded"})
    facts["training wall time"] = wall_time(ctx)
    if done:
        facts["epochs / steps done"] = f"{done[-1].get('epoch')} / {done[-1].get('step')}"
    elif train:  # unfinished: the epoch in progress counts
        facts["epochs / steps done"] = f"{train[-1].get('epoch', 1)} (in progress) / " \
                                       f"{train[-1].get('step')}"
    if images_per_second(ctx) is not None:
        facts["images/s (median of logged intervals)"] = images_per_second(ctx)
    if done:
        facts["images/s (whole session, checkpoints included)"] = done[-1].get("images_per_s")
        for kind in ("gpu", "host"):
            peaks = [d.get("peak_memory_mb", {}).get(kind) for d in done]
            peaks = [p for p in peaks if isinstance(p, (int, float))]
            if peaks:
                label = "GPU (PyTorch tensors)" if kind == "gpu" else "host (process RSS)"
                facts[f"peak memory, {label}"] = f"{max(peaks):.0f} MiB"
    else:
        facts["peak memory"] = "not recorded (no 'done' record: the run is unfinished)"
    if ctx.eval_result and "seconds" in ctx.eval_result:
        facts["evaluation time"] = f"{ctx.eval_result['seconds']} s"
    body = key_values(facts)
    other = [r for r in ctx.records if r.get("kind") not in _KNOWN_KINDS][:20]
    if other:
        rows = [[r.get("kind"), json.dumps({k: v for k, v in r.items() if k not in ("kind", "time")})]
                for r in other]
        body += "<h3>Other events</h3>" + table(["kind", "fields"], rows)
    return Section("hardware", "Hardware, time and memory", body)


def curves_section(ctx: ReportContext) -> Section:
    by_step = {r["step"]: r for r in ctx.kind("train") if isinstance(r.get("step"), int)}
    train = [by_step[s] for s in sorted(by_step)]  # a resumed stretch overrides the old one
    if not train:
        raise Missing("no 'train' records in metrics.jsonl yet")
    steps_per_epoch = (ctx.kind("run") or [{}])[0].get("steps_per_epoch")
    body = image(plots.training_curves(train, steps_per_epoch),
                 "loss, learning rate and images/s per step")
    body += caption(f"{len(train)} logged intervals (every log_every steps, loss averaged over "
                    "the interval); dotted lines mark epoch ends.")
    return Section("curves", "Loss and learning rate", body)


def _accuracy_keys(records: list[dict[str, Any]]) -> list[str]:
    keys = list(dict.fromkeys(k for r in records for k in scalars(r)))
    return [k for k in keys if "top" in k or "acc" in k] or \
        [k for k in keys if k not in ("seconds", "k", "temperature")]


def knn_monitor_section(ctx: ReportContext) -> Section:
    records = ctx.kind("knn")
    if not records and ctx.labelled_pretraining() is False:
        raise Missing("no monitored kNN: it needs labelled pretraining images (its keys), and "
                      f"this run's have none; {ctx.evaluate_command()}  measures the encoder")
    if not records:
        raise Missing("no monitored kNN records: pretrain with --monitor-knn N to run the kNN "
                      "protocol on the evaluation split every N epochs")
    keys = _accuracy_keys(records)
    body = image(plots.metric_curve(records, keys, title="kNN accuracy during pretraining"),
                 "monitored kNN accuracy per epoch")
    rows = [[r.get("epoch")] + [r.get(k) for k in keys] for r in records]
    return Section("knn-monitor", "Monitored kNN accuracy",
                   body + table(["epoch", *keys], rows, numeric=range(len(keys) + 1)))


def _settings(row: dict[str, Any]) -> str:
    """Every hyperparameter of ``row``'s number, label-fraction rows led by their subset."""
    hp = row.get("hyperparameters") or {}
    text = ", ".join(f"{k}={v}" for k, v in hp.items()) if isinstance(hp, dict) else str(hp)
    if row.get("subset") is not None:
        text = f"subset={row['subset']} ({row.get('labels', '?')} labels), {text}"
    return text


def evaluation_section(ctx: ReportContext) -> Section:
    result = ctx.eval_result
    if not result:
        raise Missing(f"no eval.json: run  {ctx.evaluate_command()}  (simclr run does it)")
    # One line per protocol and setting, the encoders side by side, as in eval.md.
    encoders, lines = side_by_side(result.get("results", []), _settings)
    rows = [[protocol, metric, *(values.get(e, "") for e in encoders), split,
             "" if seeds == "-" else seeds, settings]
            for (protocol, metric, split, seeds, settings), values in lines]
    enc = result.get("encoder") or {}
    body = caption(f"checkpoint {result.get('checkpoint')} (epoch {enc.get('epoch')}); each "
                   "number with the protocol that produced it, one column per encoder.")
    body += table(["protocol", "metric", *encoders, "split", "seed", "settings"], rows,
                  numeric=range(2, 2 + len(encoders)))
    return Section("evaluation", "Evaluation", body)


def _label_efficiency_png(ctx: ReportContext) -> Path | None:
    named = [ctx.run / v for v in (ctx.eval_result or {}).values()
             if isinstance(v, str) and v.endswith(".png")]
    found = sorted(p for p in [*ctx.run.glob("*.png"), *ctx.run.glob("eval*/*.png")]
                   if any(w in p.name.lower() for w in ("label", "fraction", "efficien")))
    return next((p for p in named + found if p.is_file()), None)


def label_efficiency_section(ctx: ReportContext) -> Section:
    png = _label_efficiency_png(ctx)
    if png is None:
        raise Missing(f"no label-efficiency results: run  simclr evaluate {ctx.run} --protocols "
                      "knn,linear,fractions")
    return Section("label-efficiency", "Label efficiency",
                   image(png.read_bytes(), "accuracy against the number of labels")
                   + caption(f"from {png.name}"))


def augment_section(ctx: ReportContext) -> Section:
    from simclr_kit.augment import SimCLRAugment, save_view_grid
    from simclr_kit.report.views import sample_store

    enc, data = ctx.encoder(), ctx.data_config(pretraining=True)
    try:
        store, _ = sample_store(data, VIEW_IMAGES, enc.image_size)
    except UserError as err:
        raise Missing(f"the images of {data.data} could not be read: {err}") from None
    augment_cfg = from_dict(AugmentConfig, ctx.config.get("augment") or {}, "augment")
    augment = SimCLRAugment(augment_cfg, enc.image_size, enc.mean, enc.std,
                            int(ctx.config.get("seed", 0)))
    with tempfile.TemporaryDirectory() as tmp:
        save_view_grid(store.images, augment, Path(tmp) / "views.png", epoch=0,  # the first
                       sizes=store.sizes)
        png = (Path(tmp) / "views.png").read_bytes()
    return Section("augmentations", "Augmented views",
                   image(png, "original images and two augmented views each")
                   + caption(f"{len(store)} training images at {enc.image_size} px and the two "
                             "views the run's augmentation makes of each in epoch 1."))
