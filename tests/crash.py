"""SIGKILL at an exact point of training, saving or decoding, injected from outside the package.

The crash tests need a kill at an exact moment (half-way through writing a checkpoint, say), which
an outside ``kill -9`` can only hit by luck. :func:`arm` wraps the function at a point's seam so
that the N-th arrival (1-based, counted per process) sends SIGKILL to the process itself: nothing
runs after it, exactly as after a power cut or the OOM killer. Points:

- ``step``: an optimiser step has finished (mid-epoch, nothing saved for it);
- ``save-weights``: a checkpoint's weights are in its temporary directory, the rest is not;
- ``save-renamed``: the checkpoint directory is in place, ``latest`` still names the old one;
- ``save-latest``: ``latest`` names the new checkpoint, the previous one is not yet removed;
- ``decode-chunk``: a decoding process has written the first half of a chunk's rows and has not
  recorded the chunk.

Forked processes (the decoding workers) inherit the armed seams and count their own arrivals.
As a script, ``python tests/crash.py POINT@N ARGS...`` runs ``simclr ARGS...`` with the point
armed (under torchrun too: each rank counts its own).
"""

from __future__ import annotations

import functools
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from simclr_kit import checkpoint_files as checkpoint
from simclr_kit.data import chunk_decoder
from simclr_kit.train import loop as training

Patch = Callable[[Any, str, Any], None]  # setattr, or pytest's monkeypatch.setattr


class _Arrivals:
    """Arrivals at one point in each process (a forked child starts from zero)."""

    def __init__(self, nth: int) -> None:
        self.nth = nth
        self.counts: dict[int, int] = {}

    def fatal(self) -> bool:
        """Count an arrival; whether it is the N-th in this process."""
        pid = os.getpid()
        self.counts[pid] = self.counts.get(pid, 0) + 1
        return self.counts[pid] == self.nth


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _after(owner: Any, name: str, arrivals: _Arrivals, patch: Patch,
           when: Callable[..., bool] = lambda *args, **kwargs: True) -> None:
    """Arrive at the point each time ``owner.name`` returns (from a call that ``when`` accepts)."""
    real = getattr(owner, name)

    @functools.wraps(real)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        out = real(*args, **kwargs)
        if when(*args, **kwargs) and arrivals.fatal():
            _kill()
        return out

    patch(owner, name, wrapped)


def _half_chunk(arrivals: _Arrivals, patch: Patch) -> None:
    """Arrive at the middle row of each chunk: the fatal arrival decodes the first half only."""
    real = chunk_decoder.ChunkDecoder.__call__

    @functools.wraps(real)
    def call(self: chunk_decoder.ChunkDecoder, start: int, stop: int) -> dict:
        if not arrivals.fatal():
            return real(self, start, stop)
        real(self, start, (start + stop) // 2)
        _kill()
        raise AssertionError("unreachable")

    patch(chunk_decoder.ChunkDecoder, "__call__", call)


def _is_latest(path: Path, *args: Any, **kwargs: Any) -> bool:
    return Path(path).name == "latest"


SEAMS: dict[str, Callable[[_Arrivals, Patch], None]] = {
    "step": lambda a, patch: _after(training, "train_step", a, patch),
    "save-weights": lambda a, patch: _after(checkpoint, "save_weights", a, patch),
    "save-renamed": lambda a, patch: _after(checkpoint, "_swap_into_place", a, patch),
    "save-latest": lambda a, patch: _after(checkpoint, "atomic_write_text", a, patch, _is_latest),
    "decode-chunk": _half_chunk,
}


def arm(spec: str, patch: Patch = setattr) -> None:
    """Arm ``POINT@N`` (N defaults to 1) in this process and the processes it forks."""
    point, _, nth = spec.partition("@")
    if point not in SEAMS:
        raise ValueError(f"unknown crash point {point!r}; use one of {', '.join(SEAMS)}")
    SEAMS[point](_Arrivals(int(nth or 1)), patch)


if __name__ == "__main__":
    from simclr_kit.cli import main

    arm(sys.argv[1])
    raise SystemExit(main(sys.argv[2:]))
