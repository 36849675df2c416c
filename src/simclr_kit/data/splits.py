"""The split each command reads, by one rule (:func:`pick_split`), as a :class:`Split` with its
columns; the train and evaluation splits, a validation part carved off a single split
(:func:`open_splits`)."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np

from simclr_kit.config import DataConfig
from simclr_kit.data.columns import find_image_column, find_label_column, label_values
from simclr_kit.data.image_folders import files_split_name, non_image_files
from simclr_kit.data.sources import open_source
from simclr_kit.errors import UserError


@dataclass(frozen=True)
class Split:
    """One split of a source with its resolved columns and provenance."""

    dataset: datasets.Dataset
    image_column: str
    label_column: str | None
    class_names: list[str] | None
    source: str
    split: str
    ignored: tuple[str, ...] = ()  # files of an image folder skipped as not images (by suffix)

    @property
    def provenance(self) -> dict:
        return {"source": self.source, "split": self.split, "rows": len(self.dataset),
                "fingerprint": self.dataset._fingerprint, "image_column": self.image_column,
                "label_column": self.label_column}


def _class_names(ds: datasets.Dataset, label_column: str | None) -> list[str] | None:
    if label_column is None:
        return None
    feature = ds.features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    values = label_values(ds, label_column)
    top = int(values.max()) if len(values) else -1
    return [str(i) for i in range(top + 1)]


def _make_split(ds: datasets.Dataset, cfg: DataConfig, split: str) -> Split:
    image_column = find_image_column(ds.features, cfg.image_column)
    label_column = find_label_column(ds.features, cfg.label_column)
    return Split(ds, image_column, label_column, _class_names(ds, label_column), cfg.data, split)


# Which split each command reads when none is named, in order of preference.
TRAIN_SPLITS = ("train",)  # pretraining, evaluation's train side, embed
EVAL_SPLITS = ("validation", "valid", "val", "test")  # evaluation's held-out side
PREDICT_SPLITS = ("test", "train")  # predict


def pick_split(names: Sequence[str], requested: str | None, preferred: Sequence[str],
               flag: str, required: bool = True) -> str | None:
    """The split rule of every command: ``requested`` (the command's ``flag``), else the only
    split, else the first of ``preferred`` that ``names`` holds.

    Without any of them: a UserError naming ``flag`` when ``required``, else None.
    """
    names = list(names)
    if requested is not None:
        if requested not in names:
            raise UserError(f"split {requested!r} not found; splits: {names} (choose with "
                            f"{flag})")
        return requested
    if len(names) == 1:
        return names[0]
    name = next((n for n in preferred if n in names), None)
    if name is None and required:
        wanted = " or ".join(repr(n) for n in preferred)
        raise UserError(f"no {wanted} split among {names}: choose one with {flag}")
    return name


def whole_split(cfg: DataConfig, preferred: Sequence[str], name_files: bool = False) -> Split:
    """Every row of one split, nothing carved off for validation: the :func:`pick_split` of
    ``cfg.train_split`` (the ``--split`` of embed and predict) and the command's ``preferred``
    (:data:`TRAIN_SPLITS`, :data:`PREDICT_SPLITS`). Labels and class names come with it when
    the split has a label column.

    ``name_files``: images read from files that no split folder groups (a flat or
    class-per-folder tree, a glob, one file), which the loader calls 'train' of its own
    accord, are named after what ``--data`` named instead ('new_photos/'), not 'train'."""
    dd = open_source(cfg)
    name = pick_split(list(dd), cfg.train_split, preferred, "--split")
    assert name is not None
    label = files_split_name(cfg, list(dd)) if name_files and cfg.train_split is None else None
    return _make_split(dd[name], cfg, label or name)


def _carve_validation(ds: datasets.Dataset, cfg: DataConfig) -> tuple[datasets.Dataset,
                                                                       datasets.Dataset]:
    """Split a single split into train and a validation part of ``cfg.val_fraction`` (seed
    recorded), stratified by a ClassLabel column.

    The rows are those of ``ds.train_test_split(test_size=cfg.val_fraction,
    seed=cfg.split_seed, stratify_by_column=...)``, drawn by the same function from the same
    generator; only the label column is read as one array, where ``train_test_split`` reads it
    one row at a time (over a minute for 1.28 M rows, bench/RESULTS.md).
    """
    from datasets.utils.stratify import stratified_shuffle_split_generate_indices

    n = len(ds)
    if n == 0:
        return ds, ds  # as train_test_split: the decode then says the split is empty
    n_val = math.ceil(cfg.val_fraction * n)
    if n_val >= n:
        raise UserError(f"cannot split off a validation part: {n} row(s) leave none to train on "
                        f"after {cfg.val_fraction:.0%} for validation")
    rng = np.random.default_rng(cfg.split_seed)
    label_column = find_label_column(ds.features, cfg.label_column)
    if label_column and isinstance(ds.features[label_column], datasets.ClassLabel):
        labels = label_values(ds, label_column)
        classes, counts = np.unique(labels, return_counts=True)
        if counts.min() < 2 or min(n_val, n - n_val) < len(classes):
            raise UserError(f"cannot split off a validation part stratified by "
                            f"{label_column!r}: each of its {len(classes)} classes needs a row "
                            f"on both sides ({n_val} validation and {n - n_val} train rows; the "
                            f"smallest class has {counts.min()}); name an --eval-split or "
                            "change --val-fraction")
        train, val = next(stratified_shuffle_split_generate_indices(labels, n - n_val, n_val,
                                                                    rng=rng))
    else:
        order = rng.permutation(n)
        train, val = order[n_val:], order[:n_val]
    return ds.select(train), ds.select(val)


def open_splits(cfg: DataConfig, need_eval: bool) -> tuple[Split, Split | None]:
    """The pretraining/train split and, if ``need_eval``, the evaluation split.

    Both by :func:`pick_split`. Train: ``cfg.train_split``, else the only split, else ``train``.
    Evaluation: ``cfg.eval_split``, else ``validation``, else ``test`` (:data:`EVAL_SPLITS`);
    with a single split, a stratified ``cfg.val_fraction`` part is split off with
    ``cfg.split_seed`` (and pretraining uses only the rest).
    """
    dd = open_source(cfg)
    train_name = pick_split(list(dd), cfg.train_split, TRAIN_SPLITS, "--train-split")
    assert train_name is not None
    # A single split is its own evaluation split, which means: carve one off it (below).
    eval_name = pick_split(list(dd), cfg.eval_split, EVAL_SPLITS, "--eval-split",
                           required=False)
    train_ds = dd[train_name]
    has_labels = find_label_column(train_ds.features, cfg.label_column) is not None
    if (eval_name is None or eval_name == train_name) and not has_labels:
        if need_eval:
            raise UserError(f"{cfg.data} has no label column, so it cannot be evaluated: "
                            "evaluate on a labelled dataset, or name one with --label-column")
        return _with_ignored(_make_split(train_ds, cfg, train_name), cfg), None
    if eval_name is None or eval_name == train_name:
        train_ds, eval_ds = _carve_validation(train_ds, cfg)
        train = _make_split(train_ds, cfg, f"{train_name}[carved train, seed {cfg.split_seed}]")
        evaluation = _make_split(eval_ds, cfg,
                                 f"{train_name}[carved {cfg.val_fraction:.0%} validation, "
                                 f"seed {cfg.split_seed}]")
    else:
        train = _make_split(train_ds, cfg, train_name)
        evaluation = _make_split(dd[eval_name], cfg, eval_name)
    return _with_ignored(train, cfg), (evaluation if need_eval else None)


def _with_ignored(train: Split, cfg: DataConfig) -> Split:
    """The training split of an image folder, with the folder's non-image files named."""
    path = Path(os.path.expanduser(cfg.data))
    if cfg.data == "digits" or not path.is_dir() or (path / "dataset_dict.json").is_file() \
            or (path / "state.json").is_file() or any(path.rglob("*.parquet")):
        return train
    return dataclasses.replace(train, ignored=non_image_files(path))
