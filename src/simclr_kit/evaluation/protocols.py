"""``evaluate``: run the requested protocols on an encoder and write ``eval.json`` + ``eval.md``.

Each number is labelled with its protocol, split, seed(s), hyperparameters and the encoder it
came from, so numbers from different protocols never get mixed up:

- ``knn``: weighted kNN on clean features of the full train split (``knn.py``);
- ``linear``: a linear layer on the cached frozen features (``linear.py``), or on augmented
  views with ``probe_augment`` (``augmented.py``);
- ``fractions``: the cached-feature probe on stratified label fractions and k-shot subsets,
  ``seeds`` runs each, mean and std, plus ``label_efficiency.png`` (``fractions.py``);
- ``finetune``: the whole network on augmented images, on a copy of the encoder
  (``finetune.py``).

The frozen protocols share one set of features per encoder, cached in ``OUT/features/``
(``cache.py``). Under torchrun the feature extraction is sharded over the ranks; the protocols
themselves then run on every rank alike (they are cheap, or, for fine-tuning, not sharded), and
only rank 0 writes.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from simclr_kit import __version__, distributed
from simclr_kit.atomic import atomic_write_text
from simclr_kit.config import DataConfig, EvalConfig
from simclr_kit.data.pixels import chosen_crop_fraction
from simclr_kit.data.skip_reports import announce_skipped, list_skipped
from simclr_kit.data.splits import open_splits
from simclr_kit.data.store import ImageStore, decode_split
from simclr_kit.errors import UserError
from simclr_kit.evaluation.cache import cached_features, weights_hash
from simclr_kit.evaluation.fractions import label_efficiency, plot_label_efficiency
from simclr_kit.evaluation.knn import knn_accuracy
from simclr_kit.evaluation.linear import train_linear_probe
from simclr_kit.evaluation.tables import markdown_report, markdown_table
from simclr_kit.models.backbones import backbone_kwargs, build_backbone
from simclr_kit.models.encoder import Encoder, load_encoder
from simclr_kit.provenance import check_not_replacing, data_for, run_directory

LABEL_EFFICIENCY_PNG = "label_efficiency.png"
EVAL_SKIPPED = "eval-skipped.txt"  # the unreadable images of both splits: split, row, file, reason
FEATURES_DIR = "features"

__all__ = ["baseline_encoder", "evaluate", "markdown_table", "run_protocols"]


def baseline_encoder(kind: str, like: Encoder, seed: int) -> Encoder:
    """A random-init (seeded) or ImageNet-weights encoder of the same architecture as ``like``.

    ImageNet weights come from torchvision's cache (timm's: the Hugging Face cache); without
    them (offline) the error says where to put them.
    """
    name, stem = like.meta.get("backbone", "resnet18"), like.meta.get("stem", "imagenet")
    if kind == "random":
        with torch.random.fork_rng(devices=[]):  # seeded init, global RNG left as it was
            torch.manual_seed(seed)
            backbone = build_backbone(name, stem, kwargs=like.meta.get("create_model_kwargs"))
        return Encoder(backbone, like.image_size, like.mean, like.std, dict(like.meta, init="random"))
    imagenet_mean, imagenet_std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    kwargs = backbone_kwargs(name, "imagenet", like.image_size)  # a ViT keeps its own patches
    meta = dict(like.meta, init="imagenet", stem="imagenet")
    if "create_model_kwargs" in meta:
        meta["create_model_kwargs"] = kwargs
    return Encoder(build_backbone(name, "imagenet", weights="imagenet", kwargs=kwargs),
                   like.image_size, imagenet_mean, imagenet_std, meta)


def _check_labels(store: ImageStore, role: str) -> None:
    if store.labels is None:
        raise UserError(f"the {role} split {store.provenance.get('split')!r} has no labels: "
                        "evaluation needs a ClassLabel or integer label column (--label-column)")
    if int(store.labels.unique().numel()) < 2:
        raise UserError(f"the {role} split has a single class: accuracy would be meaningless")


def _linear_hyperparameters(cfg: EvalConfig, epochs: int, steps: int) -> dict[str, Any]:
    return {"epochs": cfg.linear_epochs, "min_steps": cfg.linear_min_steps,
            "epochs_run": epochs, "steps": steps, "lr": cfg.linear_lr,
            "batch_size": cfg.linear_batch_size, "weight_decay": cfg.linear_weight_decay,
            "optimizer": "adam", "schedule": "cosine per step to 0",
            "features": "frozen encoder in eval mode, standardised; " + (
                "augmented views (crop 0.5-1 + flip), backbone forward per batch"
                if cfg.probe_augment else "clean, cached")}


@dataclasses.dataclass
class _Inputs:
    """What every protocol of one encoder reads."""

    encoder: Encoder
    name: str
    train: ImageStore
    val: ImageStore
    f_train: Tensor  # (N, D) on the device
    f_val: Tensor  # (M, D) on the device
    y_train: Tensor  # (N,) on the device
    y_val: Tensor  # (M,) on the device
    num_classes: int
    cfg: EvalConfig
    device: torch.device
    progress: bool

    def row(self, protocol: str, metric: str, value: float, seed: Any,
            hyperparameters: dict[str, Any], **extra: Any) -> dict[str, Any]:
        hp = dict(hyperparameters, train_split=self.train.provenance.get("split"),
                  train_rows=len(self.train))
        return dict(encoder=self.name, protocol=protocol, metric=metric, value=value,
                    split=self.val.provenance.get("split"), seed=seed, hyperparameters=hp, **extra)


def _knn_rows(x: _Inputs) -> list[dict[str, Any]]:
    """Top-1 for each k, capped at the training images (a larger k would vote with all of them
    anyway); top-5 only above 5 classes, where it can miss."""
    result = knn_accuracy(x.f_train, x.y_train, x.f_val, x.y_val, x.num_classes, ks=x.cfg.knn_k,
                          temperature=x.cfg.knn_temperature)
    keys = int(x.f_train.shape[0])
    rows, seen = [], set()
    for k, acc in result.items():
        if min(k, keys) in seen:  # two asked k capped to the same: the same numbers
            continue
        seen.add(min(k, keys))
        hp = {"k": min(k, keys), "temperature": x.cfg.knn_temperature, "similarity": "cosine",
              "vote": "weighted exp(sim/T)", "features": "frozen encoder in eval mode, clean"}
        if k > keys:
            hp.update(k_asked=k, note=f"k capped at the {keys} training images")
        rows += [x.row("knn", metric, value, None, hp) for metric, value in acc.items()
                 if metric != "top5" or x.num_classes > 5]
    return rows


def _linear_rows(x: _Inputs) -> list[dict[str, Any]]:
    cfg = x.cfg
    recipe = dict(epochs=cfg.linear_epochs, lr=cfg.linear_lr, batch_size=cfg.linear_batch_size,
                  weight_decay=cfg.linear_weight_decay, min_steps=cfg.linear_min_steps,
                  seed=cfg.seed)
    if cfg.probe_augment:
        from simclr_kit.evaluation.augmented import train_augmented_probe

        probe = train_augmented_probe(x.encoder, x.train.images, x.y_train, x.f_train, x.f_val,
                                      x.y_val, x.num_classes, device=x.device,
                                      progress=x.progress, **recipe)
    else:
        probe = train_linear_probe(x.f_train, x.y_train, x.f_val, x.y_val, x.num_classes,
                                   progress=x.progress, **recipe)
    return [x.row("linear", "top1", probe.val_accuracy, cfg.seed,
                  _linear_hyperparameters(cfg, probe.epochs, probe.steps),
                  train_accuracy=probe.train_accuracy)]


def _fraction_rows(x: _Inputs) -> list[dict[str, Any]]:
    cfg = x.cfg
    subsets = label_efficiency(x.f_train, x.y_train, x.f_val, x.y_val, x.num_classes,
                               fractions=cfg.fractions, shots=cfg.shots, seeds=cfg.seeds,
                               epochs=cfg.linear_epochs, lr=cfg.linear_lr,
                               batch_size=cfg.linear_batch_size,
                               weight_decay=cfg.linear_weight_decay,
                               min_steps=cfg.linear_min_steps, seed=cfg.seed)
    rows = []
    for s in subsets:
        hp = dict(_linear_hyperparameters(dataclasses.replace(cfg, probe_augment=False),
                                          s["epochs"], s["steps"]),
                  sampling="class-stratified" if s["kind"] == "fraction" else "k per class")
        # subset/kind/labels/mean/std/same_as: the fields plot_label_efficiency reads
        same = {"same_as": s["same_as"]} if "same_as" in s else {}
        rows.append(x.row("fractions", "top1", s["mean"], s["seeds"], hp, std=s["std"],
                          runs=s["runs"], subset=s["subset"], kind=s["kind"], labels=s["labels"],
                          mean=s["mean"], **same))
    return rows


def _finetune_rows(x: _Inputs) -> list[dict[str, Any]]:
    from simclr_kit.evaluation.finetune import finetune_protocol

    acc, hp = finetune_protocol(x.encoder, x.train, x.val, x.num_classes, x.cfg, x.device,
                                x.progress)
    return [x.row("finetune", "top1", acc, x.cfg.seed, hp)]


_PROTOCOLS = {"knn": _knn_rows, "linear": _linear_rows, "fractions": _fraction_rows,
              "finetune": _finetune_rows}
_ORDER = ("knn", "linear", "fractions", "finetune")  # fine-tuning last: it is the slow one


def run_protocols(encoder: Encoder, train: ImageStore, val: ImageStore, cfg: EvalConfig,
                  device: torch.device, name: str, progress: bool = True,
                  cache_dir: Path | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows ``{encoder, protocol, metric, value, split, seed, hyperparameters}`` for one encoder,
    and where its features came from (``{split role: {file, cached}}``).

    ``encoder`` is left exactly as it was (weights, buffers, mode): the frozen protocols run it
    in eval mode without gradients, and fine-tuning works on a copy.
    """
    assert train.labels is not None and val.labels is not None
    encoder = encoder.to(device)
    frozen = [p for p in ("knn", "linear", "fractions") if p in cfg.protocols]
    features: dict[str, Any] = {}
    f_train = f_val = torch.empty(0)
    if frozen:
        weights = weights_hash(encoder)
        got = {role: cached_features(encoder, store, str(store.provenance.get("split")),
                                     cache_dir, device, cfg.batch_size, progress,
                                     f"{name}: {role} features", weights)
               for role, store in (("train", train), ("eval", val))}
        features = {role: {"file": str(c.path) if c.path else None, "cached": c.hit}
                    for role, c in got.items()}
        f_train, f_val = got["train"].features.to(device), got["eval"].features.to(device)
    num_classes = max(train.num_classes, int(train.labels.max()) + 1, int(val.labels.max()) + 1)
    inputs = _Inputs(encoder, name, train, val, f_train, f_val, train.labels.to(device),
                     val.labels.to(device), num_classes, cfg, device, progress)
    rows: list[dict[str, Any]] = []
    for protocol in _ORDER:
        if protocol in cfg.protocols:
            rows += _PROTOCOLS[protocol](inputs)
    return rows, features


def _load_data(data: DataConfig, image_size: int, progress: bool,
               skipped_file: Path) -> tuple[ImageStore, ImageStore]:
    """Both splits decoded at ``image_size``; the images skipped are listed in
    ``skipped_file``."""
    train_split, val_split = open_splits(data, need_eval=True)
    crop_fraction = chosen_crop_fraction(data.crop_fraction)
    assert val_split is not None
    train = decode_split(train_split, image_size, data.bad_images, progress,
                         workers=data.decode_workers, crop_fraction=crop_fraction)
    val = decode_split(val_split, image_size, data.bad_images, progress,
                       workers=data.decode_workers, crop_fraction=crop_fraction)
    listed = list_skipped(skipped_file, train, val)
    for store in (train, val):
        announce_skipped(store, listed)
    _check_labels(train, "train")
    _check_labels(val, "evaluation")
    return train, val


def evaluate(checkpoint: str | Path, data: DataConfig | str | dict[str, Any] | None = None,
             cfg: EvalConfig | None = None, out: str | Path | None = None, device: str = "auto",
             progress: bool = True) -> dict[str, Any]:
    """Evaluate ``checkpoint`` (and any baselines) on ``data``; returns what ``eval.json`` holds.

    ``data``: a DataConfig, a ``--data`` string, or a dict of DataConfig fields; None (or a
    dict without ``data``) takes the run's own dataset: the one its last evaluation used, else
    the one it was pretrained on (:func:`simclr_kit.provenance.data_for`).

    Results go to ``out``, else to the run directory that holds the checkpoint: ``eval.json``,
    ``eval.md``, ``label_efficiency.png`` (with ``fractions``), ``eval-skipped.txt`` (when
    images were unreadable) and the feature cache ``features/``. An ``eval.json`` there from another dataset is never replaced: that is an
    error naming ``out`` as the way to keep both.
    """
    cfg = cfg or EvalConfig()
    dev = distributed.process_device(device)  # under torchrun the ranks share the embedding
    progress = progress and distributed.is_main()
    encoder = load_encoder(checkpoint, dev)
    out_dir = _output_dir(checkpoint, out)
    data = data_for("evaluate", encoder.meta, data, out_dir)
    check_not_replacing(out_dir, data)
    # Built before any data is read: an unavailable ImageNet download fails in seconds.
    encoders = [("simclr", encoder)] + [(f"{kind}-init", baseline_encoder(kind, encoder, cfg.seed))
                                        for kind in cfg.baselines]
    # The crop used is recorded with the data (eval.json): the flag's, else the run's.
    data = dataclasses.replace(data, crop_fraction=chosen_crop_fraction(data.crop_fraction,
                                                                        encoder.meta))
    train, val = _load_data(data, encoder.image_size, progress, out_dir / EVAL_SKIPPED)
    started = time.time()
    rows: list[dict[str, Any]] = []
    features: dict[str, Any] = {}
    for name, enc in encoders:
        got, features[name] = run_protocols(enc, train, val, cfg, dev, name, progress,
                                            out_dir / FEATURES_DIR)
        rows += got
    result = {"checkpoint": str(checkpoint),
              "encoder": {k: encoder.meta.get(k) for k in ("backbone", "stem", "image_size",
                                                           "feature_dim", "epoch")},
              "data": dataclasses.asdict(data), "train": train.provenance, "eval": val.provenance,
              "config": dataclasses.asdict(cfg), "results": rows, "features": features,
              "seconds": round(time.time() - started, 1), "package_version": __version__}
    fraction_rows = [r for r in rows if r["protocol"] == "fractions"]
    if fraction_rows:
        result["label_efficiency_plot"] = LABEL_EFFICIENCY_PNG
    if distributed.is_main():
        out_dir.mkdir(parents=True, exist_ok=True)
        if fraction_rows:
            plot_label_efficiency(fraction_rows, out_dir / LABEL_EFFICIENCY_PNG)
        else:  # the report shows this file: it must not outlive the eval.json it came from
            (out_dir / LABEL_EFFICIENCY_PNG).unlink(missing_ok=True)
        atomic_write_text(out_dir / "eval.json", json.dumps(result, indent=2) + "\n")
        atomic_write_text(out_dir / "eval.md", markdown_report(result))
    distributed.barrier()  # the files exist on return, whichever rank returns first
    result["table"] = markdown_table(rows)
    result["out"] = str(out_dir)
    return result


def _output_dir(checkpoint: str | Path, out: str | Path | None) -> Path:
    if out is not None:
        return Path(out)
    run = run_directory(checkpoint)
    if run is None:
        raise UserError(f"{checkpoint} is not a run directory: give --out DIR for the results")
    return run
