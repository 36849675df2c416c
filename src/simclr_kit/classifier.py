"""The downstream classifier: extracted backbone + new head, cross-entropy, Adam; save; predict.

Frozen (default): the backbone is in eval mode and gets no gradient, so its features are fixed;
they are computed once and the head trains on them (the same result as a forward per epoch, far
faster), by the linear probe's trainer and recipe (``evaluation/linear.py``): standardised
features, Adam, a per-batch cosine, at least ``min_steps`` steps. So ``train-classifier --head
linear`` and ``evaluate``'s linear probe give the same accuracy on the same data and seed. The
standardisation is then folded into the head's first layer, so the saved classifier is
``head(backbone(x))`` on raw features, as before. ``finetune=True`` trains the whole network,
backbone at ``lr x backbone_lr_mult``, with random crops and flips.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from pathlib import Path
from typing import Any

import torch

from simclr_kit import __version__
from simclr_kit.atomic import atomic_write_text
from simclr_kit.checkpoint_files import load_into, load_weights, read_metadata, save_weights
from simclr_kit.config import ClassifierConfig, DataConfig, EvalConfig
from simclr_kit.data.pixels import chosen_crop_fraction
from simclr_kit.data.skip_reports import announce_skipped, list_skipped
from simclr_kit.data.splits import PREDICT_SPLITS, open_splits, whole_split
from simclr_kit.data.store import ImageStore, decode_split
from simclr_kit.devices import resolve_device
from simclr_kit.errors import UserError
from simclr_kit.evaluation.features import extract_features, forward_images
from simclr_kit.evaluation.finetune import FINETUNE_AUGMENT, accuracy, finetune
from simclr_kit.evaluation.linear import train_linear_probe
from simclr_kit.models.backbones import build_backbone, fit_former_classifier
from simclr_kit.models.encoder import Encoder, checked_meta, load_encoder
from simclr_kit.models.heads import Classifier
from simclr_kit.models.timm_backbones import is_timm_name
from simclr_kit.provenance import data_for, run_directory

__all__ = ["FINETUNE_AUGMENT", "accuracy", "load_classifier", "predict", "train_classifier"]


# What ClassifierConfig's epochs and batch_size left at None mean: a frozen head trains as
# evaluate's linear probe does (EvalConfig.linear_*); fine-tuning has its own.
_PROBE = EvalConfig()
FINETUNE_EPOCHS, FINETUNE_BATCH_SIZE = 30, 64


def _recipe(cfg: ClassifierConfig) -> ClassifierConfig:
    """``cfg`` with the epochs and batch size it leaves to the mode filled in."""
    epochs, batch_size = ((FINETUNE_EPOCHS, FINETUNE_BATCH_SIZE) if cfg.finetune else
                          (_PROBE.linear_epochs, _PROBE.linear_batch_size))
    return dataclasses.replace(cfg, epochs=cfg.epochs or epochs,
                               batch_size=cfg.batch_size or batch_size)


def _train_head_on_features(model: Classifier, encoder: Encoder, train: ImageStore,
                            val: ImageStore, num_classes: int, cfg: ClassifierConfig,
                            device: torch.device, progress: bool) -> float:
    """Train ``model.head`` on the frozen features of ``train`` exactly as ``evaluate``'s linear
    probe does (same features, recipe, seed); fold the standardisation into it; return the
    val accuracy (percent)."""
    assert train.labels is not None and val.labels is not None
    f_train, f_val = (extract_features(encoder, store.images, encoder.mean, encoder.std, device,
                                       _PROBE.batch_size, progress, f"{role} features")
                      for store, role in ((train, "train"), (val, "validation")))
    probe = train_linear_probe(f_train.to(device), train.labels.to(device), f_val.to(device),
                               val.labels.to(device), num_classes, epochs=cfg.epochs, lr=cfg.lr,
                               batch_size=cfg.batch_size, weight_decay=cfg.weight_decay,
                               seed=cfg.seed, progress=progress, min_steps=cfg.min_steps,
                               head=model.head)
    model.head = probe.folded_head()  # reads raw backbone features, as predict feeds it
    return probe.val_accuracy


def _finetune(model: Classifier, train: ImageStore, mean, std, cfg: ClassifierConfig,
              device: torch.device, progress: bool) -> None:
    assert train.labels is not None
    finetune(model, train.images, train.labels, mean, std, epochs=cfg.epochs, lr=cfg.lr,
             backbone_lr_mult=cfg.backbone_lr_mult, batch_size=cfg.batch_size,
             weight_decay=cfg.weight_decay, seed=cfg.seed, device=device, progress=progress)


def train_classifier(checkpoint: str | Path, data: DataConfig | str | dict[str, Any] | None,
                     out: str | Path, cfg: ClassifierConfig | None = None, device: str = "auto",
                     progress: bool = True) -> dict[str, Any]:
    """Train a classifier on the encoder from ``checkpoint``; save it in ``out``; return metrics.

    ``data`` as :func:`simclr_kit.evaluation.protocols.evaluate` takes it: None uses the run's
    own dataset (its last evaluation's, else its pretraining data).
    """
    cfg = cfg or ClassifierConfig()
    out = Path(out)
    if (out / "classifier.safetensors").exists():
        raise UserError(f"{out} already holds a classifier: choose another --out")
    dev = resolve_device(device)
    encoder = load_encoder(checkpoint, dev)
    data = data_for("train-classifier", encoder.meta, data, run_directory(checkpoint))
    train_split, val_split = open_splits(data, need_eval=True)
    crop_fraction = chosen_crop_fraction(data.crop_fraction, encoder.meta)
    train = decode_split(train_split, encoder.image_size, data.bad_images, progress,
                         workers=data.decode_workers, crop_fraction=crop_fraction)
    val = decode_split(val_split, encoder.image_size, data.bad_images, progress,  # type: ignore[arg-type]
                       workers=data.decode_workers, crop_fraction=crop_fraction)
    listed = list_skipped(out / "skipped.txt", train, val)
    for store, role in ((train, "train"), (val, "validation")):
        announce_skipped(store, listed)
        if store.labels is None:
            raise UserError(f"the {role} split has no labels: a classifier needs a label column")
    if int(train.labels.unique().numel()) < 2:  # type: ignore[union-attr]
        raise UserError(f"the train split {train.provenance.get('split')!r} has a single class: "
                        "a classifier needs at least two")
    cfg = _recipe(cfg)
    assert train.labels is not None and val.labels is not None
    # As many classes as evaluate counts (a label past the names gets its number as its name),
    # so the head, and its seeded initialisation, is the probe's.
    names = train.class_names or []
    num_classes = max(len(names), int(train.labels.max()) + 1, int(val.labels.max()) + 1)
    class_names = names + [str(i) for i in range(len(names), num_classes)]
    torch.manual_seed(cfg.seed)
    model = Classifier(encoder.backbone, encoder.feature_dim, num_classes, cfg.head,
                       cfg.hidden_dim, frozen=not cfg.finetune).to(dev)
    if cfg.finetune:
        _finetune(model, train, encoder.mean, encoder.std, cfg, dev, progress)
        val_acc = accuracy(model, val.images, val.labels, encoder.mean, encoder.std, dev)
    else:
        val_acc = _train_head_on_features(model, encoder, train, val, num_classes, cfg, dev,
                                          progress)
    meta = {"kind": "classifier", "class_names": class_names, "image_size": encoder.image_size,
            "crop_fraction": crop_fraction,
            "mean": list(encoder.mean), "std": list(encoder.std),
            "backbone": encoder.meta.get("backbone", "resnet18"),
            "stem": encoder.meta.get("stem", "imagenet"), "feature_dim": encoder.feature_dim,
            "head": cfg.head, "hidden_dim": cfg.hidden_dim, "finetune": cfg.finetune,
            "encoder_checkpoint": str(checkpoint), "val_accuracy": val_acc,
            "val_split": val.provenance, "data": dataclasses.asdict(data), "config": cfg.__dict__,
            "package_version": __version__}
    if "create_model_kwargs" in encoder.meta:  # a timm backbone: how to rebuild it
        meta["create_model_kwargs"] = encoder.meta["create_model_kwargs"]
    out.mkdir(parents=True, exist_ok=True)
    save_weights(out / "classifier.safetensors", model.state_dict(), meta)
    return {"val_accuracy": val_acc, "out": str(out), "classes": len(class_names)}


# What a classifier's metadata must hold to be rebuilt and applied.
_CLASSIFIER_FIELDS = ("backbone", "stem", "feature_dim", "class_names", "head", "hidden_dim",
                      "image_size", "mean", "std")


def load_classifier(cls_dir: str | Path, device: torch.device) -> tuple[Classifier, dict]:
    path = Path(cls_dir)
    file = path / "classifier.safetensors" if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"{cls_dir} holds no classifier.safetensors (made by train-classifier)")
    meta = read_metadata(file)  # the header's copy: the sidecar may be lost or edited
    if meta.get("kind") != "classifier":
        raise UserError(f"{file} is not a classifier saved by train-classifier")
    meta = checked_meta(meta, file, _CLASSIFIER_FIELDS)
    backbone = build_backbone(meta["backbone"], meta["stem"],
                              kwargs=meta.get("create_model_kwargs"))
    state = load_weights(file)
    if not is_timm_name(meta["backbone"]):
        fit_former_classifier(backbone, [k[len("backbone."):] for k in state
                                         if k.startswith("backbone.")])
    model = Classifier(backbone, meta["feature_dim"], len(meta["class_names"]), meta["head"],
                       meta["hidden_dim"], frozen=True)
    try:
        load_into(model, state)
    except RuntimeError as err:  # shapes or keys other than its metadata describes
        detail = [line.strip() for line in str(err).splitlines() if line.strip()]
        raise UserError(f"{file} does not fit the classifier its metadata describes "
                        f"({meta['backbone']}, {meta['feature_dim']} features, "
                        f"{len(meta['class_names'])} classes, {meta['head']} head): "
                        f"{detail[-1][:160] if detail else err}") from None
    return model.to(device).eval(), meta


def _ids_and_labels(store: ImageStore) -> tuple[list[str], list[str] | None]:
    """CSV ids (the file path for images read from files on this machine, else the row of the
    split) and true class names ('' for a row without a label; None for an unlabelled split)."""
    local = bool(store.files) and all(f and Path(f).is_file() for f in store.files)
    ids = list(store.files) if local else [str(int(r)) for r in store.row_ids]
    if store.labels is None:
        return ids, None
    names = store.class_names or []
    labels = ["" if y < 0 else names[y] if y < len(names) else str(y)
              for y in store.labels.tolist()]
    return ids, labels


def predict(cls_dir: str | Path, data: DataConfig | str | dict[str, Any] | None,
            out: str | Path, device: str = "auto", data_config: DataConfig | None = None,
            batch_size: int = 256, split: str | None = None) -> int:
    """Write ``out``, one CSV row per image: ``id``, ``label`` (the true class, when the split
    has labels), ``predicted`` (class name) and ``probability``; returns the rows written.

    ``data``: anything ``--data`` takes, image files, globs and folders of images included,
    read as pretraining reads it (the same skipped-images line, the images listed in
    ``OUT.skipped.txt``), or a dict of data fields; None (or a dict without ``data``) takes the
    dataset the classifier was trained on. ``data_config`` replaces it whole. Every row of
    ``split``, else of the only split, else of 'test', else of 'train'. ``id`` is the file for
    images read from files on this machine, else the row of the split.
    """
    dev = resolve_device(device)
    model, meta = load_classifier(cls_dir, dev)
    store = decode_for_predict(meta, data, out, data_config, split)
    logits = forward_images(model, store.images, meta["mean"], meta["std"], dev, batch_size)
    return write_predictions(store, logits, meta["class_names"], out)


def decode_for_predict(meta: dict[str, Any], data: DataConfig | str | dict[str, Any] | None,
                       out: str | Path, data_config: DataConfig | None = None,
                       split: str | None = None) -> ImageStore:
    """The images to predict (see :func:`predict` for ``data``, ``data_config`` and ``split``),
    decoded as the classifier's metadata ``meta`` says (its image size and crop), with the
    skipped-images line and ``OUT.skipped.txt``; shared by ``predict`` and ``predict --onnx``."""
    cfg = data_config or data_for("predict", meta, data, None)
    if split is not None or not isinstance(data_config or data, DataConfig):
        cfg = dataclasses.replace(cfg, train_split=split)
    out = Path(out)
    store = decode_split(whole_split(cfg, PREDICT_SPLITS, name_files=True), meta["image_size"],
                         cfg.bad_images, progress=False, missing_labels="keep",
                         workers=cfg.decode_workers,
                         crop_fraction=chosen_crop_fraction(cfg.crop_fraction, meta))
    announce_skipped(store, ": they get no prediction"
                     + list_skipped(out.with_name(f"{out.stem}.skipped.txt"), store))
    return store


def write_predictions(store: ImageStore, logits: torch.Tensor, class_names: list[str],
                      out: str | Path) -> int:
    """The CSV of :func:`predict` from ``logits: (N, C)`` of the N images of ``store``;
    returns N."""
    ids, labels = _ids_and_labels(store)
    rows = []
    if len(store):
        p, c = logits.softmax(1).max(1)
        rows = [[ids[i]] + ([] if labels is None else [labels[i]])
                + [class_names[int(c[i])], f"{float(p[i]):.6f}"] for i in range(len(c))]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    header = ["id"] + ([] if labels is None else ["label"]) + ["predicted", "probability"]
    buf = io.StringIO()
    csv.writer(buf).writerows([header, *rows])
    atomic_write_text(out, buf.getvalue())
    return len(rows)
