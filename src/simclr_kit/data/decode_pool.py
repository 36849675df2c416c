"""Run the decoding chunks on several processes and hand back their results in chunk order.

Workers are forked (where the OS has ``fork``): they inherit the opened dataset and the chunk
decoder without pickling either, and each writes its rows straight into the shared map of the
images file, so nothing but a chunk's small record travels back. Results come back in chunk
order, so the caller can record chunks, report progress and stop at the first bad image (under
``--bad-images error``) in the split's row order. A worker that dies (SIGKILL, out of memory)
breaks the pool: that is one clear error, and the finished chunks stay recorded for the next try.

Workers never outlive the process that started them: on Linux the kernel sends them SIGKILL
when it dies (``PR_SET_PDEATHSIG``), elsewhere a thread of each worker watches its parent's
PID. Ctrl-C (which reaches every process of the terminal's group) is left to the parent, and
SIGTERM during a decode stops it like SIGINT: one line, exit 143, the decoded chunks kept.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from simclr_kit.errors import UserError

Chunk = tuple[int, int]  # rows [start, stop) of the split
_job: Callable[[int, int], Any] | None = None  # set before the fork: the workers inherit it
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


class DecodeStopped(Exception):
    """A decode stopped by SIGTERM; ``exit_code`` is 128 + the signal number. The chunks
    decoded so far are recorded, and the next decode of the split continues from them."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by signal {signal.Signals(signum).name} while decoding; the "
                         "decoded chunks are kept: run the same command again to continue")
        self.exit_code = 128 + signum


def _run(start: int, stop: int) -> Any:
    assert _job is not None
    return _job(start, stop)


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _worker_start(parent: int) -> None:
    """In each worker, first: die with the parent, and leave Ctrl-C to it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    else:
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    if os.getppid() != parent:  # the parent died before the request above was made
        os._exit(1)


def _stop(signum: int, _frame: Any) -> None:
    raise DecodeStopped(signum)


def run_in_order(job: Callable[[int, int], Any], chunks: list[Chunk],
                 workers: int) -> Iterator[Any]:
    """``job(start, stop)`` for every chunk, results yielded in the order of ``chunks``.

    ``workers <= 1`` (or a single chunk, or no ``fork``) runs in this process. Closing the
    iterator early cancels the chunks not started and waits for the running ones. Until the
    iterator is closed, SIGTERM raises :class:`DecodeStopped` (in the main thread).
    """
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _stop) if main else None
    try:
        yield from _results(job, chunks, workers)
    finally:
        if main:  # None: a handler set outside Python, which cannot be put back; the default
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _results(job: Callable[[int, int], Any], chunks: list[Chunk],
             workers: int) -> Iterator[Any]:
    workers = min(workers, len(chunks))
    if workers <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        for start, stop in chunks:
            yield job(start, stop)
        return
    global _job
    _job = job
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                               initializer=_worker_start, initargs=(os.getpid(),))
    futures = [pool.submit(_run, start, stop) for start, stop in chunks]
    try:
        for done, future in enumerate(futures):
            try:
                result = future.result()
            except BrokenProcessPool:
                raise UserError(f"a decoding process died (killed, or out of memory) after "
                                f"{done} of {len(chunks)} chunks; the decoded chunks are kept: "
                                "run again to continue, with fewer --decode-workers if memory "
                                "ran out") from None
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        _job = None
