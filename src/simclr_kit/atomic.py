"""Atomic file writes: a reader finds the old file or the complete new one, never a torn one.

Every file simclr-kit writes goes through :func:`atomic_file`: the content is written under a
temporary name beside the target (``.NAME.tmpPID``), flushed to the disk (fsync), renamed over
the target (atomic on POSIX), and the directory entry is synced too. A kill or a power cut at
any moment leaves either the previous file or the new one; a failed write removes its
temporary. Temporaries left by a killed process match ``.*.tmp*`` and are safe to delete.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from simclr_kit.errors import UserError


def umask_mode() -> int:
    """The mode ``open()`` gives a new file under the process umask (0o644 under umask 022)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (a rename, a new file) to the disk, where the OS allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def temporary_name(path: Path) -> Path:
    """Where :func:`atomic_file` writes ``path`` before renaming it: hidden, per process."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s content to; on a normal exit it is given the
    umask's mode (safetensors writes 0600), fsynced and renamed over ``path``; on an exception
    it is removed and the exception propagates, ``path`` untouched.

    Writers that add a suffix of their own (``np.save``) must write to an open file object.
    """
    path = Path(path)
    tmp = temporary_name(path)
    try:
        yield tmp
        os.chmod(tmp, umask_mode())
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically; a refused write is a :class:`UserError`."""
    try:
        with atomic_file(path) as tmp:
            tmp.write_bytes(data)
    except OSError as err:
        raise UserError(f"cannot write {path}: {err.strerror or err}") from None


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


__all__ = ["atomic_file", "atomic_write_bytes", "atomic_write_text", "fsync_dir", "fsync_file",
           "temporary_name", "umask_mode"]
