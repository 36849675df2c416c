"""Image folders and loose image files: whether a folder holds images, which of its files are
not images, and what to call the one split the loader makes of such files."""

from __future__ import annotations

import os
from pathlib import Path

from simclr_kit.config import DataConfig
from simclr_kit.data.names import IMAGE_SUFFIXES


def is_image_folder(path: Path) -> bool:
    return any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.rglob("*") if p.is_file())


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


def files_split_name(cfg: DataConfig, splits: list[str]) -> str | None:
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
