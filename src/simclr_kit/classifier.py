"""The downstream classifier: extracted backbone + new head, cross-entropy, Adam; save; predict.

Frozen (default): the backbone is in eval mode and gets no gradient, so its features are fixed;
they are computed once and the head trains on them (the same result as a forward per epoch, far
faster). ``finetune=True`` trains the whole network, backbone at ``lr x backbone_lr_mult``, with
random crops and flips.
"""

from __future__ import annotations

import csv
import glob
import io
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from simclr_kit import __version__
from simclr_kit.augment import normalize
from simclr_kit.checkpoint import atomic_write_text, load_weights, read_metadata, save_weights
from simclr_kit.config import ClassifierConfig, DataConfig
from simclr_kit.data.sources import (IMAGE_SUFFIXES, Split, find_image_column, open_source,
                                     open_splits)
from simclr_kit.data.store import ImageStore, decode_split, skipped_summary
from simclr_kit.devices import resolve_device
from simclr_kit.encoder import Encoder, load_encoder
from simclr_kit.errors import UserError
from simclr_kit.evaluation.features import extract_features
from simclr_kit.evaluation.finetune import FINETUNE_AUGMENT, accuracy, finetune
from simclr_kit.models import Classifier, build_backbone

__all__ = ["FINETUNE_AUGMENT", "accuracy", "load_classifier", "predict", "train_classifier"]


def _train_head_on_features(model: Classifier, f_train: Tensor, y_train: Tensor,
                            cfg: ClassifierConfig, progress: bool) -> None:
    optimizer = torch.optim.Adam(model.head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    g = torch.Generator().manual_seed(cfg.seed)
    model.head.train()
    for _ in tqdm(range(cfg.epochs), desc="head", unit="epoch", disable=not progress, leave=False):
        perm = torch.randperm(f_train.shape[0], generator=g)
        for start in range(0, f_train.shape[0], cfg.batch_size):
            idx = perm[start:start + cfg.batch_size]
            loss = F.cross_entropy(model.head(f_train[idx]), y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()


def _finetune(model: Classifier, train: ImageStore, mean, std, cfg: ClassifierConfig,
              device: torch.device, progress: bool) -> None:
    assert train.labels is not None
    finetune(model, train.images, train.labels, mean, std, epochs=cfg.epochs, lr=cfg.lr,
             backbone_lr_mult=cfg.backbone_lr_mult, batch_size=cfg.batch_size,
             weight_decay=cfg.weight_decay, seed=cfg.seed, device=device, progress=progress)


def train_classifier(checkpoint: str | Path, data: DataConfig, out: str | Path,
                     cfg: ClassifierConfig | None = None, device: str = "auto",
                     progress: bool = True) -> dict[str, Any]:
    """Train a classifier on the encoder from ``checkpoint``; save it in ``out``; return metrics."""
    cfg = cfg or ClassifierConfig()
    out = Path(out)
    if (out / "classifier.safetensors").exists():
        raise UserError(f"{out} already holds a classifier: choose another --out")
    dev = resolve_device(device)
    encoder = load_encoder(checkpoint, dev)
    train_split, val_split = open_splits(data, need_eval=True)
    train = decode_split(train_split, encoder.image_size, data.bad_images, progress)
    val = decode_split(val_split, encoder.image_size, data.bad_images, progress)  # type: ignore[arg-type]
    for store, role in ((train, "train"), (val, "validation")):
        if store.skipped:
            tqdm.write(skipped_summary(store))
        if store.labels is None:
            raise UserError(f"the {role} split has no labels: a classifier needs a label column")
    if int(train.labels.unique().numel()) < 2:  # type: ignore[union-attr]
        raise UserError(f"the train split {train.provenance.get('split')!r} has a single class: "
                        "a classifier needs at least two")
    class_names = train.class_names or [str(i) for i in range(int(train.labels.max()) + 1)]
    torch.manual_seed(cfg.seed)
    model = Classifier(encoder.backbone, encoder.feature_dim, len(class_names), cfg.head,
                       cfg.hidden_dim, frozen=not cfg.finetune).to(dev)
    if cfg.finetune:
        _finetune(model, train, encoder.mean, encoder.std, cfg, dev, progress)
    else:
        f_train = extract_features(encoder, train.images, encoder.mean, encoder.std, dev,
                                   progress=progress, desc="train features")
        _train_head_on_features(model, f_train.to(dev), train.labels.to(dev), cfg, progress)
    val_acc = accuracy(model, val.images, val.labels, encoder.mean, encoder.std, dev)
    meta = {"kind": "classifier", "class_names": class_names, "image_size": encoder.image_size,
            "mean": list(encoder.mean), "std": list(encoder.std),
            "backbone": encoder.meta.get("backbone", "resnet18"),
            "stem": encoder.meta.get("stem", "imagenet"), "feature_dim": encoder.feature_dim,
            "head": cfg.head, "hidden_dim": cfg.hidden_dim, "finetune": cfg.finetune,
            "encoder_checkpoint": str(checkpoint), "val_accuracy": val_acc,
            "val_split": val.provenance, "config": cfg.__dict__, "package_version": __version__}
    out.mkdir(parents=True, exist_ok=True)
    save_weights(out / "classifier.safetensors", model.state_dict(), meta)
    return {"val_accuracy": val_acc, "out": str(out), "classes": len(class_names)}


def load_classifier(cls_dir: str | Path, device: torch.device) -> tuple[Classifier, dict]:
    path = Path(cls_dir)
    file = path / "classifier.safetensors" if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"{cls_dir} holds no classifier.safetensors (made by train-classifier)")
    meta = read_metadata(file)  # the header's copy: the sidecar may be lost or edited
    if meta.get("kind") != "classifier":
        raise UserError(f"{file} is not a classifier saved by train-classifier")
    backbone = build_backbone(meta["backbone"], meta["stem"])
    model = Classifier(backbone, meta["feature_dim"], len(meta["class_names"]), meta["head"],
                       meta["hidden_dim"], frozen=True)
    model.load_state_dict(load_weights(file), strict=True)
    return model.to(device).eval(), meta


def _image_paths(spec: str) -> list[Path] | None:
    """Image files named by ``spec`` (a file, a glob, or a folder of images), or None."""
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
        return [path]
    if any(ch in spec for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True))
    elif path.is_dir() and not any(path.rglob("*.parquet")) and not (path / "state.json").exists() \
            and not (path / "dataset_dict.json").exists():
        files = sorted(p for p in path.rglob("*") if p.is_file())
    else:
        return None
    return [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]


def prediction_split(cfg: DataConfig) -> Split:
    """Every row of ``cfg.train_split`` (``--split``), else of the only split, else of 'test'."""
    dd = open_source(cfg)
    name = cfg.train_split or (next(iter(dd)) if len(dd) == 1 else
                               "test" if "test" in dd else "train")
    if name not in dd:
        raise UserError(f"split {name!r} not found; splits: {list(dd)} (choose with --split)")
    ds = dd[name]
    return Split(ds, find_image_column(ds.features, cfg.image_column), None, None, cfg.data, name)


def _read_image_files(paths: list[Path], encoder: Encoder, bad_images: str) -> tuple[list[str],
                                                                                      Tensor]:
    """(ids, ``(N, 3, S, S) uint8``) of the readable files; unreadable ones follow ``bad_images``."""
    from PIL import Image

    ids, arrays, skipped = [], [], []
    for path in paths:
        try:
            with Image.open(path) as img:
                arrays.append(encoder.to_uint8(img))
            ids.append(str(path))
        except Exception as err:  # PIL raises many types for bad bytes
            reason = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
            if bad_images == "error":
                raise UserError(f"{path} is not a readable image ({reason}); fix or remove it, "
                                "or pass --bad-images skip to skip such images") from None
            skipped.append(path)
    if not arrays:
        raise UserError(f"none of the {len(paths)} image files could be read (first: {skipped[0]})")
    if skipped:
        tqdm.write(f"skipped {len(skipped)} unreadable image file(s), which get no prediction: "
                   + ", ".join(str(p) for p in skipped[:3]) + (" ..." if len(skipped) > 3 else ""))
    return ids, torch.cat(arrays)


def predict(cls_dir: str | Path, data: str, out: str | Path, device: str = "auto",
            data_config: DataConfig | None = None, batch_size: int = 256) -> int:
    """Write ``out`` (CSV: id, predicted class, probability), one row per image; returns rows."""
    dev = resolve_device(device)
    model, meta = load_classifier(cls_dir, dev)
    encoder = Encoder(model.backbone, meta["image_size"], meta["mean"], meta["std"], meta)
    paths = _image_paths(data)
    if paths is not None:
        if not paths:
            raise UserError(f"no images found at {data}")
        policy = (data_config or DataConfig()).bad_images
        ids, images = _read_image_files(paths, encoder, policy)
    else:
        cfg = data_config or DataConfig(data=data)
        store = decode_split(prediction_split(cfg), meta["image_size"], cfg.bad_images,
                             progress=False)
        if store.skipped:
            tqdm.write(skipped_summary(store) + ": they get no prediction")
        ids = [str(int(r)) for r in store.row_ids]
        images = store.images
    rows = []
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            x = normalize(images[start:start + batch_size].to(dev), meta["mean"], meta["std"])
            prob = model(x).softmax(1).cpu()
            p, c = prob.max(1)
            rows += [(ids[start + i], meta["class_names"][int(c[i])], f"{float(p[i]):.6f}")
                     for i in range(len(c))]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = [["id", "predicted", "probability"], *rows]
    buf = io.StringIO()
    csv.writer(buf).writerows(text)
    atomic_write_text(out, buf.getvalue())
    return len(rows)
