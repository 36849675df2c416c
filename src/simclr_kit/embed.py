"""Embeddings of a dataset split to a file: backbone features (and optionally projections).

Parquet (default): one row per image with columns ``split`` (str), ``id`` (int64: the row of the
split the image came from; stable across runs, gaps where unreadable rows were skipped),
``file`` (str) when the images came from files (an image folder), ``label`` (int64, -1 for a
row without one) and ``class_name`` (str, null without a label) when the split is labelled,
``feature`` (fixed-size list of float32, length ``feature_dim``) and, with projections,
``projection`` (length ``projection_dim``). The checkpoint and dataset provenance sit in the
schema metadata under the key ``simclr_kit``.

NumPy (``--format npy``, ``OUT.npy``): ``OUT.npy`` holds the features ``(N, feature_dim)``
float32, ``OUT.ids.npy`` the ids ``(N,)`` int64, ``OUT.files.npy`` the files ``(N,)`` (str)
when known, ``OUT.labels.npy`` the labels ``(N,)`` int64 when present,
``OUT.projections.npy`` ``(N, projection_dim)`` when asked for, and ``OUT.json`` the metadata
(class names, split, checkpoint, shapes).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from simclr_kit.atomic import atomic_file, atomic_write_text
from simclr_kit.config import DataConfig
from simclr_kit.data.pixels import chosen_crop_fraction
from simclr_kit.data.skip_reports import announce_skipped, list_skipped
from simclr_kit.data.splits import TRAIN_SPLITS, whole_split
from simclr_kit.data.store import ImageStore, decode_split
from simclr_kit.devices import resolve_device
from simclr_kit.errors import UserError
from simclr_kit.evaluation.features import forward_images
from simclr_kit.models.encoder import Encoder, Weights, encoder_from_weights, read_weights
from simclr_kit.models.heads import ProjectionHead
from simclr_kit.provenance import data_for, run_directory

FORMATS = ("parquet", "npy")


@dataclass
class Embeddings:
    """``features: (N, D)`` float32, ``projections: (N, P)`` or None, ids/labels ``(N,)`` int64."""

    features: Tensor
    projections: Tensor | None
    ids: Tensor
    labels: Tensor | None
    class_names: list[str] | None
    meta: dict[str, Any]
    files: list[str] | None = None  # the file of each image, when they came from files


def backbone_features(encoder: Encoder, images: Tensor, device: torch.device | str = "cpu",
                      batch_size: int = 256, progress: bool = False,
                      desc: str = "embedding") -> Tensor:
    """``images: (N, 3, S, S) uint8`` -> ``(N, feature_dim)`` float32 on the CPU, in eval mode.

    ``images`` are already in evaluation form (``decode_split`` at the encoder's size): they are
    normalised as ``encoder.transform`` normalises, not cropped again. Unlike
    :func:`simclr_kit.evaluation.features.extract_features` it never talks to other ranks, so a
    single process (rank 0 writing a report) may call it alone.
    """
    encoder = encoder.to(device).eval()
    features = forward_images(encoder, images, encoder.mean, encoder.std, device, batch_size,
                              progress=progress, desc=desc)
    return features if len(features) else torch.empty(0, encoder.feature_dim)


def projection_head(weights: Weights) -> ProjectionHead:
    """The trained projection head of a full SimCLR checkpoint, eval mode, loaded strictly."""
    if weights.full is None:
        raise UserError(f"{weights.path} holds no projection head (an exported backbone or a "
                        "foreign state dict?): projections need a pretraining checkpoint")
    state = {k[len("projection_head."):]: v for k, v in weights.full.items()
             if k.startswith("projection_head.")}
    try:
        hidden, in_dim = state["layers.0.weight"].shape
        out_dim = state["layers.3.weight"].shape[0]
        head = ProjectionHead(in_dim, hidden, out_dim)
        head.load_state_dict(state, strict=True)
    except (KeyError, RuntimeError) as err:
        raise UserError(f"{weights.path}: the projection head has an unexpected layout "
                        f"({type(err).__name__}: {str(err).splitlines()[0]})") from None
    return head.eval()


@torch.no_grad()
def _project(head: ProjectionHead, features: Tensor, batch_size: int) -> Tensor:
    """``(N, D)`` -> ``(N, P)``; BatchNorm uses its running statistics (eval mode)."""
    parts = [head(chunk) for chunk in features.split(batch_size)]
    return torch.cat(parts) if parts else torch.empty(0, head.layers[-1].out_features)


def compute_embeddings(checkpoint: str | Path,
                       data: DataConfig | str | dict[str, Any] | None = None,
                       projections: bool = False, device: str = "auto", batch_size: int = 256,
                       progress: bool = True, skipped_file: Path | None = None) -> Embeddings:
    """Embed every row of one split with ``checkpoint``'s encoder: ``--split``, else the only
    split, else 'train' (:func:`~simclr_kit.data.splits.whole_split`; nothing is carved off
    for validation).

    ``data`` as :func:`simclr_kit.evaluation.protocols.evaluate` takes it: None (or a dict
    without ``data``) is the run's own dataset. Unreadable images are listed in
    ``skipped_file`` when one is given."""
    dev = resolve_device(device)
    weights = read_weights(checkpoint)
    encoder = encoder_from_weights(weights).to(dev).eval()
    head = projection_head(weights) if projections else None  # fails before any decoding
    data = data_for("embed", encoder.meta, data, run_directory(checkpoint))
    store: ImageStore = decode_split(whole_split(data, TRAIN_SPLITS), encoder.image_size,
                                     data.bad_images, progress, missing_labels="keep",
                                     workers=data.decode_workers,
                                     crop_fraction=chosen_crop_fraction(data.crop_fraction,
                                                                        encoder.meta))
    listed = list_skipped(skipped_file, store) if skipped_file is not None else ""
    announce_skipped(store, ": they get no embedding" + listed)
    features = backbone_features(encoder, store.images, dev, batch_size, progress)
    projected = _project(head, features, batch_size) if head is not None else None
    meta = {"checkpoint": str(checkpoint), "split": store.provenance.get("split"),
            "dataset": store.provenance, "feature_dim": int(features.shape[1]),
            "projection_dim": None if projected is None else int(projected.shape[1]),
            **{k: encoder.meta.get(k) for k in ("backbone", "stem", "image_size", "epoch")}}
    files = store.files if any(store.files) else None
    return Embeddings(features, projected, store.row_ids.clone(), store.labels, store.class_names,
                      meta, files)


def _fixed_lists(values: Tensor) -> Any:
    import pyarrow as pa

    flat = pa.array(values.numpy().astype(np.float32).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, int(values.shape[1]))


def write_parquet(emb: Embeddings, path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = emb.features.shape[0]
    columns: dict[str, Any] = {"split": pa.array([emb.meta["split"]] * n, pa.string()),
                               "id": pa.array(emb.ids.numpy(), pa.int64())}
    if emb.files is not None:
        columns["file"] = pa.array(emb.files, pa.string())
    if emb.labels is not None:
        columns["label"] = pa.array(emb.labels.numpy(), pa.int64())
        if emb.class_names:
            columns["class_name"] = pa.array([emb.class_names[int(i)] if i >= 0 else None
                                              for i in emb.labels], pa.string())
    columns["feature"] = _fixed_lists(emb.features)
    if emb.projections is not None:
        columns["projection"] = _fixed_lists(emb.projections)
    table = pa.table(columns).replace_schema_metadata(
        {"simclr_kit": json.dumps(dict(emb.meta, class_names=emb.class_names))})
    with atomic_file(path) as tmp:
        pq.write_table(table, tmp)


def write_npy(emb: Embeddings, path: Path) -> list[Path]:
    """``OUT.npy`` plus the files beside it (see module docstring); returns every path written."""
    stem = path.with_suffix("")
    arrays = {"": emb.features.numpy().astype(np.float32), ".ids": emb.ids.numpy()}
    if emb.files is not None:
        arrays[".files"] = np.asarray(emb.files, dtype=str)
    if emb.labels is not None:
        arrays[".labels"] = emb.labels.numpy()
    if emb.projections is not None:
        arrays[".projections"] = emb.projections.numpy().astype(np.float32)
    written = []
    for suffix, array in arrays.items():
        target = Path(f"{stem}{suffix}.npy")
        with atomic_file(target) as tmp, open(tmp, "wb") as f:  # a file object: no suffix added
            np.save(f, array)
        written.append(target)
    sidecar = dict(emb.meta, class_names=emb.class_names, rows=int(emb.features.shape[0]),
                   files={k.lstrip(".") or "features": Path(f"{stem}{k}.npy").name for k in arrays})
    atomic_write_text(stem.with_suffix(".json"), json.dumps(sidecar, indent=2) + "\n")
    return written + [stem.with_suffix(".json")]


def embed(checkpoint: str | Path, data: DataConfig | str | dict[str, Any] | None,
          out: str | Path, fmt: str | None = None, projections: bool = False,
          device: str = "auto", batch_size: int = 256, progress: bool = True) -> Embeddings:
    """Write the embeddings of a split to ``out`` as Parquet or ``.npy`` (format from ``fmt``,
    else from the suffix of ``out``), the unreadable images to ``OUT.skipped.txt``; returns
    the embeddings. ``data``: as :func:`compute_embeddings` takes it."""
    out = Path(out)
    fmt = fmt or ("npy" if out.suffix == ".npy" else "parquet")
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: choose parquet or npy")
    if fmt == "npy" and out.suffix != ".npy":
        raise UserError(f"--format npy writes OUT.npy and files beside it: name --out {out} "
                        "with a .npy suffix")
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be >= 1")
    emb = compute_embeddings(checkpoint, data, projections, device, batch_size, progress,
                             out.with_name(f"{out.stem}.skipped.txt"))
    out.parent.mkdir(parents=True, exist_ok=True)
    (write_npy if fmt == "npy" else write_parquet)(emb, out)
    return emb
