"""The sections of the run report, each built from the run directory (and the data when needed).

Every builder returns a :class:`~simclr_kit.report.html.Section`; an input that is missing
(no evaluation yet, no monitored kNN, no labels, the dataset not reachable) gives a note that
says what is missing and how to get it, never an exception.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml
from torch import Tensor

from simclr_kit.config import AugmentConfig, DataConfig, EvalConfig, from_dict, merge
from simclr_kit.data.store import ImageStore
from simclr_kit.encoder import Encoder
from simclr_kit.errors import UserError
from simclr_kit.report import analysis, plots
from simclr_kit.report.html import (Section, caption, esc, image, key_values, note, preformatted,
                                    table)
from simclr_kit.report.metrics import read_metrics

QUERIES, NEIGHBOURS, VIEW_IMAGES = 6, 8, 6
_KNOWN_KINDS = {"run", "resume", "train", "done", "knn"}


class Missing(Exception):
    """An input a section needs is not there; the message says what to do."""


@dataclass
class Embedded:
    """Both splits decoded at the encoder's size and their backbone features ``(N, D)``."""

    train: ImageStore
    evaluation: ImageStore
    train_features: Tensor
    eval_features: Tensor


@dataclass
class ReportContext:
    """What the sections read: the run's files, loaded once, and lazily the encoder and data."""

    run: Path
    config: dict[str, Any]
    records: list[dict[str, Any]]
    eval_result: dict[str, Any] | None
    data: DataConfig | None
    device: str = "auto"
    progress: bool = False
    _cache: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, run: Path, data: DataConfig | str | dict[str, Any] | None, device: str,
             progress: bool) -> ReportContext:
        config = _read_yaml(run / "config.yaml")
        eval_path = run / "eval.json"
        eval_result = json.loads(eval_path.read_text()) if eval_path.is_file() else None
        recorded = config.get("data") if isinstance(config.get("data"), dict) else None
        if isinstance(data, str):
            data = DataConfig(data=data)
        elif isinstance(data, dict) and (recorded or "data" in data):
            data = from_dict(DataConfig, merge(recorded or {}, data), "data")
        elif data is None and recorded is not None:
            data = from_dict(DataConfig, recorded, "data")
        elif not isinstance(data, DataConfig):
            data = None
        return cls(run, config, read_metrics(run / "metrics.jsonl"), eval_result, data, device,
                   progress)

    def kind(self, name: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("kind") == name]

    def encoder(self) -> Encoder:
        if "encoder" not in self._cache:
            from simclr_kit.encoder import load_encoder

            try:
                self._cache["encoder"] = load_encoder(self.run)
            except UserError as err:
                raise Missing(f"no encoder to look at: {err}") from None
        return self._cache["encoder"]

    def data_config(self) -> DataConfig:
        if self.data is None:
            raise Missing("no dataset: config.yaml names none; pass --data")
        return self.data


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    loaded = yaml.safe_load(path.read_text())
    return loaded if isinstance(loaded, dict) else {}


def _guard(build: Callable[[], Section], sid: str, title: str) -> Section:
    """Run a builder; a missing input or a failure becomes a note in that section only."""
    try:
        return build()
    except Missing as err:
        return Section(sid, title, note(str(err)))
    except Exception as err:  # noqa: BLE001 - one broken picture must not hide the others
        return Section(sid, title, note(f"this section could not be drawn: "
                                        f"{type(err).__name__}: {err}"))


def build_all(ctx: ReportContext, embeddings: bool, max_points: int) -> list[Section]:
    builders: list[tuple[str, str, Callable[[], Section]]] = [
        ("config", "Configuration and data", lambda: config_section(ctx)),
        ("hardware", "Hardware, time and memory", lambda: hardware_section(ctx)),
        ("curves", "Loss and learning rate", lambda: curves_section(ctx)),
        ("knn-monitor", "Monitored kNN accuracy", lambda: knn_monitor_section(ctx)),
        ("evaluation", "Evaluation", lambda: evaluation_section(ctx)),
        ("label-efficiency", "Label efficiency", lambda: label_efficiency_section(ctx)),
        ("confusion", "Confusion matrix", lambda: confusion_section(ctx, embeddings)),
        ("augmentations", "Augmented views", lambda: augment_section(ctx)),
        ("embedding-map", "Embedding map", lambda: map_section(ctx, embeddings, max_points)),
        ("retrieval", "Nearest-neighbour retrieval", lambda: retrieval_section(ctx, embeddings)),
    ]
    return [_guard(build, sid, title) for sid, title, build in builders]


def config_section(ctx: ReportContext) -> Section:
    parts = []
    if ctx.config:
        parts.append("<h3>Resolved configuration (config.yaml)</h3>")
        parts.append(preformatted(yaml.safe_dump(ctx.config, sort_keys=False)))
    else:
        parts.append(note("config.yaml is missing from the run directory."))
    sources: list[tuple[str, Any]] = [("pretraining data", (ctx.kind("run") or [{}])[0].get("dataset"))]
    if ctx.eval_result:
        sources += [("evaluation: train split", ctx.eval_result.get("train")),
                    ("evaluation: evaluated split", ctx.eval_result.get("eval"))]
    blocks = [f"<div><h3>{esc(name)}</h3>{key_values(prov)}</div>"
              for name, prov in sources if isinstance(prov, dict)]
    parts.append(f'<div class="cols">{"".join(blocks)}</div>' if blocks
                 else note("no dataset provenance recorded in metrics.jsonl"))
    return Section("config", "Configuration and data", "\n".join(parts))


def _sessions(records: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Records grouped by process: each 'run' or 'resume' record starts a new session."""
    out: list[list[dict[str, Any]]] = []
    for r in records:
        if r.get("kind") in ("run", "resume") or not out:
            out.append([])
        out[-1].append(r)
    return out


def hardware_section(ctx: ReportContext) -> Section:
    if not ctx.records:
        raise Missing("metrics.jsonl is missing or empty: nothing was logged for this run")
    start = (ctx.kind("run") or ctx.kind("resume") or [{}])[0]
    done, train = ctx.kind("done"), ctx.kind("train")
    sessions = _sessions(ctx.records)
    wall = sum(s[-1].get("time", 0) - s[0].get("time", 0) for s in sessions)
    facts: dict[str, Any] = {"device": start.get("device", "not recorded"),
                             "processes (world size)": start.get("world_size", "not recorded")}
    hardware = next((r["hardware"] for r in reversed(ctx.records) if "hardware" in r), None)
    facts.update(hardware or {"hardware": "not recorded"})
    facts["training wall time"] = f"{wall / 60:.1f} min ({wall:.0f} s) over {len(sessions)} " \
                                  f"session(s)"
    if done:
        facts["epochs / steps done"] = f"{done[-1].get('epoch')} / {done[-1].get('step')}"
    elif train:  # unfinished: the epoch in progress counts
        facts["epochs / steps done"] = f"{train[-1].get('epoch', 0) + 1} (in progress) / " \
                                       f"{train[-1].get('step')}"
    rates = [r["images_per_s"] for r in train if isinstance(r.get("images_per_s"), (int, float))]
    if rates:
        facts["images/s (median of logged intervals)"] = f"{statistics.median(rates):.1f}"
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
    body = image(plots.training_curves(train), "loss, learning rate and images/s per step")
    body += caption(f"{len(train)} logged intervals (every log_every steps, loss averaged over "
                    "the interval); grey lines mark epoch starts.")
    return Section("curves", "Loss and learning rate", body)


def _accuracy_keys(records: list[dict[str, Any]]) -> list[str]:
    from simclr_kit.report.loggers import scalars

    keys = list(dict.fromkeys(k for r in records for k in scalars(r)))
    return [k for k in keys if "top" in k or "acc" in k] or \
        [k for k in keys if k not in ("seconds", "k", "temperature")]


def knn_monitor_section(ctx: ReportContext) -> Section:
    records = ctx.kind("knn")
    if not records:
        raise Missing("no monitored kNN records: pretrain with --monitor-knn N to run the kNN "
                      "protocol on the evaluation split every N epochs")
    keys = _accuracy_keys(records)
    body = image(plots.metric_curve(records, keys, title="kNN accuracy during pretraining"),
                 "monitored kNN accuracy per epoch")
    rows = [[r.get("epoch")] + [r.get(k) for k in keys] for r in records]
    return Section("knn-monitor", "Monitored kNN accuracy",
                   body + table(["epoch", *keys], rows, numeric=range(len(keys) + 1)))


def _value(row: dict[str, Any]) -> str:
    value = row.get("value", row.get("mean"))
    if not isinstance(value, (int, float)):
        return str(value)
    text = f"{value:.2f}"
    if isinstance(row.get("std"), (int, float)):
        text += f" ± {row['std']:.2f}"
    return text + ("%" if str(row.get("metric", "top1")).startswith(("top", "acc")) else "")


def evaluation_section(ctx: ReportContext) -> Section:
    result = ctx.eval_result
    if not result:
        raise Missing("no eval.json: run  simclr evaluate RUN --data ...  (simclr run does it)")
    rows = []
    for r in result.get("results", []):
        hp = r.get("hyperparameters") or {}
        settings = ", ".join(f"{k}={v}" for k, v in hp.items()) if isinstance(hp, dict) else hp
        rows.append([r.get("protocol"), r.get("encoder"), r.get("metric"), _value(r),
                     r.get("split"), "" if r.get("seed") is None else r.get("seed"), settings])
    enc = result.get("encoder") or {}
    body = caption(f"checkpoint {result.get('checkpoint')} (epoch {enc.get('epoch')}); each "
                   "number with the protocol that produced it.")
    body += table(["protocol", "encoder", "metric", "value", "split", "seed", "settings"], rows,
                  numeric=(3,))
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
        raise Missing("no label-efficiency results: evaluate with --protocols knn,linear,fractions")
    return Section("label-efficiency", "Label efficiency",
                   image(png.read_bytes(), "accuracy against the number of labels")
                   + caption(f"from {png.name}"))


def augment_section(ctx: ReportContext) -> Section:
    from simclr_kit.augment import SimCLRAugment, save_view_grid
    from simclr_kit.report.views import sample_store

    enc = ctx.encoder()
    store = sample_store(ctx.data_config(), VIEW_IMAGES, enc.image_size)
    augment_cfg = from_dict(AugmentConfig, ctx.config.get("augment") or {}, "augment")
    augment = SimCLRAugment(augment_cfg, enc.image_size, enc.mean, enc.std,
                            int(ctx.config.get("seed", 0)))
    with tempfile.TemporaryDirectory() as tmp:
        save_view_grid(store.images, augment, Path(tmp) / "views.png", epoch=0)
        png = (Path(tmp) / "views.png").read_bytes()
    return Section("augmentations", "Augmented views",
                   image(png, "original images and two augmented views each")
                   + caption(f"{len(store)} training images at {enc.image_size} px and the two "
                             "views the run's augmentation makes of each (epoch 0)."))


def _embedded(ctx: ReportContext, embeddings: bool) -> Embedded:
    """Decode both splits and embed them once; shared by the three sections below."""
    if not embeddings:
        raise Missing("not computed at the end of pretraining (it embeds both splits): run  "
                      "simclr report RUN  to add it")
    if "embedded" not in ctx._cache:
        from simclr_kit.data.sources import open_splits
        from simclr_kit.data.store import decode_split
        from simclr_kit.devices import resolve_device
        from simclr_kit.embed import backbone_features

        enc, data = ctx.encoder(), ctx.data_config()
        try:
            train_split, eval_split = open_splits(data, need_eval=True)
        except UserError as err:
            raise Missing(f"needs a labelled evaluation split: {err}") from None
        stores = [decode_split(s, enc.image_size, data.bad_images, ctx.progress)
                  for s in (train_split, eval_split)]
        dev = resolve_device(ctx.device)
        feats = [backbone_features(enc, s.images, dev, progress=ctx.progress,
                                   desc=f"report: {name} features")
                 for s, name in zip(stores, ("train", "eval"))]
        ctx._cache["embedded"] = Embedded(stores[0], stores[1], feats[0], feats[1])
    return ctx._cache["embedded"]


def _split_name(store: ImageStore) -> str:
    return str(store.provenance.get("split"))


def confusion_section(ctx: ReportContext, embeddings: bool) -> Section:
    emb = _embedded(ctx, embeddings)
    if emb.train.labels is None or emb.evaluation.labels is None:
        raise Missing("the splits have no labels, so there is no confusion matrix")
    defaults = EvalConfig()
    cfg = (ctx.eval_result or {}).get("config") or {}
    k = int((cfg.get("knn_k") or defaults.knn_k)[0])
    temperature = float(cfg.get("knn_temperature", defaults.knn_temperature))
    names = emb.train.class_names or []
    c = max(len(names), int(emb.train.labels.max()) + 1, int(emb.evaluation.labels.max()) + 1)
    names = names + [str(i) for i in range(len(names), c)]
    result = analysis.knn_confusion(emb.train_features, emb.train.labels, emb.eval_features,
                                    emb.evaluation.labels, c, k, temperature)
    title = (f"kNN (k={result.k}, T={temperature:g}) on {_split_name(emb.evaluation)}: "
             f"top-1 {result.accuracy:.2f}%")
    return Section("confusion", "Confusion matrix",
                   image(plots.confusion_matrix(result.matrix, names, title), title)
                   + caption(f"Predictions of the weighted kNN protocol (cosine, train split as "
                             f"keys) for the {len(emb.evaluation)} evaluation images; cells count "
                             "images, colour is the percent of the true class."))


def map_section(ctx: ReportContext, embeddings: bool, max_points: int) -> Section:
    emb = _embedded(ctx, embeddings)
    labels = emb.evaluation.labels
    idx = analysis.stratified_subsample(labels, len(emb.evaluation), max_points)
    coords = analysis.tsne_map(emb.eval_features[idx])
    title = (f"t-SNE of backbone features: {len(idx)} of {len(emb.evaluation)} images of "
             f"{_split_name(emb.evaluation)}")
    png = plots.embedding_map(coords, None if labels is None else labels[idx].numpy(),
                              emb.evaluation.class_names, title)
    return Section("embedding-map", "Embedding map", image(png, title) + caption(
        "Features L2-normalised, reduced to 50 dimensions by PCA, then t-SNE (seed 0); "
        "coloured by the true class. Distances between far-apart clusters mean little."))


def _thumb_cell(img: Tensor, label: str, detail: str, css: str) -> str:
    return (f'<td class="{css}">{image(plots.thumbnail(img), label)}'
            f"<div>{esc(label)}</div><div>{esc(detail)}</div></td>")


def retrieval_section(ctx: ReportContext, embeddings: bool) -> Section:
    emb = _embedded(ctx, embeddings)
    queries = analysis.pick_queries(emb.evaluation.labels, len(emb.evaluation), QUERIES)
    idx, sims = analysis.nearest_neighbours(emb.train_features, emb.eval_features[queries],
                                            NEIGHBOURS)
    query_names = analysis.label_names(emb.evaluation, queries)
    rows = []
    for q, name in enumerate(query_names):
        cells = [_thumb_cell(emb.evaluation.images[queries[q]], name,
                             f"query #{int(emb.evaluation.row_ids[queries[q]])}", "query")]
        for j, neighbour in enumerate(idx[q].tolist()):
            other = analysis.label_names(emb.train, idx[q, j:j + 1])[0]
            same = "same" if emb.evaluation.labels is not None and other == name else "other"
            cells.append(_thumb_cell(emb.train.images[neighbour], other,
                                     f"cos {float(sims[q, j]):.2f}", same))
        rows.append(f"<tr>{''.join(cells)}</tr>")
    head = "<tr><th>query</th>" + "".join(f"<th>{i + 1}</th>" for i in range(idx.shape[1]))
    body = f'<table class="retrieval"><thead>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'
    return Section("retrieval", "Nearest-neighbour retrieval", body + caption(
        f"{len(queries)} images of {_split_name(emb.evaluation)} (first column) and their "
        f"{idx.shape[1]} most similar train images by cosine similarity of backbone features; "
        "green: same class as the query, red: another class."))
