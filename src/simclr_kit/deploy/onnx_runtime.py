"""The optional ONNX packages, and running a graph on uint8 images with ONNX Runtime's CPU provider.

``onnx`` (to write and check graphs) and ``onnxruntime`` (to run them) are the optional extra
``simclr-kit[onnx]``; without them, a command that needs one says how to install it, in one line.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import Tensor

from simclr_kit.checkpoint_files import META_KEY
from simclr_kit.errors import UserError

INSTALL_HINT = "pip install 'simclr-kit[onnx]'"
INPUT_NAME = "pixels"


def import_onnx_package(name: str) -> ModuleType:
    """``onnx`` or ``onnxruntime``, or a one-line UserError saying how to install them."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise UserError(f"ONNX export and predict --onnx need the onnx and onnxruntime packages "
                        f"({name} is missing): {INSTALL_HINT}") from None


def cpu_session(model: bytes | str | Path) -> Any:
    """An ``onnxruntime.InferenceSession`` on the CPU for a serialised graph or an ``.onnx``
    file; an unreadable file is a one-line UserError."""
    ort = import_onnx_package("onnxruntime")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: its warnings are about graph optimisations
    if not isinstance(model, bytes):
        if not Path(model).is_file():
            raise UserError(f"{model} does not exist: give an .onnx file written by simclr export")
        model = str(model)
    try:
        return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own exception types, none exported stably
        raise UserError(f"ONNX Runtime cannot load {model if isinstance(model, str) else 'the graph'}"
                        f": {str(err).splitlines()[0][:200]}") from None


def graph_metadata(session: Any, source: str | Path) -> dict[str, Any]:
    """The simclr-kit metadata a graph written by ``simclr export`` carries (``metadata_props``
    key ``simclr_kit``: the checkpoint's or classifier's metadata as JSON)."""
    props = session.get_modelmeta().custom_metadata_map
    try:
        meta = json.loads(props[META_KEY])
    except (KeyError, ValueError):
        raise UserError(f"{source} carries no simclr-kit metadata: give an .onnx file written by "
                        "simclr export") from None
    return meta if isinstance(meta, dict) else {}


def run_batches(session: Any, images: Tensor, batch_size: int = 256) -> Tensor:
    """The graph's first output over ``images: (N, 3, S, S) uint8`` in batches of
    ``batch_size``: ``(N, K)`` float32 on the CPU (``(0, 0)`` for no images)."""
    out = []
    for start in range(0, images.shape[0], batch_size):
        batch = np.ascontiguousarray(images[start:start + batch_size].numpy())
        out.append(torch.from_numpy(session.run(None, {INPUT_NAME: batch})[0]))
    return torch.cat(out) if out else torch.empty(0, 0)
