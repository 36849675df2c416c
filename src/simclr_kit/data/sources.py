"""Open any image source as a Hugging Face ``datasets`` split and find its columns.

Sources: the embedded ``digits`` set, a hub id, a ``save_to_disk`` directory, a directory or glob
of Parquet files, an image folder (sub-folder per class, or flat and unlabeled).
"""

from __future__ import annotations

import dataclasses
import difflib
import glob
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np

from simclr_kit.config import DataConfig
from simclr_kit.data.stratify import stratified_split
from simclr_kit.errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}


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


def _load_hub(cfg: DataConfig) -> datasets.DatasetDict:
    import huggingface_hub

    # The hub client logs every retry; the one line below says what went wrong instead.
    huggingface_hub.utils.logging.set_verbosity_error()
    try:
        loaded = datasets.load_dataset(cfg.data, cfg.data_config, revision=cfg.revision)
    except (ConnectionError, OSError) as err:
        raise UserError(f"cannot load {cfg.data!r}: it is not an existing path, and the hub "
                        f"dataset could not be reached ({type(err).__name__}); check the path, "
                        "or the network (HF_HUB_OFFLINE=1 forbids it)") from None
    except datasets.exceptions.DatasetNotFoundError:
        raise UserError(f"{cfg.data!r} is neither an existing path nor a hub dataset") from None
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
    files = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
    if not files:
        raise UserError(f"no files match {pattern!r}")
    parquet = [f for f in files if f.endswith(".parquet")]
    images = [f for f in files if Path(f).suffix.lower() in IMAGE_SUFFIXES]
    if not parquet and not images:
        raise UserError(f"{pattern!r} matches no Parquet or image files ({files[0]}, ...)")
    kind, chosen = ("parquet", parquet) if parquet else ("imagefolder", images)
    return _read_files(pattern, datasets.load_dataset, kind, data_files={"train": chosen})


# A hub id: NAME or OWNER/NAME of letters, digits, '-', '_' and '.'.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def _missing_path(text: str) -> str | None:
    """Why ``text``, which names nothing on disk, is a mistyped path rather than a hub id, or
    None when it may be a hub id. Answered at once: the hub is never asked about a path."""
    suffix = Path(text).suffix.lower()
    if not _HUB_ID.fullmatch(text) or suffix in IMAGE_SUFFIXES | {".parquet", ".arrow"}:
        return ""  # a path by its form: ./x, /x, ~/x, a/b/c, x/, photo.jpg
    first = text.split("/")[0]
    if "/" in text and Path(first).is_dir():
        return f"; {first}/ is a folder here, so this is a path, not the hub id {text!r}"
    return None


def _near_names(text: str) -> str:
    """' (did you mean X?)' for a close name in the folder ``text`` points into, else ''."""
    given = text.rstrip("/" + os.sep)
    path = Path(os.path.expanduser(given))
    if not path.name or not path.parent.is_dir():
        return ""
    names = [p.name for p in path.parent.iterdir() if not p.name.startswith(".")]
    close = difflib.get_close_matches(path.name, names, n=1, cutoff=0.7)
    return f" (did you mean {given[:-len(path.name)]}{close[0]}?)" if close else ""


def open_source(cfg: DataConfig) -> datasets.DatasetDict:
    """All splits of the source named by ``cfg.data``."""
    if cfg.data == "digits":
        return digits_dataset()
    if any(ch in cfg.data for ch in "*?["):
        return _load_glob(cfg.data)
    path = Path(os.path.expanduser(cfg.data))
    if path.exists():
        return _load_local(path)
    why = _missing_path(cfg.data)
    if why is not None:
        raise UserError(f"no such file or folder: {cfg.data}{_near_names(cfg.data)}{why}")
    return _load_hub(cfg)


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


def _class_names(ds: datasets.Dataset, label_column: str | None) -> list[str] | None:
    if label_column is None:
        return None
    feature = ds.features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    values = [v for v in ds[label_column] if v is not None]
    top = int(max(values)) if values else -1
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


def whole_split(cfg: DataConfig, preferred: Sequence[str]) -> Split:
    """Every row of one split, nothing carved off for validation: the :func:`pick_split` of
    ``cfg.train_split`` (the ``--split`` of embed and predict) and the command's ``preferred``
    (:data:`TRAIN_SPLITS`, :data:`PREDICT_SPLITS`). Labels and class names come with it when
    the split has a label column."""
    dd = open_source(cfg)
    name = pick_split(list(dd), cfg.train_split, preferred, "--split")
    assert name is not None
    return _make_split(dd[name], cfg, name)


def _carve_validation(ds: datasets.Dataset, cfg: DataConfig) -> tuple[datasets.Dataset,
                                                                       datasets.Dataset]:
    """Split a single split into train and a validation part (seed recorded): stratified by
    :func:`~simclr_kit.data.stratify.stratified_split` when the labels are classes, every class
    on both sides; else a seeded random part."""
    label_column = find_label_column(ds.features, cfg.label_column)
    if not (label_column and isinstance(ds.features[label_column], datasets.ClassLabel)):
        try:
            parts = ds.train_test_split(test_size=cfg.val_fraction, seed=cfg.split_seed)
        except ValueError as err:  # too few rows
            raise UserError(f"cannot split off a validation part: {err}") from None
        return parts["train"], parts["test"]
    labels = np.asarray(ds.with_format("numpy")[label_column])
    counts = np.unique(labels, return_counts=True)[1]
    n_val = math.ceil(cfg.val_fraction * len(labels))
    if counts.size and counts.min() < 2:
        raise UserError("cannot split off a validation part: a class has a single image; "
                        "every class needs at least 2")
    if min(n_val, len(labels) - n_val) < counts.size:
        raise UserError(f"cannot split off a validation part: {cfg.val_fraction:g} of "
                        f"{len(labels)} images leaves fewer images than the {counts.size} "
                        "classes on one side; change --val-fraction")
    rest, part = stratified_split(labels, cfg.val_fraction, cfg.split_seed)
    return ds.select(rest), ds.select(part)


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
