"""The dataset a run recorded, which a command uses when it is given none.

A run records its pretraining data in every checkpoint (``meta["config"]["data"]``) and each
evaluation records the data it used in ``eval.json``. ``simclr evaluate RUN`` and
``simclr train-classifier RUN`` without ``--data`` take the dataset of the run's last evaluation,
else the one it was pretrained on: the labelled set a user evaluated on is the one they mean,
even when pretraining saw unlabeled images.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from simclr_kit import distributed
from simclr_kit.config import DataConfig, layered_data
from simclr_kit.errors import UserError

EVAL_JSON = "eval.json"


def run_directory(checkpoint: str | Path) -> Path | None:
    """The run directory ``checkpoint`` belongs to: the run itself, one of its checkpoint
    directories or a file in one; None for weights outside a run."""
    path = Path(checkpoint).expanduser()
    if path.is_file():
        path = path.parent
    if path.is_dir() and (path / "checkpoints").is_dir():
        return path
    if path.is_dir() and path.parent.name == "checkpoints":
        return path.parent.parent
    return None


def read_evaluation(folder: Path | None) -> dict[str, Any] | None:
    """``folder/eval.json`` (what ``evaluate`` returned), or None when there is no readable one."""
    if folder is None or not (folder / EVAL_JSON).is_file():
        return None
    try:
        result = json.loads((folder / EVAL_JSON).read_text())
    except (OSError, ValueError):
        return None
    return result if isinstance(result, dict) else None


def evaluated_data(folder: Path | None) -> dict[str, Any] | None:
    """The data config of the evaluation whose results are in ``folder/eval.json``, if any
    (a file from before it recorded one: the source of its splits)."""
    result = read_evaluation(folder)
    if result is None:
        return None
    if isinstance(result.get("data"), dict):
        return result["data"]
    source = (result.get("train") or {}).get("source")
    return {"data": source} if isinstance(source, str) else None


def pretraining_data(meta: dict[str, Any]) -> dict[str, Any] | None:
    """The data config a checkpoint was trained on, from its metadata: a classifier's
    ``data``, a pretraining checkpoint's ``config.data`` (an exported backbone keeps only the
    provenance: its source)."""
    recorded = meta.get("data") or (meta.get("config") or {}).get("data")
    if isinstance(recorded, dict):
        return recorded
    source = (meta.get("dataset") or {}).get("source")
    return {"data": source} if isinstance(source, str) else None


def data_for(command: str, meta: dict[str, Any], given: DataConfig | str | dict[str, Any] | None,
             evaluation_dir: Path | None) -> DataConfig:
    """The dataset ``command`` works on: ``given`` when it names one, else the dataset of the
    evaluation in ``evaluation_dir``, else the pretraining data in ``meta``; other given
    fields (``label_column``, ...) go on top. Says which one it took when none was named."""
    if isinstance(given, DataConfig):
        return given
    named = isinstance(given, str) or (isinstance(given, dict) and "data" in given)
    recorded, origin = evaluated_data(evaluation_dir), "the one its last evaluation used"
    if recorded is None:
        recorded = pretraining_data(meta)
        origin = "the one it was trained on" if "data" in meta else "the one it was pretrained on"
    data = layered_data(recorded, given)
    if data is None:
        raise UserError(f"{command} needs --data: the checkpoint records no dataset")
    if not named and distributed.is_main():
        tqdm.write(f"{command}: no --data given, so on the run's own dataset {data.data!r} "
                   f"({origin}); --data chooses another")
    return data


def _same_source(a: str, b: str) -> bool:
    if a == b:
        return True
    pa, pb = Path(os.path.expanduser(a)), Path(os.path.expanduser(b))
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def check_not_replacing(out_dir: Path, data: DataConfig) -> None:
    """Refuse to overwrite ``out_dir/eval.json`` when it holds an evaluation on another dataset:
    an evaluation of a different dataset never silently replaces an earlier one."""
    earlier = evaluated_data(out_dir)
    if earlier is None or not isinstance(earlier.get("data"), str):
        return
    if _same_source(earlier["data"], data.data) and \
            earlier.get("data_config") == data.data_config:
        return
    raise UserError(f"{out_dir / EVAL_JSON} holds an evaluation on {earlier['data']!r}; this one "
                    f"is on {data.data!r} and would replace it: give --out DIR to keep both, or "
                    f"move {out_dir / EVAL_JSON} away first")
