"""``simclr predict --onnx classifier.onnx``: the CSV of ``predict``, the network run by ONNX Runtime.

The images are decoded by the same code as ``predict`` (:func:`simclr_kit.classifier.
decode_for_predict`: the same skipped-images line, the same resize and centre crop) from the
metadata the graph carries, so the ``.onnx`` file is all it needs; the CSV is written by the same
code too. Only the forward pass differs: ONNX Runtime's CPU provider instead of torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from simclr_kit.classifier import decode_for_predict, write_predictions
from simclr_kit.config import DataConfig
from simclr_kit.deploy.onnx_runtime import cpu_session, graph_metadata, run_batches
from simclr_kit.errors import UserError


def predict_onnx(graph: str | Path, data: DataConfig | str | dict[str, Any] | None,
                 out: str | Path, data_config: DataConfig | None = None, batch_size: int = 256,
                 split: str | None = None) -> int:
    """Write ``out`` as :func:`simclr_kit.classifier.predict` does, with the classifier graph
    ``graph`` (written by ``simclr export CLS_DIR classifier.onnx``); returns the rows written."""
    session = cpu_session(graph)
    meta = graph_metadata(session, graph)
    if meta.get("kind") != "classifier":
        raise UserError(f"{graph} is an encoder's graph (features), not a classifier's: export "
                        "one with simclr export CLS_DIR classifier.onnx")
    store = decode_for_predict(meta, data, out, data_config, split)
    logits = run_batches(session, store.images, batch_size)
    return write_predictions(store, logits, meta["class_names"], out)
