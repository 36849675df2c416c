"""What a decode skipped (unreadable rows) and ignored (files that are not images): one line
for the terminal, a tab-separated list for a file."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from tqdm.auto import tqdm

from simclr_kit import distributed
from simclr_kit.atomic import atomic_write_text
from simclr_kit.data.store import ImageStore


def skipped_summary(store: ImageStore) -> str:
    """One line: how many rows were skipped, the commonest reasons, how many files were ignored."""
    bad = [m for r, _, m in store.skipped if r >= 0]
    ignored = len(store.skipped) - len(bad)
    common = ", ".join(f"{k} x{v}" for k, v in Counter(m.split(":")[0] for m in bad).most_common(3))
    parts = [f"skipped {len(bad)} unreadable image(s) in {store.provenance.get('split')!r} "
             f"({common}), kept {len(store)}"] if bad else []
    if ignored:
        parts.append(f"ignored {ignored} file(s) that are not images")
    return "; ".join(parts)


def announce_skipped(store: ImageStore, consequence: str = "") -> None:
    """Print :func:`skipped_summary` when anything was skipped or ignored (the main process
    only); every command that decodes says it the same way, whether the decode came from the
    disk cache or not. ``consequence`` ends the line ("; listed in RUN/skipped.txt")."""
    if store.skipped and distributed.is_main():
        tqdm.write(skipped_summary(store) + consequence)


def skipped_report(store: ImageStore, *more: ImageStore) -> str:
    """Tab-separated lines ``row, file, reason`` of every skipped or ignored item, with a header;
    of several stores (an evaluation's two splits), each line led by its ``split``."""
    def split(s: ImageStore) -> str:
        return f"{s.provenance.get('split')}\t" if more else ""

    lines = [("split\t" if more else "") + "row\tfile\treason"]
    lines += [f"{split(s)}{r}\t{p}\t{m}".replace("\n", " ")
              for s in (store, *more) for r, p, m in s.skipped]
    return "\n".join(lines) + "\n"


def list_skipped(path: Path, *stores: ImageStore) -> str:
    """Write the :func:`skipped_report` of ``stores`` to ``path`` (rank 0) when they skipped
    anything, else remove a list an earlier run left there; returns the end of
    :func:`announce_skipped`'s line: "; listed in PATH", or ""."""
    if not any(s.skipped for s in stores):
        if distributed.is_main():
            path.unlink(missing_ok=True)
        return ""
    if distributed.is_main():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, skipped_report(*stores))
    return f"; listed in {path}"
