"""The decoded split on disk: one uint8 ``(N, 3, L, L)`` ``.npy`` that every process maps.

Every row is a slot of the same size: an evaluation crop fills it; a training frame (the whole
image, aspect ratio kept, longer side at most L) sits at its top-left with zeros around, and
``sizes.npy`` says which part is image. One row size keeps the file a plain array: a batch is
gathered with one ``index_select``, rows compact in place, and the streaming thread copies
fixed-size rows; the zeros cost disk (a quarter of the slot for a 4:3 photo), not time.

Why ``(N, 3, L, L)`` and not ``(N, L, L, 3)``: a batch gather then copies whole rows (3·L·L
contiguous bytes each) straight into the CHW layout the augmentation and the models read, so no
training step transposes anything; the HWC -> CHW transpose is done once per image by the
decoding worker, where decoding the JPEG costs ~100x more. ``ImageStore.images`` is the map
itself (``torch.from_numpy``, no copy), mapped copy-on-write: pages are shared with the page
cache (``RssFile``, once per machine), and a stray in-place write stays private to its process.

Layout under ``cache_root()/decoded/``::

    KEY/images.npy        (K, 3, L, L) uint8: the images kept, in the split's row order
    KEY/sizes.npy         (K, 2) int32: each image's (height, width) at the top-left of its slot
    KEY/meta.json         rows of the split, shape, files, skipped rows, each chunk's SHA-256
                          (written last)
    .KEY.tmp-HOST-PID-R/  a decode in progress, or killed: images.npy with one slot per row of
                          the split, chunks/START.json per finished chunk, ``lock``, and a
                          ``compacting`` marker during the final pass
    .lock                 held for a moment while a temporary is created, adopted, deleted or
                          published

A decode is published by renaming its finished temporary directory to KEY (atomic), after the
pixels and meta.json are fsynced; a reader also checks meta.json against the file. The decoding
process holds a lock on its temporary from start to end (:mod:`simclr_kit.data.decode_lock`),
so a live decode is never adopted or deleted, whatever its name says: two containers on one
host may both be PID 1 of the same hostname, and the random suffix R keeps their names apart
too. The kernel releases the lock of a process that dies, so a killed decode is adopted by the
next decode of the key on the same host, which decodes only the chunks without a record (a
chunk's pixels are flushed to the disk before its record is written). Temporaries killed while
compacting (a short final pass, only when rows were skipped) are deleted and decoded again.

The images file is allocated in full when the decode starts (``fallocate``): a disk without room
is one error naming the size and the folder, never a SIGBUS when a page of the map is written.

Each chunk's kept rows carry a SHA-256, checked at each opening
(:mod:`simclr_kit.data.chunk_digests`). A file that fails is decoded again.
"""

from __future__ import annotations

import ctypes
import errno
import json
import math
import mmap
import os
import secrets
import shutil
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from simclr_kit.atomic import atomic_write_text, fsync_dir, fsync_file
from simclr_kit.data.chunk_digests import chunks_to_verify, verify
from simclr_kit.data.decode_lock import claim, folder_lock, hold, release
from simclr_kit.errors import UserError

VERSION = 5  # 5: slots with sizes.npy, chunk SHA-256s; the key names the form (frame or crop)
CHUNK_ROWS = 1024  # rows per decoding task: the unit of work, of progress and of resuming
_MOVE_ROWS = 256  # rows moved per copy while compacting: bounds the temporary numpy makes


@dataclass
class Decoded:
    """A decoded split: ``images (K, 3, L, L) uint8`` (a map or an array), the ``rows (K,)``
    of the split they came from, their ``files``, the ``skipped`` ``(row, file, reason)``, the
    images' per-channel histograms ``counts (3, 256)`` and their valid ``(height, width)`` in
    their slots, ``sizes (K, 2) int32``; ``key``: the name of the cache directory it was read
    from (None for a decode held in memory)."""

    images: np.ndarray
    rows: np.ndarray
    files: list[str]
    skipped: list[tuple[int, str, str]]
    counts: np.ndarray
    sizes: np.ndarray
    key: str | None = None


def total_counts(records: list[dict]) -> np.ndarray:
    """The summed ``counts`` (3, 256) of chunk records."""
    return np.sum([np.asarray(r["counts"], np.int64) for r in records], axis=0)


def record_sizes(records: list[dict]) -> np.ndarray:
    """The ``sizes`` of chunk records' kept images, in order: ``(K, 2) int32``."""
    return np.asarray([s for r in records for s in r["sizes"]], np.int32).reshape(-1, 2)


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


def _fallocate(fd: int, length: int) -> None:
    """fallocate(2) itself: posix_fallocate is not used because glibc emulates it, where the
    file system lacks it (NFSv3), by writing to every block of the file."""
    libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
    call = getattr(libc, "fallocate64", None) or getattr(libc, "fallocate", None)
    if call is None:
        raise OSError(errno.EOPNOTSUPP, "fallocate is not available")
    call.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if call(fd, 0, 0, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e7 else f"{n / 1e6:.2f} MB"


def _no_room(path: Path, size: int) -> UserError:
    free = shutil.disk_usage(path.parent).free
    return UserError(f"not enough disk space for the decoded images: {_gb(size)} needed in "
                     f"{path.parent.parent} ({_gb(free)} free); free some space there, or set "
                     "SIMCLR_KIT_CACHE to a folder on a disk with room")


def create_images_file(path: Path, shape: tuple[int, ...]) -> None:
    """A zero-filled uint8 ``.npy`` of ``shape``, its blocks allocated now (where the file
    system allows it; else its free space is checked): no pixel is written yet."""
    with open(path, "wb") as f:
        size = _write_header(f, shape) + math.prod(shape)
        f.truncate(size)
        try:
            _fallocate(f.fileno(), size)
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise _no_room(path, size) from None
            if shutil.disk_usage(path.parent).free < size:  # fallocate unsupported here
                raise _no_room(path, size) from None


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


def _read_meta(final: Path, size: int) -> tuple[dict, tuple[int, ...]]:
    """meta.json of a published decode, checked field by field; ValueError when it is not one
    this version wrote (any JSON may be there: ``[]``, ``null``, ``"rows": 1e12``)."""
    meta = json.loads((final / "meta.json").read_text())
    if not isinstance(meta, dict) or meta.get("version") != VERSION:
        raise ValueError("another version")
    shape = tuple(meta.get("shape") or ())
    rows, skipped, files = meta.get("rows"), meta.get("skipped"), meta.get("files")
    chunks, counts = meta.get("chunks"), np.asarray(meta.get("counts"))
    ok = (len(shape) == 4 and all(type(d) is int for d in shape)
          and shape[1:] == (3, size, size) and isinstance(skipped, list)
          and type(rows) is int and rows == shape[0] + len(skipped)
          and isinstance(files, list) and len(files) in (0, shape[0])
          and counts.shape == (3, 256) and counts.dtype.kind in "iu"
          and isinstance(chunks, list) and all(isinstance(c, list) and len(c) == 2 and
                                               type(c[0]) is int and c[0] >= 0 and
                                               isinstance(c[1], str) for c in chunks)
          and sum(c[0] for c in chunks) == shape[0])
    if not ok or not all(isinstance(s, list) and len(s) == 3 and type(s[0]) is int and
                         0 <= s[0] < rows for s in skipped):
        raise ValueError("damaged")
    return meta, shape


def open_complete(final: Path, size: int) -> Decoded | None:
    """The published decode in ``final``, mapped copy-on-write; None when absent or damaged
    (a meta.json of any other form, a file of another shape, rows that fail their SHA-256)."""
    try:
        meta, shape = _read_meta(final, size)
        images = np.load(final / "images.npy", mmap_mode="c", allow_pickle=False)
        if images.shape != shape or images.dtype != np.uint8:
            return None
        skipped = [(int(r), str(f), str(m)) for r, f, m in meta["skipped"]]
        rows = np.setdiff1d(np.arange(meta["rows"], dtype=np.int64),
                            np.asarray([r for r, _, _ in skipped], dtype=np.int64))
        files = [str(f) for f in meta["files"]] or [""] * len(rows)
        counts = np.asarray(meta["counts"], np.int64)
        sizes = np.load(final / "sizes.npy", allow_pickle=False)
    except (OSError, ValueError, KeyError, TypeError):  # a damaged cache is decoded again
        return None
    if len(rows) != shape[0] or len(files) != shape[0] or sizes.shape != (shape[0], 2):
        return None
    row_bytes = math.prod(shape[1:])
    bad = verify(images, meta["chunks"], chunks_to_verify(meta["chunks"], row_bytes))
    if bad is not None:
        print(f"the decoded cache {final} fails its SHA-256 check (chunk {bad}): it is decoded "
              "again", file=sys.stderr)
        return None
    return Decoded(images, rows, files, skipped, counts, sizes.astype(np.int32),
                   key=final.name)


def _fits(tmp: Path, shape: tuple[int, ...]) -> bool:
    try:
        return (not (tmp / "compacting").exists()) and npy_offset(tmp / "images.npy")[0] == shape
    except (OSError, ValueError):
        return False


def begin(final: Path, n: int, size: int) -> Path:
    """The temporary directory to decode ``final`` in, its lock held by this process until
    :func:`publish`, :func:`discard` or :func:`release`: a killed decode of the same key on this
    host adopted, else a new one (unique name) with an images file allocated in full."""
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    prefix = f".{final.name}.tmp-{socket.gethostname()}-"
    shape = (n, 3, size, size)
    with folder_lock(root):
        adopted = None
        for old in sorted(root.glob(prefix + "*")):
            if not claim(old, prefix):
                continue  # a decode running now: leave it alone
            if adopted is None and _fits(old, shape):
                adopted = old
                continue
            _remove(old)  # killed while compacting, or stale
        if adopted is not None:
            return adopted
        mine = root / f"{prefix}{os.getpid()}-{secrets.token_hex(4)}"
        (mine / "chunks").mkdir(parents=True)
        hold(mine)
        try:
            create_images_file(mine / "images.npy", shape)
        except BaseException:
            _remove(mine)
            raise
    return mine


def _remove(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
    release(tmp)


def discard(tmp: Path) -> None:
    """Delete this process's temporary ``tmp``: a decode whose result is of no use."""
    with folder_lock(tmp.parent):
        _remove(tmp)


def done_chunks(tmp: Path) -> dict[int, dict]:
    """The chunk records of an adopted decode, by first row (unreadable records are redone)."""
    records = {}
    for path in (tmp / "chunks").glob("*.json"):
        try:
            record = json.loads(path.read_text())
            if set(record) >= {"start", "stop", "files", "skipped", "counts", "sizes", "sha256"}:
                records[int(record["start"])] = record
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return records


def record_chunk(tmp: Path, record: dict) -> None:
    """Mark a chunk done: ``{start, stop, files, skipped, counts, sizes, sha256}``, its pixels
    already on the disk."""
    atomic_write_text(tmp / "chunks" / f"{record['start']}.json", json.dumps(record))


def publish(tmp: Path, final: Path, n: int, size: int, records: list[dict]) -> Decoded:
    """Compact the kept rows, write sizes.npy, then meta.json last, and rename ``tmp`` to
    ``final``; the lock on ``tmp`` is released whatever happens."""
    try:
        _finish(tmp, final, n, size, records)
    finally:
        release(tmp)
    fsync_dir(final.parent)
    done = open_complete(final, size)
    if done is None:
        raise RuntimeError(f"the decoded cache {final} could not be read back after writing it")
    return done


def _finish(tmp: Path, final: Path, n: int, size: int, records: list[dict]) -> None:
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
    with open(tmp / "sizes.npy", "wb") as f:  # a file object: np.save adds no suffix
        np.save(f, record_sizes(records))
    fsync_file(tmp / "sizes.npy")
    meta = {"version": VERSION, "rows": n, "shape": [len(keep), 3, size, size],
            "files": files if any(files) else [], "skipped": skipped,
            "counts": total_counts(records).tolist(),
            "chunks": [[rec["stop"] - rec["start"] - len(rec["skipped"]), rec["sha256"]]
                       for rec in records]}
    atomic_write_text(tmp / "meta.json", json.dumps(meta))
    (tmp / "compacting").unlink(missing_ok=True)
    shutil.rmtree(tmp / "chunks", ignore_errors=True)
    with folder_lock(final.parent):
        (tmp / "lock").unlink(missing_ok=True)
        fsync_dir(tmp)
        try:
            os.replace(tmp, final)
        except OSError:  # ``final`` appeared meanwhile: keep a complete one, replace a damaged one
            if open_complete(final, size) is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)
