"""A folder ready for the Hugging Face hub, and ``hf-hub:OWNER/NAME`` names that load one.

``simclr export RUN DIR --format hub`` writes into the new (or empty) folder ``DIR``:

- ``model.safetensors``: the backbone alone, keys as in the bare torchvision or timm model, the
  export's metadata in its header (``model.json`` beside it records its size and SHA-256, which
  ``load_encoder`` checks);
- ``config.json``: timm's layout, ``architecture`` (timm backbones), ``num_classes: 0``,
  ``num_features``, ``model_args`` (``create_model`` keyword arguments) and ``pretrained_cfg``
  (input size, mean, std, crop), so ``timm.create_model("local-dir:DIR", pretrained=True)`` builds
  a timm backbone and loads it; simclr-kit's metadata and the pretraining config under
  ``simclr_kit``;
- ``README.md``: the model card (:mod:`simclr_kit.deploy.model_card`).

The folder is written under a temporary name beside ``DIR`` and renamed into place, so it is
complete or absent. ``load_encoder(DIR)`` loads it, and once uploaded (``huggingface_hub``'s
``upload_folder``) ``load_encoder("hf-hub:OWNER/NAME")`` fetches it with ``snapshot_download``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from simclr_kit.atomic import atomic_write_text, fsync_dir
from simclr_kit.checkpoint_files import save_weights
from simclr_kit.data.pixels import chosen_crop_fraction, resize_side
from simclr_kit.deploy.loading_code import plain_loading_code, simclr_kit_code
from simclr_kit.deploy.model_card import model_card
from simclr_kit.errors import UserError
from simclr_kit.models.encoder import (HUB_PREFIX, encoder_from_weights, export_metadata,
                                       read_weights)
from simclr_kit.models.timm_backbones import is_timm_name
from simclr_kit.provenance import read_evaluation, run_directory


def crop_fraction(meta: dict[str, Any]) -> float:
    """The evaluation crop as timm's ``crop_pct``: the side kept over the resized shorter side
    (the run's recorded fraction above 64 px, 1.0 at 64 px and below, as ``load_encoder``)."""
    size = int(meta["image_size"])
    return size / resize_side(size, chosen_crop_fraction(None, meta))


def hub_config(meta: dict[str, Any], recipe: dict[str, Any] | None) -> dict[str, Any]:
    """``config.json``: timm's layout for ``local-dir:`` and ``hf-hub:``, plus simclr-kit's."""
    size = int(meta["image_size"])
    config: dict[str, Any] = {}
    if is_timm_name(meta["backbone"]):
        config["architecture"] = meta["backbone"][len("timm/"):]
        config["model_args"] = dict(meta.get("create_model_kwargs") or {})
    else:
        config["torchvision_architecture"] = meta["backbone"]
    config.update({
        "num_classes": 0, "num_features": int(meta["feature_dim"]),
        "pretrained_cfg": {"input_size": [3, size, size], "interpolation": "bilinear",
                           "crop_pct": crop_fraction(meta), "crop_mode": "center",
                           "mean": list(meta["mean"]), "std": list(meta["std"]),
                           "num_classes": 0},
        "simclr_kit": dict(meta, pretraining_config=recipe)})
    return config


def _check_target(folder: Path) -> None:
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise UserError(f"{folder} already exists and is not an empty folder: name a new folder "
                        "(an existing model card, perhaps edited, is never overwritten)")


def export_hub(source: str | Path, folder: str | Path, backbone: str | None = None) -> Path:
    """Write the hub folder ``folder`` (new or empty) for the encoder of ``source`` (a run,
    checkpoint or weights file); see the module docstring. Returns ``folder``."""
    folder = Path(folder)
    _check_target(folder)
    weights = read_weights(source, backbone)
    encoder = encoder_from_weights(weights)  # proves the weights fit, fills in the defaults
    recipe = weights.meta.get("config")
    meta = dict(export_metadata(weights, encoder.backbone), image_size=encoder.image_size, mean=list(encoder.mean),
                std=list(encoder.std), feature_dim=encoder.feature_dim)
    for key in ("global_step", "init_from", "crop_fraction"):
        if key in weights.meta:
            meta[key] = weights.meta[key]
    config = hub_config(meta, recipe)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_weights(tmp / "model.safetensors", weights.backbone, meta)
        atomic_write_text(tmp / "config.json", json.dumps(config, indent=2) + "\n")
        plain = plain_loading_code(meta, weights.backbone, tmp, encoder.backbone)
        snippets = [simclr_kit_code(encoder.feature_dim)] + ([plain] if plain else [])
        evaluation = None if str(source).startswith(HUB_PREFIX) else \
            read_evaluation(run_directory(source))
        card = model_card(meta, config, recipe, evaluation, snippets, plain is None)
        atomic_write_text(tmp / "README.md", card)
        if folder.exists():
            folder.rmdir()  # empty: checked above
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(folder.parent)
    return folder
