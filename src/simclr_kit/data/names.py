"""What ``--data`` names, told from the text and the disk alone: a path, or a hub id.

No ``datasets`` (nor torch) here, so that a mistyped path is refused before any command loads
the heavy libraries: ``simclr pretrain --data data/unlabelled`` answers in a fraction of a
second, as a config error does. :mod:`simclr_kit.data.sources` opens what passes.
"""

from __future__ import annotations

import difflib
import glob
import os
import re
from pathlib import Path

from simclr_kit.errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}

# A hub id: NAME or OWNER/NAME of letters, digits, '-', '_' and '.'.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def missing_path(text: str) -> str | None:
    """Why ``text``, which names nothing on disk, is a mistyped path rather than a hub id, or
    None when it may be a hub id. Answered at once: the hub is never asked about a path."""
    suffix = Path(text).suffix.lower()
    if not _HUB_ID.fullmatch(text) or suffix in IMAGE_SUFFIXES | {".parquet", ".arrow"}:
        return ""  # a path by its form: ./x, /x, ~/x, a/b/c, x/, photo.jpg
    first = text.split("/")[0]
    if "/" in text and Path(first).is_dir():
        return f"; {first}/ is a folder here, so this is a path, not the hub id {text!r}"
    return None


def near_names(text: str) -> str:
    """' (did you mean X?)' for a close name in the folder ``text`` points into, else ''. When
    that folder does not exist either (``data/unlabelled`` without ``data/``), the names of the
    nearest folder that does (here: the current one) are matched against each missing part."""
    given = text.rstrip("/" + os.sep)
    path = Path(os.path.expanduser(given))
    if not path.name:
        return ""
    if path.parent.is_dir():
        names = [p.name for p in path.parent.iterdir() if not p.name.startswith(".")]
        close = difflib.get_close_matches(path.name, names, n=1, cutoff=0.7)
        return f" (did you mean {given[:-len(path.name)]}{close[0]}?)" if close else ""
    folder = next((p for p in path.parents if p.is_dir()), None)
    if folder is None:
        return ""
    names = [p.name for p in folder.iterdir() if not p.name.startswith(".")]
    missing = path.relative_to(folder).parts
    close = list(dict.fromkeys(c for part in (missing[0], missing[-1])
                               for c in difflib.get_close_matches(part, names, n=1, cutoff=0.7)))
    shown = [c if str(folder) == "." else str(folder / c) for c in close]
    return f" (did you mean {' or '.join(shown)}?)" if shown else ""


def check_data_name(text: str | None) -> None:
    """Refuse, in one line, a ``--data`` that names nothing here and cannot be a hub id (with
    the near names), and a glob that matches no file. The embedded ``digits``, an existing
    path and a possible hub id pass."""
    if text is None or text == "digits":
        return
    if any(ch in text for ch in "*?["):
        if not glob.glob(os.path.expanduser(text), recursive=True):
            raise UserError(f"no files match {text!r}")
        return
    if Path(os.path.expanduser(text)).exists():
        return
    why = missing_path(text)
    if why is not None:
        raise UserError(f"no such file or folder: {text}{near_names(text)}{why}")
