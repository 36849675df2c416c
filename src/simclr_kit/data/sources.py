"""Open any image source as a Hugging Face ``datasets`` split and find its columns.

Sources: the embedded ``digits`` set, a hub id, a ``save_to_disk`` directory, a directory or glob
of Parquet files, an image folder (sub-folder per class, or flat and unlabeled).
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from simclr_kit.config import DataConfig
from simclr_kit.data.names import IMAGE_SUFFIXES, check_data_name, near_names
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


def digits_dataset() -> datasets.DatasetDict:
    """scikit-learn's 8x8 digits (1,797 images, shipped in its wheel), pixels 0-16 scaled to 0-255."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = np.round(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)  # (N, 8, 8)
    features = datasets.Features({
        "image": datasets.Image(),
        "label": datasets.ClassLabel(names=[str(d) for d in range(10)]),
    })
    from PIL import Image

    data = {"image": [Image.fromarray(p, mode="L") for p in pixels],
            "label": bunch.target.tolist()}
    return datasets.DatasetDict({"train": datasets.Dataset.from_dict(data, features=features)})


def _is_image_folder(path: Path) -> bool:
    return any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.rglob("*") if p.is_file())


def _script_error(name: str, script: str) -> UserError:
    """Loading scripts are code from the dataset's author; recent ``datasets`` refuses to run
    them, and so does this package."""
    return UserError(
        f"{name!r} needs a loading script ({script}), and dataset code is never run: convert it "
        "to Parquet once, in a separate environment with datasets<4 and only if you trust its "
        f"author (load_dataset({name!r}, trust_remote_code=True), then ds[split].to_parquet("
        "'DIR/split.parquet') for each split) and pass --data DIR; or try the hub's own Parquet "
        "export with --revision refs/convert/parquet")


def non_image_files(folder: Path) -> tuple[str, ...]:
    """Files of an image folder that the ``imagefolder`` loader leaves out (by suffix); hidden
    files and the loader's metadata files are not counted."""
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    known = {e.lower() for e in ImageFolder.EXTENSIONS} | {".parquet"}
    meta = set(ImageFolder.METADATA_FILENAMES)
    return tuple(sorted(
        str(p) for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() not in known and p.name not in meta
        and not any(part.startswith((".", "__")) for part in p.relative_to(folder).parts)))


def _read_files(where: str, load, *args, **kwargs) -> datasets.DatasetDict:
    """``load(*args, **kwargs)`` on the user's files; a file that is truncated, corrupt or not
    what its name says is one line naming the problem, not an Arrow traceback. The loader's
    "Downloading data" and "Generating split" bars stay hidden: nothing is downloaded, and
    decoding has its own bar."""
    import pyarrow

    level = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity_error()  # it would log the same problem on its own line
    bars = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        return load(*args, **kwargs)
    except (pyarrow.ArrowException, datasets.exceptions.DatasetGenerationError, OSError,
            ValueError) as err:
        cause = err.__cause__ or err  # DatasetGenerationError wraps the reader's error
        text = (str(cause).strip().splitlines() or [type(cause).__name__])[0][:200]
        raise UserError(f"cannot read {where}: {text}") from None
    finally:
        datasets.logging.set_verbosity(level)
        if bars:
            datasets.enable_progress_bars()


def _load_local(path: Path) -> datasets.DatasetDict:
    loaded = _read_files(str(path), _load_local_files, path)
    if loaded is None:
        scripts = [path] if path.suffix == ".py" else sorted(path.glob("*.py"))
        if scripts:
            raise _script_error(str(path), scripts[0].name)
        raise UserError(f"{path} holds no Parquet files, no saved dataset and no images")
    return loaded


def _load_local_files(path: Path) -> datasets.DatasetDict | None:
    if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
        return datasets.load_dataset("imagefolder", data_files={"train": [str(path)]})
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        loaded = datasets.load_from_disk(str(path))
        return loaded if isinstance(loaded, datasets.DatasetDict) else \
            datasets.DatasetDict({"train": loaded})
    if path.is_file() and path.suffix == ".parquet":
        return datasets.load_dataset("parquet", data_files={"train": str(path)})
    if any(path.rglob("*.parquet")):
        return datasets.load_dataset("parquet", data_dir=str(path))
    if _is_image_folder(path):
        return datasets.load_dataset("imagefolder", data_dir=str(path))
    return None


# How long the hub may take to answer before a name is given up on: the hub client's own
# retries would wait for half a minute on a machine without a network.
HUB_CONNECT_SECONDS = 5.0


def _hub_unreachable(endpoint: str) -> str | None:
    """None when ``endpoint`` answers (any HTTP status) within :data:`HUB_CONNECT_SECONDS`,
    else the error's name. Through the hub client's session, so a configured proxy is used."""
    import huggingface_hub

    try:
        huggingface_hub.get_session().head(endpoint, timeout=HUB_CONNECT_SECONDS)
    except Exception as err:  # noqa: BLE001 - whatever the transport raises means: not reached
        return type(err).__name__
    return None


def _load_hub(cfg: DataConfig, near: str = "") -> datasets.DatasetDict:
    """``cfg.data`` from the hub; ``near`` is the hint of local names close to it, which every
    message repeats (a mistyped folder is the likelier story)."""
    import huggingface_hub

    from simclr_kit import distributed

    # The hub client logs every retry; the one line below says what went wrong instead.
    huggingface_hub.utils.logging.set_verbosity_error()
    endpoint = huggingface_hub.constants.ENDPOINT
    offline = huggingface_hub.constants.HF_HUB_OFFLINE or \
        getattr(datasets.config, "HF_HUB_OFFLINE", False)  # HF_DATASETS_OFFLINE sets it too
    if distributed.is_main():
        print(f"{cfg.data!r} is not a file or folder here{near}: looking it up on the Hugging "
              f"Face hub ({'its local cache only: HF_HUB_OFFLINE' if offline else endpoint})",
              file=sys.stderr, flush=True)
    why = None if offline else _hub_unreachable(endpoint)
    if why is not None:
        raise UserError(f"cannot load {cfg.data!r}: it is not a file or folder here{near}, and "
                        f"the hub ({endpoint}) could not be reached in {HUB_CONNECT_SECONDS:g} s "
                        f"({why}); check the path, or the network")
    try:
        loaded = datasets.load_dataset(cfg.data, cfg.data_config, revision=cfg.revision)
    except (ConnectionError, OSError) as err:
        raise UserError(f"cannot load {cfg.data!r}: it is not a file or folder here{near}, and "
                        f"the hub dataset could not be reached ({type(err).__name__}); check "
                        "the path, or the network (HF_HUB_OFFLINE=1 forbids it)") from None
    except datasets.exceptions.DatasetNotFoundError:
        raise UserError(f"{cfg.data!r} is neither a file or folder here{near} nor a hub "
                        "dataset") from None
    except RuntimeError as err:
        # datasets >= 4: "Dataset scripts are no longer supported, but found NAME.py"
        if "script" in str(err).lower():
            script = str(err).rsplit(" ", 1)[-1] if "found" in str(err) else "a .py file"
            raise _script_error(cfg.data, script) from None
        raise
    except ValueError as err:
        raise UserError(f"cannot load {cfg.data!r}: {str(err).splitlines()[0]}") from None
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    return loaded


def _load_glob(pattern: str) -> datasets.DatasetDict:
    """The Parquet files a glob matches, else its image files (one split, 'train')."""
    files = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))  # >= 1: checked
    parquet = [f for f in files if f.endswith(".parquet")]
    images = [f for f in files if Path(f).suffix.lower() in IMAGE_SUFFIXES]
    if not parquet and not images:
        raise UserError(f"{pattern!r} matches no Parquet or image files ({files[0]}, ...)")
    kind, chosen = ("parquet", parquet) if parquet else ("imagefolder", images)
    return _read_files(pattern, datasets.load_dataset, kind, data_files={"train": chosen})


def open_source(cfg: DataConfig) -> datasets.DatasetDict:
    """All splits of the source named by ``cfg.data``."""
    if cfg.data == "digits":
        return digits_dataset()
    check_data_name(cfg.data)  # a mistyped path or an empty glob: refused, the hub never asked
    if any(ch in cfg.data for ch in "*?["):
        return _load_glob(cfg.data)
    path = Path(os.path.expanduser(cfg.data))
    if path.exists():
        return _load_local(path)
    return _load_hub(cfg, near_names(cfg.data))


def _checked_override(features: datasets.Features, name: str, role: str, fits: bool,
                      requirement: str) -> str:
    """``name`` when the user-named column exists and ``fits``; else a one-line error."""
    if name not in features:
        raise UserError(f"{role} column {name!r} not found; columns: {list(features)}")
    if not fits:
        raise UserError(f"{role} column {name!r} has type {features[name]}: it {requirement}")
    return name


def find_image_column(features: datasets.Features, override: str | None) -> str:
    if override is not None:
        feature = features.get(override)
        # An Image feature, or file paths / encoded bytes that cast to one.
        fits = isinstance(feature, datasets.Image) or (
            isinstance(feature, datasets.Value)
            and feature.dtype in ("string", "binary", "large_string"))
        return _checked_override(features, override, "image", fits,
                                 "must hold images (an Image feature, file paths or encoded bytes)")
    for name, feature in features.items():
        if isinstance(feature, datasets.Image):
            return name
    raise UserError(f"no image column found (no feature of type Image) among {list(features)}; "
                    "name one with --image-column")


def find_label_column(features: datasets.Features, override: str | None) -> str | None:
    if override is not None:
        feature = features.get(override)
        fits = isinstance(feature, datasets.ClassLabel) or (
            isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint")))
        return _checked_override(features, override, "label", fits,
                                 "must be a ClassLabel or an integer column")
    for name, feature in features.items():
        if isinstance(feature, datasets.ClassLabel):
            return name
    return None


def label_values(ds: datasets.Dataset, column: str) -> np.ndarray:
    """``ds``'s integer ``column`` as ``(len(ds),)`` int64 in row order, a missing label (None)
    as -1: read as one Arrow column, then put in the order of ``ds``'s rows (a split carved
    or selected from a larger one is a list of rows of it). ``ds[column]`` would build a
    Python object per row (bench/RESULTS.md)."""
    column_values = ds.data.column(column).cast(pa.int64())  # unsigned ones have no -1
    values = pc.fill_null(column_values, -1).to_numpy()
    rows = getattr(ds, "_indices", None)  # the rows of ``ds.data`` that ``ds`` holds, if not all
    if rows is not None:
        values = values[rows.column(0).to_numpy()]
    return values


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
    label = _files_name(cfg, list(dd)) if name_files and cfg.train_split is None else None
    return _make_split(dd[name], cfg, label or name)


def _files_name(cfg: DataConfig, splits: list[str]) -> str | None:
    """What to call the one split the loader made of image files, or None when the name is
    the data's own (a Parquet or saved split, a folder named 'train')."""
    if splits != ["train"] or cfg.data == "digits":
        return None
    pattern = any(ch in cfg.data for ch in "*?[")
    path = Path(os.path.expanduser(cfg.data))
    if pattern or (path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES):
        return cfg.data
    if not path.is_dir() or (path / "dataset_dict.json").is_file() or \
            (path / "state.json").is_file() or any(path.rglob("*.parquet")):
        return None
    if any(p.is_dir() and p.name.lower().startswith("train") for p in path.iterdir()):
        return None  # a split folder of its own
    return cfg.data.rstrip("/" + os.sep) + "/"


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
