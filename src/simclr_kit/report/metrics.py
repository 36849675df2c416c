"""The metrics log: one JSON object per line in ``RUN/metrics.jsonl``, appended (resume-safe).

Epochs count from 1 in every record, as in checkpoint names and the progress bar: a ``train``
record's ``epoch`` is the epoch in progress, a ``knn``, ``done`` or ``budget_stop`` record's the
epoch just ended.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from simclr_kit.report.loggers import MetricSink


class MetricsLog:
    """Append-only JSONL writer; a no-op on ranks other than 0 (``path=None``).

    Every record also goes to the ``sinks`` (TensorBoard, wandb, MLflow: see ``loggers.py``).
    """

    def __init__(self, path: Path | None, sinks: list[MetricSink] | None = None) -> None:
        self.path = path
        self.sinks = list(sinks or [])
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            _end_torn_line(path)

    def write(self, kind: str, **values: Any) -> None:
        if self.path is None:
            return
        record = {"kind": kind, "time": round(time.time(), 3)}
        for key, value in values.items():
            if isinstance(value, float) and not math.isfinite(value):
                value = str(value)
            record[key] = value
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for sink in self.sinks:
            sink.write(kind, record)

    def close(self) -> None:
        """Flush and close the sinks (the JSONL file is closed after every record)."""
        for sink in self.sinks:
            sink.close()
        self.sinks = []


def _end_torn_line(path: Path) -> None:
    """A process killed mid-write leaves a last line without its newline: end it, or the next
    record would be appended to it and be lost with it (:func:`read_metrics` skips the torn one)."""
    try:
        with open(path, "rb+") as f:
            if f.seek(0, os.SEEK_END) == 0:
                return
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
    except FileNotFoundError:
        pass


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Every record of a metrics log; a torn last line (killed mid-write) is ignored."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
