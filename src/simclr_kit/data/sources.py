"""Open any image source as Hugging Face ``datasets`` splits (:func:`open_source`); the split
each command reads, with its columns: :mod:`simclr_kit.data.splits`.

Sources: the embedded ``digits`` set, a hub id, a ``save_to_disk`` directory, a directory or glob
of Parquet files, an image folder (sub-folder per class, or flat and unlabeled).
"""

from __future__ import annotations

import glob
import os
import sys
from pathlib import Path

import datasets
import numpy as np

from simclr_kit.config import DataConfig
from simclr_kit.data.image_folders import is_image_folder
from simclr_kit.data.names import IMAGE_SUFFIXES, check_data_name, near_names
from simclr_kit.errors import UserError


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


def _script_error(name: str, script: str) -> UserError:
    """Loading scripts are code from the dataset's author; recent ``datasets`` refuses to run
    them, and so does this package."""
    return UserError(
        f"{name!r} needs a loading script ({script}), and dataset code is never run: convert it "
        "to Parquet once, in a separate environment with datasets<4 and only if you trust its "
        f"author (load_dataset({name!r}, trust_remote_code=True), then ds[split].to_parquet("
        "'DIR/split.parquet') for each split) and pass --data DIR; or try the hub's own Parquet "
        "export with --revision refs/convert/parquet")


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
    if is_image_folder(path):
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
