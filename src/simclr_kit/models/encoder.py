"""Turn any weights file into a usable encoder: our checkpoints, exports and foreign state dicts.

Accepted: a run directory, a checkpoint directory, a ``.safetensors`` file (ours, or an exported
backbone), a plain PyTorch state dict (``.pt``/``.pth``, read with ``weights_only=True``) in the
seed's layout (``backbone.*`` plus a projection head) or as a bare torchvision (or timm) backbone.
``module.``, ``backbone.`` and ``encoder.`` prefixes are recognised; the stem is inferred from the
shape of ``conv1.weight``; the projection head is never taken for the backbone. A hub folder
(``simclr export --format hub``) is read through its ``model.safetensors``, and
``hf-hub:OWNER/NAME`` names such a folder on the Hugging Face hub.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch import Tensor, nn

from simclr_kit.checkpoint_files import (latest_checkpoint, load_into, load_weights, read_metadata,
                                         save_weights, torch_load_safe)
from simclr_kit.data.pixels import (chosen_crop_fraction, resize_center_crop, resize_side,
                                    to_rgb_array)
from simclr_kit.errors import UserError
from simclr_kit.models.backbones import (build_backbone, feature_dim, fit_former_classifier,
                                         removed_layer)
from simclr_kit.models.timm_backbones import is_timm_name

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_BACKBONE_PREFIXES = ("backbone.", "encoder.", "model.backbone.")
_HEAD_PREFIXES = ("projection_head.", "projector.", "projection.", "head.", "g.")
HUB_PREFIX = "hf-hub:"
# What an export (safetensors, ONNX, hub folder) keeps of a checkpoint's metadata: how to rebuild
# and feed the backbone, and where it came from.
EXPORT_KEYS = ("backbone", "stem", "feature_dim", "image_size", "crop_fraction", "mean", "std",
               "dataset", "package_version", "epoch", "create_model_kwargs")


@dataclass
class Weights:
    """Backbone weights (keys as in the bare torchvision model) and what is known about them."""

    backbone: dict[str, Tensor]
    meta: dict[str, Any]
    path: Path
    full: dict[str, Tensor] | None = None  # the whole SimCLR state dict, when the file holds one


def _count(v: Any) -> bool:
    return type(v) is int and v >= 1


def _three_numbers(v: Any, positive: bool) -> bool:
    return isinstance(v, list) and len(v) == 3 and all(
        type(x) in (int, float) and math.isfinite(x) and (x > 0 or not positive) for x in v)


# The metadata fields simclr-kit reads, each with its test and what it must be.
_META_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "backbone": (lambda v: isinstance(v, str) and bool(v), "a model name"),
    "stem": (lambda v: v in ("cifar", "imagenet"), "'cifar' or 'imagenet'"),
    "image_size": (lambda v: _count(v) and v <= 8192, "a size in pixels"),
    "feature_dim": (_count, "a positive integer"),
    "projection_dim": (_count, "a positive integer"),
    "projection_hidden_dim": (_count, "a positive integer"),
    "hidden_dim": (_count, "a positive integer"),
    "mean": (lambda v: _three_numbers(v, False), "three numbers"),
    "std": (lambda v: _three_numbers(v, True), "three positive numbers"),
    "class_names": (lambda v: isinstance(v, list) and bool(v)
                    and all(isinstance(c, str) for c in v), "a list of class names"),
    "head": (lambda v: v in ("linear", "mlp"), "'linear' or 'mlp'"),
    "dataset": (lambda v: isinstance(v, dict), "a mapping"),
    "config": (lambda v: isinstance(v, dict), "a mapping"),
}


def checked_meta(meta: Any, file: Path, required: Sequence[str] = ()) -> dict[str, Any]:
    """``meta`` (a weights file's metadata) when every field simclr-kit reads from it has the
    type and range simclr-kit writes, and ``required`` are present; else a one-line UserError
    naming ``file`` and the field. ``create_model_kwargs`` may hold only what
    :data:`~simclr_kit.models.timm_backbones.CREATE_KWARGS` allows."""
    if not isinstance(meta, dict):
        raise UserError(f"{file}: its metadata is a {type(meta).__name__}, not a mapping; it was "
                        "not written by simclr-kit as it stands, so it is not loaded")
    missing = [k for k in required if k not in meta]
    if missing:
        raise UserError(f"{file}: its metadata lacks {', '.join(missing)}; it was not written "
                        "by simclr-kit as it stands, so it is not loaded")
    for key, (ok, what) in _META_FIELDS.items():
        if key in meta and not ok(meta[key]):
            raise UserError(f"{file}: its metadata says {key} = {str(meta[key])[:60]!r}, not "
                            f"{what}; it was edited or damaged, so it is not loaded")
    if "create_model_kwargs" in meta:
        from simclr_kit.models.timm_backbones import check_create_kwargs

        check_create_kwargs(meta["create_model_kwargs"], str(file))
    return meta


# What a download fetches of a hub repository: the folder's files, nothing else it may hold.
HUB_FILES = ["model.safetensors", "model.json", "config.json", "README.md"]


def download_hub_folder(name: str) -> Path:
    """``hf-hub:OWNER/NAME[@REVISION]`` -> the local folder ``huggingface_hub.snapshot_download``
    fetched (or found in its cache); a failure is one line."""
    repo, _, revision = name[len(HUB_PREFIX):].partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise UserError(f"{name}: expected hf-hub:OWNER/NAME (optionally @REVISION)")
    import huggingface_hub

    try:
        folder = huggingface_hub.snapshot_download(repo_id=repo, revision=revision or None,
                                                   allow_patterns=HUB_FILES)
    except Exception as err:  # offline, unknown repository, no access: the hub's own wording
        first = (str(err).splitlines() or [type(err).__name__])[0][:200]
        raise UserError(f"cannot fetch {name} from the Hugging Face hub ({type(err).__name__}: "
                        f"{first}); check the name and the network, or `hf auth login` for a "
                        "private repository") from None
    return Path(folder)


def resolve_weights_file(path: str | Path) -> Path:
    if str(path).startswith(HUB_PREFIX):  # hf-hub:OWNER/NAME: a folder of `export --format hub`
        path = download_hub_folder(str(path))
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"checkpoint {p} does not exist")
    if p.is_dir():
        if (p / "model.safetensors").is_file():
            return p / "model.safetensors"
        if (p / "classifier.safetensors").is_file():
            raise UserError(f"{p} is a classifier directory: give the encoder checkpoint "
                            "instead (a classifier exports as OUT.onnx)")
        return latest_checkpoint(p) / "model.safetensors"  # type: ignore[operator]
    return p


def _strip(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def split_state_dict(state: dict[str, Any], bare_is_backbone: bool = False
                     ) -> tuple[dict[str, Tensor], bool]:
    """(backbone keys without prefix, whether a projection head was present and dropped).

    ``bare_is_backbone``: unprefixed keys are all the backbone's (a timm export, whose
    ``head.*`` is part of the model, e.g. ConvNeXt's ``head.norm``), none a classifier's.
    """
    state = {k: v for k, v in state.items() if isinstance(v, Tensor)}
    if state and all(k.startswith("module.") for k in state):
        state = _strip(state, "module.")
    for prefix in _BACKBONE_PREFIXES:
        part = _strip(state, prefix)
        if part:
            has_head = any(k.startswith(_HEAD_PREFIXES) for k in state)
            return part, has_head
    if bare_is_backbone:
        return state, False
    bare = {k: v for k, v in state.items() if not k.startswith(_HEAD_PREFIXES)
            and not k.startswith("fc.")}
    return bare, len(bare) != len(state)


def infer_stem(backbone_state: dict[str, Tensor]) -> str | None:
    """'cifar' for a 3x3 first convolution, 'imagenet' for 7x7 (ResNets); None if unknown."""
    conv1 = backbone_state.get("conv1.weight")
    if conv1 is None or conv1.ndim != 4:
        return None
    return "cifar" if conv1.shape[-1] == 3 else "imagenet"


def read_weights(path: str | Path, backbone: str | None = None) -> Weights:
    """Read any accepted weights file (see module docstring) without building a model."""
    file = resolve_weights_file(path)
    if file.suffix == ".safetensors":
        meta = read_metadata(file)
        sidecar = file.with_suffix(".json")
        if not meta and sidecar.is_file():
            try:
                meta = json.loads(sidecar.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                raise UserError(f"{sidecar} is not readable JSON (truncated or corrupt?)") from None
            meta = checked_meta(meta, sidecar)
        meta = checked_meta(meta, file)
        state = load_weights(file)
    elif file.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        meta = {}
        state = torch_load_safe(file)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise UserError(f"{file} holds a {type(state).__name__}, not a state dict: from "
                            "trusted code, re-save with torch.save(model.state_dict(), path)")
    else:
        raise UserError(f"{file}: unknown weights format (expected .safetensors, .pt or .pth)")
    full = state if any(k.startswith("projection_head.") for k in state) else None
    bb, _ = split_state_dict(state, is_timm_name(str(meta.get("backbone") or backbone)))
    if not bb:
        raise UserError(f"{file} holds no backbone weights (keys: {list(state)[:5]} ...)")
    meta = dict(meta)
    meta.setdefault("stem", infer_stem(bb) or "imagenet")
    recorded = meta.get("backbone")
    if backbone is not None and recorded is not None and recorded != backbone:
        raise UserError(f"{file} holds a {recorded} backbone, not a {backbone}: drop --backbone "
                        f"or pass --backbone {recorded}")
    meta["backbone"] = recorded or backbone or "resnet18"
    return Weights(bb, meta, file, full)


def build_loaded_backbone(weights: Weights) -> nn.Module:
    """The backbone of the recorded architecture (torchvision, or timm with its recorded
    ``create_model_kwargs``) with the weights loaded strictly."""
    model = build_backbone(weights.meta["backbone"], weights.meta["stem"],
                           kwargs=weights.meta.get("create_model_kwargs"))
    if not is_timm_name(weights.meta["backbone"]):
        fit_former_classifier(model, list(weights.backbone))
    missing, unexpected = _key_diff(model.state_dict(), weights.backbone)
    if missing or unexpected:
        raise UserError(
            f"{weights.path} does not match a {weights.meta['backbone']} ({weights.meta['stem']} "
            f"stem): missing keys {missing[:4]}{' ...' if len(missing) > 4 else ''}, unexpected "
            f"keys {unexpected[:4]}{' ...' if len(unexpected) > 4 else ''}; pass the right "
            "--backbone")
    try:
        load_into(model, weights.backbone)
    except RuntimeError as err:
        raise UserError(f"{weights.path} does not fit {weights.meta['backbone']}: "
                        f"{str(err).splitlines()[1].strip() if chr(10) in str(err) else err}") from None
    return model


def _key_diff(expected: dict, got: dict) -> tuple[list[str], list[str]]:
    exp = {k for k in expected if not k.endswith("num_batches_tracked")}
    have = {k for k in got if not k.endswith("num_batches_tracked")}
    return sorted(exp - have), sorted(have - exp)


class Encoder(nn.Module):
    """Eval-mode backbone: normalised ``x: (N, 3, S, S)`` -> features ``(N, feature_dim)``.

    ``encoder.transform(images)`` turns PIL images, a list of them, or uint8 tensors
    ``(3, H, W)``/``(N, 3, H, W)`` into that input: the evaluation crop at the recorded size S
    (above 64 px the shorter side resized to round(S / ``crop_fraction``), the centre S x S
    kept; the fraction is the run's, 0.875 when it recorded none) and the recorded
    normalisation.
    """

    def __init__(self, backbone: nn.Module, image_size: int, mean: Sequence[float],
                 std: Sequence[float], meta: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.image_size = int(image_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.meta = meta or {}
        self.crop_fraction = chosen_crop_fraction(None, self.meta)
        self.feature_dim = feature_dim(backbone, self.image_size)
        self.eval()

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x).flatten(1)

    def to_uint8(self, images: Any) -> Tensor:
        """PIL image(s) or uint8 tensor(s) -> ``(N, 3, S, S) uint8``: the evaluation crop, as
        torchvision's ``Resize(resize_side)`` + ``CenterCrop(S)`` make it."""
        size = self.image_size
        if isinstance(images, Image.Image):
            images = [images]
        if isinstance(images, (list, tuple)) and images and isinstance(images[0], Image.Image):
            arrays = [resize_center_crop(to_rgb_array(im), size, self.crop_fraction)
                      for im in images]
            return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
        x = torch.as_tensor(images)
        if x.ndim == 3:
            x = x.unsqueeze(0)
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3:
            raise UserError("expected PIL images or uint8 tensors of shape (N, 3, H, W)")
        side = resize_side(size, self.crop_fraction)
        if x.shape[-2:] != (size, size) or side != size:
            x = TF.resize(x, side, antialias=True)
            x = TF.center_crop(x, [size, size])
        return x

    def transform(self, images: Any) -> Tensor:
        x = self.to_uint8(images).float().div_(255)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (x - mean) / std


def encoder_from_weights(weights: Weights) -> Encoder:
    meta = weights.meta
    return Encoder(build_loaded_backbone(weights), meta.get("image_size", 224),
                   meta.get("mean", IMAGENET_MEAN), meta.get("std", IMAGENET_STD), meta)


def load_encoder(path: str | Path, device: str | torch.device = "cpu",
                 backbone: str | None = None) -> Encoder:
    """Load an encoder (backbone only, eval mode) from any accepted weights file or run dir, a
    folder written by ``simclr export RUN DIR --format hub``, or ``hf-hub:OWNER/NAME[@REVISION]``
    (such a folder on the Hugging Face hub, fetched with ``huggingface_hub.snapshot_download``)."""
    return encoder_from_weights(read_weights(path, backbone)).to(device).eval()


def export_backbone(path: str | Path, out: str | Path, backbone: str | None = None) -> Path:
    """Write the backbone alone as safetensors (+ JSON sidecar) that loads with ``strict=True``
    into ``torchvision.models.<backbone>()`` after its final layer becomes ``nn.Identity()``
    (the sidecar's ``final_layer`` names it: ``fc`` for a ResNet, ``classifier.3`` for
    MobileNetV3, whose classifier is a Sequential that keeps its other layers; GoogLeNet and
    Inception v3 are built with ``aux_logits=False``), or for ``timm/NAME`` into
    ``timm.create_model(NAME, num_classes=0, **create_model_kwargs)`` (the CIFAR stem of a
    ResNet-like model replaced as the README shows)."""
    weights = read_weights(path, backbone)
    model = build_loaded_backbone(weights)  # proves the keys fit before anything is written
    out = Path(out)
    if out.suffix != ".safetensors":
        raise UserError(f"export target {out} must end in .safetensors")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_weights(out, weights.backbone, export_metadata(weights, model))
    return out


def export_metadata(weights: Weights, backbone: nn.Module) -> dict[str, Any]:
    """The metadata an exported backbone carries (:data:`EXPORT_KEYS`, ``kind: backbone``, and
    for torchvision the ``final_layer`` that ``backbone``, built from ``weights``, replaced)."""
    meta = {k: weights.meta[k] for k in EXPORT_KEYS if k in weights.meta}
    if is_timm_name(meta["backbone"]):
        meta.setdefault("create_model_kwargs", {})
    else:
        meta["final_layer"] = removed_layer(backbone)
    meta["kind"] = "backbone"
    return meta
