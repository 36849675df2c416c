"""``evaluate``: run the requested protocols on an encoder and write ``eval.json`` + ``eval.md``.

Each number is labelled with its protocol, split, seed, hyperparameters and the encoder it came
from, so numbers from different protocols never get mixed up.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch

from simclr_kit import __version__, distributed
from simclr_kit.checkpoint import atomic_write_text
from simclr_kit.config import DataConfig, EvalConfig
from simclr_kit.data.sources import open_splits
from simclr_kit.data.store import ImageStore, decode_split, skipped_summary
from simclr_kit.devices import resolve_device
from simclr_kit.encoder import Encoder, load_encoder
from simclr_kit.errors import UserError
from simclr_kit.evaluation.features import extract_features
from simclr_kit.evaluation.knn import knn_accuracy
from simclr_kit.evaluation.linear import train_linear_probe
from simclr_kit.models import build_backbone


def baseline_encoder(kind: str, like: Encoder, seed: int) -> Encoder:
    """A random-init (seeded) or ImageNet-weights encoder of the same architecture as ``like``."""
    name, stem = like.meta.get("backbone", "resnet18"), like.meta.get("stem", "imagenet")
    if kind == "random":
        torch.manual_seed(seed)
        return Encoder(build_backbone(name, stem), like.image_size, like.mean, like.std,
                       dict(like.meta, init="random"))
    imagenet_mean, imagenet_std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    return Encoder(build_backbone(name, "imagenet", weights="imagenet"), like.image_size,
                   imagenet_mean, imagenet_std, dict(like.meta, init="imagenet", stem="imagenet"))


def _check_labels(store: ImageStore, role: str) -> None:
    if store.labels is None:
        raise UserError(f"the {role} split {store.provenance.get('split')!r} has no labels: "
                        "evaluation needs a ClassLabel or integer label column (--label-column)")
    if int(store.labels.unique().numel()) < 2:
        raise UserError(f"the {role} split has a single class: accuracy would be meaningless")


def run_protocols(encoder: Encoder, train: ImageStore, val: ImageStore, cfg: EvalConfig,
                  device: torch.device, name: str, progress: bool = True) -> list[dict[str, Any]]:
    """Rows ``{encoder, protocol, metric, value, split, seed, hyperparameters}`` for one encoder."""
    encoder = encoder.to(device)
    f_train = extract_features(encoder, train.images, encoder.mean, encoder.std, device,
                               cfg.batch_size, progress, f"{name}: train features")
    f_val = extract_features(encoder, val.images, encoder.mean, encoder.std, device,
                             cfg.batch_size, progress, f"{name}: val features")
    num_classes = max(train.num_classes, int(train.labels.max()) + 1)  # type: ignore[union-attr]
    split = val.provenance.get("split")
    rows: list[dict[str, Any]] = []
    if "knn" in cfg.protocols:
        result = knn_accuracy(f_train, train.labels, f_val, val.labels, num_classes,
                              ks=cfg.knn_k, temperature=cfg.knn_temperature)
        for k, acc in result.items():
            for metric, value in acc.items():
                rows.append(dict(encoder=name, protocol="knn", metric=metric, value=value,
                                 split=split, seed=None,
                                 hyperparameters={"k": k, "temperature": cfg.knn_temperature,
                                                  "similarity": "cosine", "vote": "weighted"}))
    if "linear" in cfg.protocols:
        probe = train_linear_probe(f_train, train.labels, f_val, val.labels, num_classes,
                                   epochs=cfg.linear_epochs, lr=cfg.linear_lr,
                                   batch_size=cfg.linear_batch_size,
                                   weight_decay=cfg.linear_weight_decay, seed=cfg.seed)
        rows.append(dict(encoder=name, protocol="linear", metric="top1", value=probe.val_accuracy,
                         split=split, seed=cfg.seed,
                         hyperparameters={"epochs": cfg.linear_epochs, "lr": cfg.linear_lr,
                                          "batch_size": cfg.linear_batch_size,
                                          "weight_decay": cfg.linear_weight_decay,
                                          "optimizer": "adam", "features": "cached, frozen"}))
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """One line per (protocol, metric, hyperparameters), one column per encoder."""
    encoders = list(dict.fromkeys(r["encoder"] for r in rows))
    keys: dict[tuple, dict[str, float]] = {}
    for r in rows:
        hp = r["hyperparameters"]
        detail = f"k={hp['k']}" if r["protocol"] == "knn" else f"{hp.get('epochs', '')} ep"
        keys.setdefault((r["protocol"], r["metric"], detail), {})[r["encoder"]] = r["value"]
    lines = ["| protocol | metric | setting | " + " | ".join(encoders) + " |",
             "| --- | --- | --- |" + " ---: |" * len(encoders)]
    for (protocol, metric, detail), values in keys.items():
        cells = [f"{values[e]:.2f}%" if e in values else "" for e in encoders]
        lines.append(f"| {protocol} | {metric} | {detail} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def evaluate(checkpoint: str | Path, data: DataConfig, cfg: EvalConfig | None = None,
             out: str | Path | None = None, device: str = "auto",
             progress: bool = True) -> dict[str, Any]:
    """Evaluate ``checkpoint`` (and any baselines) on ``data``; returns what ``eval.json`` holds.

    Results go to ``out``, else to the run directory that holds the checkpoint.
    """
    cfg = cfg or EvalConfig()
    dev = distributed.init(resolve_device(device))  # under torchrun the ranks share the embedding
    progress = progress and distributed.is_main()
    encoder = load_encoder(checkpoint, dev)
    out_dir = _output_dir(checkpoint, out)
    train_split, val_split = open_splits(data, need_eval=True)
    train = decode_split(train_split, encoder.image_size, data.bad_images, progress)
    val = decode_split(val_split, encoder.image_size, data.bad_images, progress)  # type: ignore[arg-type]
    for store in (train, val):
        if store.skipped:  # the counts are also in eval.json; the accuracy is over the rest
            print(skipped_summary(store))
    _check_labels(train, "train")
    _check_labels(val, "evaluation")
    started = time.time()
    rows = run_protocols(encoder, train, val, cfg, dev, "simclr", progress)
    for kind in cfg.baselines:
        rows += run_protocols(baseline_encoder(kind, encoder, cfg.seed), train, val, cfg, dev,
                              f"{kind}-init", progress)
    result = {"checkpoint": str(checkpoint), "encoder": {k: encoder.meta.get(k) for k in
                                                         ("backbone", "stem", "image_size",
                                                          "feature_dim", "epoch")},
              "train": train.provenance, "eval": val.provenance,
              "config": dataclasses.asdict(cfg), "results": rows,
              "seconds": round(time.time() - started, 1), "package_version": __version__}
    if distributed.is_main():
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "eval.json", json.dumps(result, indent=2) + "\n")
        atomic_write_text(out_dir / "eval.md", markdown_table(rows))
    distributed.barrier()  # the files exist on return, whichever rank returns first
    result["table"] = markdown_table(rows)
    result["out"] = str(out_dir)
    return result


def _output_dir(checkpoint: str | Path, out: str | Path | None) -> Path:
    if out is not None:
        return Path(out)
    path = Path(checkpoint)
    if path.is_dir() and (path / "checkpoints").is_dir():
        return path
    if path.is_dir() and path.parent.name == "checkpoints":
        return path.parent.parent
    raise UserError(f"{checkpoint} is not a run directory: give --out DIR for the results")
