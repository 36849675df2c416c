"""The SHA-256 of each chunk of a decoded file's rows, and which chunks are checked at an opening.

Each chunk's kept rows carry a SHA-256 (computed by the worker that wrote them, from the map;
after compaction they are contiguous rows of the published file). Hashing is not free: SHA-256
runs at 0.5-1.1 GB/s on one core (bench/RESULTS.md), so checking all 252 GB of ImageNet at 256
px would add 4-8 minutes to every start. Opening a published decode checks chunks worth
:data:`VERIFY_BYTES` (a quarter to half a second): all of a file up to that size (CIFAR-10 at
32 px is 153 MB), else a sample of whole chunks that every process of the machine draws alike
on a given day and that changes from day to day, so an edit is found within days of runs.
``SIMCLR_KIT_VERIFY_CACHE=all`` checks every chunk. A file that fails is decoded again.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import random

import numpy as np

VERIFY_BYTES = 256 << 20  # pixel bytes checked against their SHA-256 at each opening
VERIFY_ENV = "SIMCLR_KIT_VERIFY_CACHE"


def rows_digest(images: np.ndarray, rows: list[int] | np.ndarray) -> str:
    """SHA-256 of ``images[rows]`` in order (``rows`` sorted), hashed run by contiguous run."""
    h = hashlib.sha256()
    rows = np.asarray(rows, np.int64)
    for run in np.split(rows, np.flatnonzero(np.diff(rows) != 1) + 1):
        if len(run):
            h.update(images[int(run[0]):int(run[-1]) + 1])
    return h.hexdigest()


def chunks_to_verify(chunks: list[list], row_bytes: int) -> list[int]:
    """Indices of the chunks checked at this opening: every one within :data:`VERIFY_BYTES` (or
    with ``SIMCLR_KIT_VERIFY_CACHE=all``), else a sample drawn from today's date, the same in
    every process of a job (so they agree on the file) and different each day."""
    sizes = [c[0] * row_bytes for c in chunks]
    if os.environ.get(VERIFY_ENV) == "all" or sum(sizes) <= VERIFY_BYTES:
        return list(range(len(chunks)))
    rng = random.Random(f"{datetime.date.today().isoformat()}|{len(chunks)}")
    picked, total = [], 0
    for i in rng.sample(range(len(chunks)), len(chunks)):
        if total + sizes[i] > VERIFY_BYTES and picked:
            break
        picked.append(i)
        total += sizes[i]
    return sorted(picked)


def verify(images: np.ndarray, chunks: list[list], which: list[int]) -> int | None:
    """The first chunk of ``which`` whose rows of ``images`` differ from their SHA-256, or None."""
    starts = np.cumsum([0] + [c[0] for c in chunks])
    for i in which:
        if rows_digest(images, range(starts[i], starts[i + 1])) != chunks[i][1]:
            return i
    return None
