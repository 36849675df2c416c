"""Frozen features on disk: embed a split once per (weights, data, image size, split), reuse after.

The frozen protocols (kNN, linear probe, label fractions) all read the same features, and a
second ``simclr evaluate`` of the same checkpoint on the same data reads them from
``DIR/features/`` instead of running the backbone again.

The cache key is a SHA-256 over everything the features depend on:

- every tensor of the encoder's state dict (names, dtypes, shapes and bytes, BatchNorm buffers
  included): another checkpoint, a baseline or a fine-tuned copy never hits;
- the input normalisation (mean, std) and the image size;
- the decoded split: the key of its decoded cache (``ImageStore.key``: the dataset's
  fingerprint, image column, size and cache version) and the rows the images came from, so
  another dataset, split, revision, working size or skipped-image set gives another key without
  a pass over the pixels (which took minutes at ImageNet scale, bench/RESULTS.md); a set held
  in memory has no such key (no fingerprint), and its uint8 pixels are hashed instead;
- the split name and a format version.

A damaged or mismatching file is recomputed, never trusted. Writing is an optimisation: a full
or read-only disk leaves the evaluation running without a cache.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from simclr_kit import distributed
from simclr_kit.atomic import atomic_file
from simclr_kit.data.store import ImageStore
from simclr_kit.evaluation.features import extract_features
from simclr_kit.models.encoder import Encoder

CACHE_FORMAT = "simclr-kit-features/1"
_META_KEY = "simclr_kit_features"


@dataclass(frozen=True)
class CachedFeatures:
    """``features: (N, D) float32`` on the CPU, the file they live in, and whether it was a hit."""

    features: Tensor
    path: Path | None
    hit: bool


def _hash_tensor(h: "hashlib._Hash", name: str, tensor: Tensor) -> None:
    t = tensor.detach().to("cpu").contiguous()
    h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    # A byte view works for every dtype (bf16 has no NumPy type) and 0-dim buffers alike.
    h.update(t.reshape(-1).view(torch.uint8).numpy())


def weights_hash(encoder: Encoder) -> str:
    """SHA-256 of every parameter and buffer of ``encoder`` (sorted by name)."""
    h = hashlib.sha256()
    for name, tensor in sorted(encoder.state_dict().items()):
        _hash_tensor(h, name, tensor)
    return h.hexdigest()


def data_hash(store: ImageStore) -> str:
    """SHA-256 of what identifies a decoded split's pixels, and their row ids: its decoded
    cache's key and the images' shape when it has a key, else its uint8 ``(N, 3, S, S)``
    images themselves."""
    h = hashlib.sha256()
    if store.key is not None:
        h.update(f"decoded|{store.key}|{tuple(store.images.shape)}|".encode())
    else:
        _hash_tensor(h, "images", store.images)
    _hash_tensor(h, "rows", store.row_ids)
    return h.hexdigest()


def cache_key(encoder: Encoder, store: ImageStore, split: str,
              weights: str | None = None) -> str:
    """The hex key of ``encoder``'s features of ``store`` (see the module docstring).

    ``weights``: :func:`weights_hash` of the encoder when already known (it is the slow part for
    a large model and is the same for every split).
    """
    parts = {"format": CACHE_FORMAT, "weights": weights or weights_hash(encoder),
             "mean": list(encoder.mean), "std": list(encoder.std),
             "image_size": store.image_size, "data": data_hash(store), "split": split}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def cache_file(cache_dir: Path, split: str, key: str) -> Path:
    """``cache_dir/SPLIT-KEY.safetensors`` (the split name made file-safe, the key shortened)."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", split).strip("_")[:40] or "split"
    return cache_dir / f"{slug}-{key[:24]}.safetensors"


def _read(path: Path, key: str, rows: int) -> Tensor | None:
    """The cached ``(rows, D)`` features, or None when absent, damaged or for another key."""
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get(_META_KEY, "{}"))
        features = load_file(str(path))["features"]
    except (OSError, SafetensorError, KeyError, ValueError):
        return None
    if meta.get("key") != key or features.ndim != 2 or features.shape[0] != rows:
        return None
    return features.float()


def _write(path: Path, features: Tensor, key: str, split: str) -> bool:
    """Write atomically; False (and nothing left behind) when the disk refuses."""
    meta = {"key": key, "split": split, "format": CACHE_FORMAT, "shape": list(features.shape)}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as tmp:
            save_file({"features": features.contiguous()}, str(tmp),
                      metadata={_META_KEY: json.dumps(meta)})
        return True
    except (OSError, SafetensorError):
        return False


def read_cached_features(encoder: Encoder, store: ImageStore, split: str,
                         cache_dir: Path) -> Tensor | None:
    """The cached features of ``store`` if an earlier evaluation left them, else None.

    Reads only: no collective, so a single process (rank 0 writing a report) may call it.
    """
    key = cache_key(encoder, store, split)
    return _read(cache_file(cache_dir, split, key), key, len(store))


def cached_features(encoder: Encoder, store: ImageStore, split: str, cache_dir: Path | None,
                    device: torch.device, batch_size: int, progress: bool = False,
                    desc: str = "features", weights: str | None = None) -> CachedFeatures:
    """``encoder``'s features of ``store.images`` (eval mode, unaugmented), from the cache if
    there, else computed (sharded over torchrun ranks) and written by rank 0.

    ``cache_dir=None`` computes them without any cache. Every rank takes the same path: if any
    rank misses the file (a node-local disk), all of them compute, since the extraction is
    collective.
    """
    if cache_dir is None:
        return CachedFeatures(extract_features(encoder, store.images, encoder.mean, encoder.std,
                                               device, batch_size, progress, desc), None, False)
    key = cache_key(encoder, store, split, weights)
    path = cache_file(cache_dir, split, key)
    features = _read(path, key, len(store))
    if not distributed.any_rank(features is None):
        assert features is not None
        return CachedFeatures(features, path, True)
    features = extract_features(encoder, store.images, encoder.mean, encoder.std, device,
                                batch_size, progress, desc)
    written = _write(path, features, key, split) if distributed.is_main() else True
    return CachedFeatures(features, path if written else None, False)
