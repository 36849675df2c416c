"""Crash injection: kill this process with SIGKILL at a named point of training or saving.

The crash tests need a kill at an exact moment (half-way through writing a checkpoint, say), which
an outside ``kill -9`` can only hit by luck. ``SIMCLR_KIT_FAULT=POINT@N`` makes the N-th arrival
(1-based) at ``POINT`` send SIGKILL to the process itself: nothing runs after it, exactly as
after a power cut or the OOM killer. Points:

- ``step``: an optimiser step has finished (mid-epoch, nothing saved for it);
- ``save-weights``: a checkpoint's weights are in its temporary directory, the rest is not;
- ``save-renamed``: the checkpoint directory is in place, ``latest`` still names the old one;
- ``save-latest``: ``latest`` names the new checkpoint, the previous one is not yet removed;
- ``decode-chunk``: a decoding process is half-way through a chunk of rows (data/store.py).

Unset (always, outside tests) a point costs one environment lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "SIMCLR_KIT_FAULT"
_arrivals: dict[str, int] = {}


def point(name: str) -> None:
    """Count an arrival at ``name``; SIGKILL this process if ``SIMCLR_KIT_FAULT`` asks for it."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    target, _, nth = spec.partition("@")
    if target != name:
        return
    _arrivals[name] = _arrivals.get(name, 0) + 1
    if _arrivals[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
