"""What a run ran on and what it cost: hardware description and peak memory, for the metrics log."""

from __future__ import annotations

import os
import platform
import sys
from typing import Any

import torch


def _cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware_info(device: torch.device) -> dict[str, Any]:
    """A JSON-safe description of the machine and software a run uses."""
    info: dict[str, Any] = {
        "cpu": _cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(), "python": sys.version.split()[0],
        "torch": torch.__version__,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1),
                    gpu_count=torch.cuda.device_count(), cuda=torch.version.cuda)
    return info


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    """Peak memory so far in MiB: ``gpu`` (tensors allocated by PyTorch on a CUDA device, the
    number that decides whether a batch fits) and ``host`` (the process's peak resident set)."""
    out: dict[str, float] = {}
    if device.type == "cuda":
        out["gpu"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    try:
        import resource

        # ru_maxrss is KiB on Linux, bytes on macOS.
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out["host"] = round(rss / (2**20 if sys.platform == "darwin" else 2**10), 1)
    except (ImportError, OSError):
        pass
    return out
