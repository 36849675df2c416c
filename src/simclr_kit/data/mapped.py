"""The decoded split on disk: one uint8 ``(N, 3, S, S)`` ``.npy`` that every process maps.

Why ``(N, 3, S, S)`` and not ``(N, S, S, 3)``: a batch gather then copies whole rows (3·S·S
contiguous bytes each) straight into the CHW layout the augmentation and the models read, so no
training step transposes anything; the HWC -> CHW transpose is done once per image by the
decoding worker, where decoding the JPEG costs ~100x more. ``ImageStore.images`` is the map
itself (``torch.from_numpy``, no copy), mapped copy-on-write: pages are shared with the page
cache (``RssFile``, once per machine), and a stray in-place write stays private to its process.

Layout under ``cache_root()/decoded/``::

    KEY/images.npy        (K, 3, S, S) uint8: the images kept, in the split's row order
    KEY/meta.json         rows of the split, shape, files, skipped rows (written last)
    .KEY.tmp-HOST-PID/    a decode in progress, or killed: images.npy with one slot per row of
                          the split, chunks/START.json per finished chunk, ``compacting`` marker

A decode is published by renaming its finished temporary directory to KEY (atomic), after the
pixels and meta.json are fsynced; a reader also checks meta.json against the file. A killed
decode leaves only its temporary directory: the next decode of the key on the same host adopts
it once its process is gone and decodes only the chunks without a record (a chunk's pixels are
flushed to the disk before its record is written). Temporaries killed while compacting (a short
final pass, only when rows were skipped) are deleted and decoded again.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from simclr_kit.atomic import atomic_write_text, fsync_dir, fsync_file

VERSION = 4
CHUNK_ROWS = 1024  # rows per decoding task: the unit of work, of progress and of resuming
_MOVE_ROWS = 256  # rows moved per copy while compacting: bounds the temporary numpy makes


@dataclass
class Decoded:
    """A decoded split: ``images (K, 3, S, S) uint8`` (a map or an array), the ``rows (K,)``
    of the split they came from, their ``files``, the ``skipped`` ``(row, file, reason)`` and
    the images' per-channel histograms ``counts (3, 256)`` (None in an older cache); ``key``:
    the name of the cache directory it was read from (None for a decode held in memory)."""

    images: np.ndarray
    rows: np.ndarray
    files: list[str]
    skipped: list[tuple[int, str, str]]
    counts: np.ndarray | None = None
    key: str | None = None


def total_counts(records: list[dict]) -> np.ndarray:
    """The summed ``counts`` (3, 256) of chunk records."""
    return np.sum([np.asarray(r["counts"], np.int64) for r in records], axis=0)


def npy_offset(path: Path) -> tuple[tuple[int, ...], int]:
    """The shape of a uint8 ``.npy`` and the byte offset of its data."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                else np.lib.format.read_array_header_2_0)
        shape, _, _ = read(f)
        return tuple(shape), f.tell()


def _write_header(f, shape: tuple[int, ...]) -> int:
    # numpy pads the header so that the first axis can grow to 21 digits in place: rewriting it
    # for fewer rows keeps the data offset (checked by the caller).
    np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False,
                                             "shape": shape})
    return f.tell()


def create_images_file(path: Path, shape: tuple[int, ...]) -> None:
    """A zero-filled (sparse) uint8 ``.npy`` of ``shape``: no pixel is written yet."""
    with open(path, "wb") as f:
        f.truncate(_write_header(f, shape) + math.prod(shape))


def map_rows(path: Path) -> tuple[mmap.mmap, np.ndarray, int]:
    """A writable shared map of ``path`` (a ``.npy``): the mmap, its array and the data offset."""
    shape, offset = npy_offset(path)
    with open(path, "r+b") as f:
        mm = mmap.mmap(f.fileno(), 0)
    return mm, np.ndarray(shape, np.uint8, buffer=mm, offset=offset), offset


def flush_rows(mm: mmap.mmap, offset: int, row_bytes: int, start: int, stop: int) -> None:
    """Write rows ``[start, stop)`` of a shared map to the disk (msync) before they are recorded."""
    begin = offset + start * row_bytes
    aligned = begin - begin % mmap.ALLOCATIONGRANULARITY
    mm.flush(aligned, offset + stop * row_bytes - aligned)


def compact_rows(images: np.ndarray, keep: np.ndarray) -> None:
    """Move rows ``keep`` (sorted) of ``images (N, ...)`` down to ``0 .. len(keep) - 1``, in place.

    Runs of consecutive kept rows move as blocks; destinations never pass their sources.
    """
    breaks = np.flatnonzero(np.diff(keep) != 1) + 1
    dest = 0
    for run in np.split(keep, breaks):
        if not len(run):
            continue
        src = int(run[0])
        for s in range(src, src + len(run), _MOVE_ROWS):
            e = min(s + _MOVE_ROWS, src + len(run))
            if dest != s:
                images[dest:dest + e - s] = images[s:e]
            dest += e - s


def open_complete(final: Path, size: int) -> Decoded | None:
    """The published decode in ``final``, mapped copy-on-write; None when absent or damaged."""
    try:
        meta = json.loads((final / "meta.json").read_text())
        if meta.get("version") != VERSION:
            return None
        shape = tuple(meta["shape"])
        images = np.load(final / "images.npy", mmap_mode="c", allow_pickle=False)
        if images.shape != shape or images.dtype != np.uint8 or shape[1:] != (3, size, size):
            return None
        skipped = [(int(r), str(f), str(m)) for r, f, m in meta["skipped"]]
        rows = np.setdiff1d(np.arange(int(meta["rows"]), dtype=np.int64),
                            np.asarray([r for r, _, _ in skipped], dtype=np.int64))
        files = [str(f) for f in meta["files"]] or [""] * len(rows)
        counts = np.asarray(meta["counts"], np.int64) if "counts" in meta else None
    except (OSError, ValueError, KeyError, TypeError):  # a damaged cache is decoded again
        return None
    if len(rows) != shape[0] or len(files) != shape[0]:
        return None
    return Decoded(images, rows, files, skipped, counts, key=final.name)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


def _fits(tmp: Path, shape: tuple[int, ...]) -> bool:
    try:
        return (not (tmp / "compacting").exists()) and npy_offset(tmp / "images.npy")[0] == shape
    except (OSError, ValueError):
        return False


def begin(final: Path, n: int, size: int) -> Path:
    """The temporary directory to decode ``final`` in: a killed decode of the same key on this
    host adopted (renamed to this process's name), else a new one with an empty images file."""
    host = socket.gethostname()
    prefix = f".{final.name}.tmp-{host}-"
    mine = final.with_name(f"{prefix}{os.getpid()}")
    final.parent.mkdir(parents=True, exist_ok=True)
    shape = (n, 3, size, size)
    adopted = False
    for old in sorted(final.parent.glob(prefix + "*"), key=lambda p: p != mine):
        pid = old.name[len(prefix):]
        if old != mine and (not pid.isdigit() or _alive(int(pid))):
            continue  # a decode running now (or not ours to judge): leave it alone
        if not adopted and _fits(old, shape):
            try:
                if old != mine:
                    os.replace(old, mine)
                adopted = True
                continue
            except OSError:  # another process adopted it first
                continue
        shutil.rmtree(old, ignore_errors=True)  # killed while compacting, or stale
    if not adopted:
        shutil.rmtree(mine, ignore_errors=True)
        (mine / "chunks").mkdir(parents=True)
        create_images_file(mine / "images.npy", shape)
    return mine


def done_chunks(tmp: Path) -> dict[int, dict]:
    """The chunk records of an adopted decode, by first row (unreadable records are redone)."""
    records = {}
    for path in (tmp / "chunks").glob("*.json"):
        try:
            record = json.loads(path.read_text())
            if set(record) >= {"start", "stop", "files", "skipped", "counts"}:
                records[int(record["start"])] = record
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return records


def record_chunk(tmp: Path, record: dict) -> None:
    """Mark a chunk done: ``{start, stop, files, skipped}``, its pixels already on the disk."""
    atomic_write_text(tmp / "chunks" / f"{record['start']}.json", json.dumps(record))


def publish(tmp: Path, final: Path, n: int, size: int, records: list[dict]) -> Decoded:
    """Compact the kept rows, write meta.json last and rename ``tmp`` to ``final``."""
    skipped = [(int(r), str(f), str(m)) for rec in records for r, f, m in rec["skipped"]]
    files = [str(f) for rec in records for f in rec["files"]]
    path = tmp / "images.npy"
    keep = np.setdiff1d(np.arange(n, dtype=np.int64),
                        np.asarray([r for r, _, _ in skipped], dtype=np.int64))
    if len(keep) < n:
        (tmp / "compacting").touch()  # an interrupted compaction cannot be resumed
        mm, images, offset = map_rows(path)
        compact_rows(images.reshape(n, -1), keep)
        del images
        mm.flush()
        mm.close()
        with open(path, "r+b") as f:
            if _write_header(f, (len(keep), 3, size, size)) != offset:
                raise RuntimeError(f"{path}: the rewritten .npy header moved the data")
            f.truncate(offset + len(keep) * 3 * size * size)
    fsync_file(path)
    meta = {"version": VERSION, "rows": n, "shape": [len(keep), 3, size, size],
            "files": files if any(files) else [], "skipped": skipped,
            "counts": total_counts(records).tolist()}
    atomic_write_text(tmp / "meta.json", json.dumps(meta))
    (tmp / "compacting").unlink(missing_ok=True)
    shutil.rmtree(tmp / "chunks", ignore_errors=True)
    fsync_dir(tmp)
    try:
        os.replace(tmp, final)
    except OSError:  # ``final`` appeared meanwhile: keep a complete one, replace a damaged one
        if open_complete(final, size) is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
    fsync_dir(final.parent)
    done = open_complete(final, size)
    if done is None:
        raise RuntimeError(f"the decoded cache {final} could not be read back after writing it")
    return done
