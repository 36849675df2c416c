"""Run the decoding chunks on several processes and hand back their results in chunk order.

Workers are forked (where the OS has ``fork``): they inherit the opened dataset and the chunk
decoder without pickling either, and each writes its rows straight into the shared map of the
images file, so nothing but a chunk's small record travels back. Results come back in chunk
order, so the caller can record chunks, report progress and stop at the first bad image (under
``--bad-images error``) in the split's row order. A worker that dies (SIGKILL, out of memory)
breaks the pool: that is one clear error, and the finished chunks stay recorded for the next try.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from simclr_kit.errors import UserError

Chunk = tuple[int, int]  # rows [start, stop) of the split
_job: Callable[[int, int], Any] | None = None  # set before the fork: the workers inherit it


def _run(start: int, stop: int) -> Any:
    assert _job is not None
    return _job(start, stop)


def run_in_order(job: Callable[[int, int], Any], chunks: list[Chunk],
                 workers: int) -> Iterator[Any]:
    """``job(start, stop)`` for every chunk, results yielded in the order of ``chunks``.

    ``workers <= 1`` (or a single chunk, or no ``fork``) runs in this process. Closing the
    iterator early cancels the chunks not started and waits for the running ones.
    """
    workers = min(workers, len(chunks))
    if workers <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        for start, stop in chunks:
            yield job(start, stop)
        return
    global _job
    _job = job
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
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
