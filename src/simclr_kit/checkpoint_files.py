"""Checkpoints: safetensors weights with JSON metadata, training state, atomic writes, loading.

A checkpoint is a directory ``RUN/checkpoints/epoch-NNNN[-step-MMMMMM]/`` holding
``model.safetensors`` (weights; the metadata also sits in its header, so one file is
self-describing), ``model.json`` (the same metadata, for people) and ``state.pt`` (optimizer,
schedule position and RNG states as tensors: it loads with ``torch.load(weights_only=True)``).
It is written under a temporary name and renamed into place, then ``RUN/checkpoints/latest`` is
replaced atomically, so a kill at any moment leaves the last complete checkpoint loadable. Every
file has a JSON sidecar (``model.json``, ``state.json``) recording its size and SHA-256, checked
when it is loaded: a truncated, corrupt or swapped file is a clear error, never a silent load.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from simclr_kit.atomic import atomic_file, atomic_write_text, fsync_dir, fsync_file
from simclr_kit.errors import UserError

META_KEY = "simclr_kit"
FORMAT = "simclr-kit/1"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_error(err: BaseException) -> str:
    """One line for a failed write: ``OSError.strerror`` (ENOSPC: 'No space left on device'), or
    the first line of what torch or safetensors raised (they wrap the OSError)."""
    text = getattr(err, "strerror", None) or str(err) or type(err).__name__
    return text.splitlines()[0][:200]


def _fingerprint(path: Path) -> dict[str, Any]:
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": _sha256(path)}


def save_weights(path: Path, state_dict: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """safetensors file with ``meta`` in its header and a JSON sidecar (size and hash added)."""
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    meta = dict(meta, format=FORMAT)
    try:
        with atomic_file(path) as tmp:
            save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(meta)})
    except (OSError, SafetensorError) as err:
        raise UserError(f"cannot write {path}: {_write_error(err)}") from None
    atomic_write_text(path.with_suffix(".json"),
                      json.dumps(dict(meta, **_fingerprint(path)), indent=2) + "\n")


def verify_file(path: Path, sidecar: Path | None = None, hash_too: bool = True) -> None:
    """Check ``path`` against the size and SHA-256 in its JSON sidecar (``X.json`` for ``X.*``).

    A file without a sidecar (a foreign one), or whose sidecar describes another file name, is
    not checked; one that differs from what its sidecar recorded raises a one-line UserError.
    ``hash_too=False`` checks the size only (cheap: for reading a header).
    """
    sidecar = sidecar or path.with_suffix(".json")
    if not sidecar.is_file() or not path.is_file():
        return
    try:
        record = json.loads(sidecar.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise UserError(f"{sidecar} is not readable JSON (truncated or corrupt?); delete it to "
                        f"load {path.name} unchecked") from None
    if not isinstance(record, dict) or record.get("file") != path.name or "sha256" not in record:
        return
    size = path.stat().st_size
    if size != record.get("bytes"):
        raise UserError(f"{path} is {size} bytes but {sidecar.name} records {record.get('bytes')}:"
                        " the file is truncated or was replaced; it is not loaded")
    if hash_too and _sha256(path) != record["sha256"]:
        raise UserError(f"{path} does not match the SHA-256 recorded in {sidecar.name}: the file "
                        "is corrupt or was replaced; it is not loaded")


def read_metadata(path: Path) -> dict[str, Any]:
    """The metadata in a safetensors header ({} for a file that has none)."""
    verify_file(path, hash_too=False)
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"{path} is not a readable safetensors file (truncated or corrupt?): "
                        f"{err}") from None
    try:
        meta = json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        raise UserError(f"{path}: the metadata in its header is not valid JSON") from None
    return meta if isinstance(meta, dict) else {}


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, after checking it against its sidecar."""
    verify_file(path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"{path} is not a readable safetensors file (truncated or corrupt?): "
                        f"{err}") from None


def load_into(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """``module.load_state_dict(state, strict=True)`` with the module's own version metadata,
    which a safetensors file does not keep and some torchvision modules need (MNASNet refuses
    a state dict without its version)."""
    versioned = OrderedDict(state)
    versioned._metadata = module.state_dict()._metadata  # type: ignore[attr-defined]
    module.load_state_dict(versioned, strict=True)


def torch_load_safe(path: Path) -> Any:
    """``torch.load(weights_only=True)``: tensors and plain containers only, never code."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UserError(
            f"{path} holds pickled Python objects (a whole model?), which are never unpickled: "
            "from trusted code, re-save it with torch.save(model.state_dict(), 'weights.pt') "
            f"({_write_error(err)[:120]})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise UserError(f"cannot read {path} (truncated or corrupt?): {_write_error(err)}") from None


def _write_checkpoint_dir(tmp: Path, model: nn.Module, meta: dict[str, Any],
                          train_state: dict[str, Any] | None, keep: bool) -> None:
    """Fill the temporary directory ``tmp``: weights, training state, sidecars, KEEP marker."""
    save_weights(tmp / "model.safetensors", model.state_dict(), meta)
    if train_state is not None:
        state = tmp / "state.pt"
        torch.save(train_state, str(state))
        fsync_file(state)
        atomic_write_text(tmp / "state.json", json.dumps(_fingerprint(state), indent=2) + "\n")
    if keep:
        (tmp / "KEEP").touch()
    fsync_dir(tmp)  # the files' directory entries reach the disk before the rename publishes them


def _swap_into_place(tmp: Path, final: Path) -> Path | None:
    """Rename ``tmp`` to ``final``; an existing ``final`` (the same position saved again) is first
    renamed aside and returned, so a kill between the two renames leaves it findable."""
    aside = None
    if final.exists():
        aside = final.with_name(f".replaced-{final.name}.tmp{os.getpid()}")
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    return aside


def _put_back(root: Path, name: str) -> None:
    """After a failed save, return a checkpoint renamed aside by :func:`_swap_into_place`."""
    for aside in root.glob(f".replaced-{name}.tmp*"):
        if not (root / name).exists():
            try:
                os.replace(aside, root / name)
            except OSError:
                pass  # still found by latest_checkpoint under its temporary name


def _remove_stale(root: Path) -> None:
    """Temporary files and directories left by killed saves (``latest`` names none of them)."""
    for stale in root.glob(".*.tmp*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def save_checkpoint(run_dir: Path, name: str, model: nn.Module, meta: dict[str, Any],
                    train_state: dict[str, Any] | None, keep: bool) -> Path:
    """Write ``RUN/checkpoints/NAME/`` atomically and point ``latest`` at it.

    The previous checkpoint directory is removed afterwards unless it was marked to keep. On a
    failed write (a full disk) the partial directory is removed and the previous checkpoint, still
    named by ``latest``, is untouched.
    """
    root = run_dir / "checkpoints"
    final = root / name
    tmp = root / f".{name}.tmp{os.getpid()}"
    previous = latest_checkpoint(run_dir, required=False)
    published = False
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        _write_checkpoint_dir(tmp, model, meta, train_state, keep)
        aside = _swap_into_place(tmp, final)
        published = True
        atomic_write_text(root / "latest", name + "\n")
    except (OSError, RuntimeError, SafetensorError, UserError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if published:  # the pointer could not follow: withdraw the new directory too
            shutil.rmtree(final, ignore_errors=True)
        _put_back(root, name)
        kept = f"the previous checkpoint {previous.name} is intact" if previous else \
            "no earlier checkpoint exists"
        detail = str(err) if isinstance(err, UserError) else _write_error(err)
        raise UserError(f"cannot save checkpoint {name} in {root} ({detail}); {kept}: free some "
                        f"space, then resume with: simclr pretrain --resume {run_dir}") from None
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    if previous is not None and previous != final and not (previous / "KEEP").exists():
        shutil.rmtree(previous, ignore_errors=True)
    _remove_stale(root)
    return final


def _is_complete(path: Path) -> bool:
    return path.is_dir() and (path / "model.safetensors").is_file()


def _position(ckpt: Path) -> tuple[int, str]:
    """Sort key of a checkpoint directory: the global step its metadata records, then the name.

    Names do not sort by position: ``epoch-0001-step-000008`` (a step of the first epoch)
    comes after ``epoch-0001`` (the end of it) in text order.
    """
    try:
        step = int(json.loads((ckpt / "model.json").read_text()).get("global_step", -1))
    except (OSError, ValueError, TypeError, AttributeError):
        step = -1
    return step, ckpt.name


def latest_checkpoint(run_dir: Path, required: bool = True) -> Path | None:
    """The checkpoint directory ``RUN/checkpoints/latest`` points at.

    Should a kill have left ``latest`` missing or naming a directory that is not there, the
    newest complete checkpoint (by the step it records) is returned instead.
    """
    root = Path(run_dir) / "checkpoints"
    try:
        name = (root / "latest").read_text().strip()
    except (OSError, UnicodeDecodeError):
        name = ""
    if name and "/" not in name and "\\" not in name:
        for candidate in (root / name, *sorted(root.glob(f".replaced-{name}.tmp*"))):
            if _is_complete(candidate):
                return candidate
    found = sorted((p for p in root.iterdir() if not p.name.startswith(".") and _is_complete(p)),
                   key=_position) if root.is_dir() else []
    if found:
        return found[-1]
    if required:
        raise UserError(f"{run_dir} holds no complete checkpoint (checkpoints/latest missing)")
    return None


# The positions a training state records: counts, read back as they were saved.
_STATE_COUNTS = ("epoch", "step_in_epoch", "global_step", "total_epochs")


def load_train_state(ckpt_dir: Path) -> dict[str, Any]:
    """``state.pt`` of a checkpoint, checked against ``state.json`` and loaded without pickle
    code; a dict whose positions (:data:`_STATE_COUNTS`, where present) are counts, else a
    one-line UserError."""
    path = ckpt_dir / "state.pt"
    if not path.is_file():
        raise UserError(f"{ckpt_dir} has no training state (state.pt): it cannot be resumed")
    verify_file(path)
    state = torch_load_safe(path)
    if not isinstance(state, dict):
        raise UserError(f"{path} holds a {type(state).__name__}, not a simclr-kit training "
                        "state; it cannot be resumed")
    for key in _STATE_COUNTS:
        if key in state and (type(state[key]) is not int or state[key] < 0):
            raise UserError(f"{path}: {key} is {str(state[key])[:40]!r}, not a count; it is not "
                            "a simclr-kit training state as saved, and cannot be resumed")
    return state
