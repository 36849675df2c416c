"""Checkpoints: safetensors weights with JSON metadata, training state, atomic writes, loading.

A checkpoint is a directory ``RUN/checkpoints/epoch-NNNN[-step-MMMMMM]/`` holding
``model.safetensors`` (weights; the metadata also sits in its header, so one file is
self-describing), ``model.json`` (the same metadata, for people) and ``state.pt`` (optimizer,
schedule position and RNG states as tensors: it loads with ``torch.load(weights_only=True)``).
It is written under a temporary name and renamed into place, then ``RUN/checkpoints/latest`` is
replaced atomically, so a kill at any moment leaves the last complete checkpoint loadable.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from simclr_kit.errors import UserError

META_KEY = "simclr_kit"
FORMAT = "simclr-kit/1"


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file, fsync and rename."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {path}: {err.strerror or err}") from None
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_weights(path: Path, state_dict: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """safetensors file with ``meta`` in its header and a JSON sidecar (size and hash added)."""
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    meta = dict(meta, format=FORMAT)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(meta)})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {path}: {err.strerror or err}") from None
    sidecar = dict(meta, file=path.name, bytes=path.stat().st_size, sha256=_sha256(path))
    atomic_write_text(path.with_suffix(".json"), json.dumps(sidecar, indent=2) + "\n")


def read_metadata(path: Path) -> dict[str, Any]:
    """The metadata in a safetensors header ({} for a file that has none)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"{path} is not a readable safetensors file (truncated or corrupt?): "
                        f"{err}") from None
    return json.loads(raw) if raw else {}


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"{path} is not a readable safetensors file (truncated or corrupt?): "
                        f"{err}") from None


def torch_load_safe(path: Path) -> Any:
    """``torch.load(weights_only=True)``: tensors and plain containers only, never code."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UserError(
            f"{path} holds pickled Python objects (a whole model?), which are never unpickled: "
            "from trusted code, re-save it with torch.save(model.state_dict(), 'weights.pt') "
            f"({str(err).splitlines()[0][:120]})") from None
    except (RuntimeError, EOFError, OSError) as err:
        raise UserError(f"cannot read {path}: {str(err).splitlines()[0]}") from None


def save_checkpoint(run_dir: Path, name: str, model: nn.Module, meta: dict[str, Any],
                    train_state: dict[str, Any] | None, keep: bool) -> Path:
    """Write ``RUN/checkpoints/NAME/`` atomically and point ``latest`` at it.

    The previous checkpoint directory is removed afterwards unless it was marked to keep.
    """
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / name
    tmp = root / f".{name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_weights(tmp / "model.safetensors", model.state_dict(), meta)
        if train_state is not None:
            buf = tmp / "state.pt"
            torch.save(train_state, str(buf))
            with open(buf, "rb") as f:
                os.fsync(f.fileno())
        if keep:
            (tmp / "KEEP").touch()
        previous = latest_checkpoint(run_dir, required=False)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
        atomic_write_text(root / "latest", name + "\n")
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"cannot save checkpoint in {root}: {err.strerror or err}; the previous "
                        "checkpoint is intact") from None
    except UserError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if previous is not None and previous != final and not (previous / "KEEP").exists():
        shutil.rmtree(previous, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path, required: bool = True) -> Path | None:
    """The checkpoint directory ``RUN/checkpoints/latest`` points at."""
    pointer = run_dir / "checkpoints" / "latest"
    if pointer.is_file():
        ckpt = run_dir / "checkpoints" / pointer.read_text().strip()
        if (ckpt / "model.safetensors").is_file():
            return ckpt
    if required:
        raise UserError(f"{run_dir} holds no complete checkpoint (checkpoints/latest missing)")
    return None


def load_train_state(ckpt_dir: Path) -> dict[str, Any]:
    path = ckpt_dir / "state.pt"
    if not path.is_file():
        raise UserError(f"{ckpt_dir} has no training state (state.pt): it cannot be resumed")
    return torch_load_safe(path)
