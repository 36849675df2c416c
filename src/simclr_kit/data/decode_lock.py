"""Which process owns a temporary decode directory: an ``flock`` on its ``lock`` file.

The decoding process takes the lock when it creates or adopts a temporary and keeps it until
the decode is published, discarded or stopped; its forked workers share it. The kernel drops
the lock of a process that dies, so "locked" means "a live decode", whatever the directory's
name says (two containers on one host can both be PID 1 of the same hostname). Creating,
adopting, deleting and publishing temporaries happen under :func:`folder_lock` of their folder,
so between two such moments every temporary in sight has its ``lock`` file. Where the file
system or the OS has no locks (Windows, some network file systems), the PID in the name is
the only clue, as before locks were used.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

_held: dict[Path, int] = {}  # temporary directory -> the descriptor of its held lock


@contextmanager
def folder_lock(root: Path) -> Iterator[None]:
    """``root/.lock`` held while temporaries of ``root`` are created, adopted, deleted or
    published (a moment each)."""
    fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError:
                pass  # a file system without locks: the unique names keep decoders apart
        yield
    finally:
        os.close(fd)


def _try_lock(fd: int) -> bool | None:
    """Take the lock of ``fd`` without waiting: True, False when a live process holds it,
    None when this file system (or OS) has no locks."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError:
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


def hold(tmp: Path) -> None:
    """Lock the new temporary ``tmp`` for this process (under :func:`folder_lock`)."""
    fd = os.open(tmp / "lock", os.O_RDWR | os.O_CREAT, 0o666)
    _try_lock(fd)
    _held[tmp] = fd


def claim(tmp: Path, prefix: str) -> bool:
    """Take the lock of ``tmp`` when its decoder is gone (then held, as by :func:`hold`);
    False when a live process holds it. ``prefix``: the name before the PID."""
    try:
        fd = os.open(tmp / "lock", os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:  # removed meanwhile, or not ours to open
        return False
    locked = _try_lock(fd)
    if locked is None:  # no locks here: judge by the PID in the name, as well as it goes
        pid = tmp.name[len(prefix):].split("-")[0]
        locked = pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid))
    if not locked:
        os.close(fd)
        return False
    _held[tmp] = fd
    return True


def release(tmp: Path) -> None:
    """Let go of the lock on ``tmp`` (a decode published, discarded or stopped early: the next
    decode of the key may adopt what is left)."""
    fd = _held.pop(tmp, None)
    if fd is not None:
        os.close(fd)
