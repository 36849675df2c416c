"""Backbones from timm, named ``timm/NAME``: any model ``timm.create_model`` knows.

timm is an optional extra (``pip install 'simclr-kit[timm]'``), imported only when a ``timm/``
name is used. A backbone is ``timm.create_model(NAME, num_classes=0, **kwargs)``: its forward
gives pooled features ``(N, num_features)``. The keyword arguments are recorded with every
checkpoint and export (``create_model_kwargs``), so the same call rebuilds the architecture.
Only the arguments simclr-kit itself records (:data:`CREATE_KWARGS`) are taken from a file:
others could make timm load files of their own (``checkpoint_path``) or run other code paths.

Small images (the stem rule, ``--stem auto``: the small-image form at <= 64 px):
- ViT-like models (a ``patch_embed`` and an absolute ``pos_embed``) always get ``img_size``;
  the small-image form also shrinks the patches: 4 px at <= 32 px (8x8 tokens on CIFAR, as in
  the SSL literature's CIFAR ViTs), 8 px at 33-64 px (8x8 tokens at 64 px, as for Tiny
  ImageNet). The ImageNet form (and ``--init imagenet``) keeps the model's own patch size.
- ResNet-like models (a single ``conv1`` convolution and a ``maxpool``) get the CIFAR stem of
  the torchvision ResNets: a 3x3 stride-1 ``conv1`` and no max-pool. No timm keyword argument
  expresses that stem, so a loader makes the same two replacements (README, "Backbones from
  timm").
- Any other model (ConvNeXt, EfficientNet, ResNet-D's deep stem ...) keeps its own stem under
  ``--stem auto``; ``--stem cifar`` is refused for it.
"""

from __future__ import annotations

import difflib
import importlib
import os
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from simclr_kit.errors import UserError
from simclr_kit.models.cifar_stem import apply_cifar_stem

TIMM_PREFIX = "timm/"  # --backbone timm/NAME: a timm model


def is_timm_name(name: str) -> bool:
    """Whether ``name`` names a timm model (``timm/NAME``) rather than a torchvision one."""
    return name.startswith(TIMM_PREFIX)


INSTALL_HINT = "pip install 'simclr-kit[timm]'"
# Every keyword argument timm_create_kwargs writes, with its type and range: all a checkpoint's
# ``create_model_kwargs`` may hold.
CREATE_KWARGS = {"img_size": (int, 8, 8192), "patch_size": (int, 1, 1024)}


def timm_model_name(name: str) -> str:
    """``timm/vit_tiny_patch16_224`` -> ``vit_tiny_patch16_224`` (the name timm knows)."""
    return name[len(TIMM_PREFIX):]


def import_timm() -> ModuleType:
    """The timm module, or a one-line UserError saying how to install it."""
    try:
        return importlib.import_module("timm")
    except ImportError:
        raise UserError(f"timm backbones need the timm package: {INSTALL_HINT}") from None


def check_timm_name(name: str) -> None:
    """Raise a one-line UserError when timm is missing or does not know ``timm/NAME``."""
    timm = import_timm()
    model = timm_model_name(name)
    if model and timm.is_model(model):
        return
    near = near_names(model, timm.list_models()) or ["resnet18", "vit_tiny_patch16_224"]
    raise UserError(f"unknown timm model {model!r}: use timm/NAME with a name from "
                    f"timm.list_models(), such as {', '.join('timm/' + n for n in near)}")


def near_names(name: str, names: list[str], count: int = 4) -> list[str]:
    """Up to ``count`` of ``names`` spelled like ``name`` (difflib's ratio >= 0.75), those
    sharing its longest prefix first: ``vit_tiny_patch16_22`` -> ``vit_tiny_patch16_224``."""
    close = difflib.get_close_matches(name, names, n=3 * count, cutoff=0.75)
    shared = {n: len(os.path.commonprefix([name, n])) for n in close}
    return sorted(close, key=lambda n: -shared[n])[:count]  # stable: then by similarity


def check_create_kwargs(kwargs: Any, source: str) -> dict[str, Any]:
    """``kwargs`` when it holds only keys of :data:`CREATE_KWARGS` with values of their type
    and range; else a one-line UserError naming ``source`` (a file, a model name)."""
    if not isinstance(kwargs, dict):
        raise UserError(f"{source}: create_model_kwargs is a {type(kwargs).__name__}, not a "
                        "mapping of timm.create_model arguments; it is not loaded")
    unknown = sorted(set(kwargs) - set(CREATE_KWARGS))
    if unknown:
        raise UserError(f"{source} asks timm.create_model for {', '.join(map(repr, unknown))}: "
                        f"only {', '.join(CREATE_KWARGS)} are taken from a file's metadata (all "
                        "that simclr-kit records); it is not loaded")
    for key, value in kwargs.items():
        kind, low, high = CREATE_KWARGS[key]
        if type(value) is not kind or not low <= value <= high:
            raise UserError(f"{source}: create_model_kwargs {key} = {value!r} is not an integer "
                            f"from {low} to {high}; it is not loaded")
    return kwargs


def _architecture(name: str) -> nn.Module:
    """The model without weights, on the meta device: its structure costs no memory or init time."""
    timm = import_timm()
    with torch.device("meta"):
        return timm.create_model(timm_model_name(name), pretrained=False, num_classes=0)


def small_image_form(model: nn.Module) -> str | None:
    """'vit' (patch size and image size are arguments), 'resnet' (a conv1 + maxpool stem whose
    CIFAR form is defined) or None (the model keeps its own stem)."""
    if isinstance(getattr(model, "patch_embed", None), nn.Module) and \
            isinstance(getattr(model, "pos_embed", None), nn.Parameter):
        return "vit"
    if isinstance(getattr(model, "conv1", None), nn.Conv2d) and \
            isinstance(getattr(model, "maxpool", None), nn.Module):
        return "resnet"
    return None


def vit_patch_size(image_size: int) -> int:
    """Patch size of a ViT's small-image form: 4 px up to 32 px, 8 px up to 64 px."""
    return 4 if image_size <= 32 else 8


def resolve_timm_stem(name: str, stem: str, image_size: int, small_max: int) -> str:
    """``auto``: 'cifar' (the small-image form) at <= ``small_max`` px for a model that has one,
    else 'imagenet' (the model as timm defines it); an explicit stem is kept."""
    if stem != "auto":
        return stem
    if image_size > small_max or small_image_form(_architecture(name)) is None:
        return "imagenet"
    return "cifar"


def timm_create_kwargs(name: str, stem: str, image_size: int) -> dict[str, Any]:
    """Keyword arguments for ``timm.create_model`` beyond ``num_classes=0``: ``img_size`` for a
    ViT, and ``patch_size`` in its small-image form ('cifar' stem); {} for other models."""
    if small_image_form(_architecture(name)) != "vit":
        return {}
    kwargs: dict[str, Any] = {"img_size": image_size}
    if stem == "cifar":
        kwargs["patch_size"] = vit_patch_size(image_size)
    return kwargs


def cached_weights_file(model_name: str) -> str | None:
    """The local file of timm's default pretrained weights for ``model_name`` (Hugging Face
    cache, or torch hub's for weights published by URL), or None: nothing is downloaded, so an
    offline machine fails at once rather than after the hub client's retries."""
    timm = import_timm()
    cfg = timm.models.get_pretrained_cfg(model_name)
    if cfg is None:
        return None
    if cfg.file and Path(cfg.file).is_file():
        return str(cfg.file)
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else []
        for filename in (*names, "model.safetensors", "pytorch_model.bin",
                         "open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
            found = try_to_load_from_cache(cfg.hf_hub_id, filename)
            if isinstance(found, str):
                return found
    if cfg.url:
        file = Path(torch.hub.get_dir()) / "checkpoints" / cfg.url.rsplit("/", 1)[-1]
        if file.is_file():
            return str(file)
    return None


def imagenet_weights_file(name: str) -> str:
    """:func:`cached_weights_file` for ``timm/NAME``, or a one-line UserError saying how to
    fetch it (checked before any data is decoded, and again when the model is built)."""
    check_timm_name(name)
    model_name = timm_model_name(name)
    file = cached_weights_file(model_name)
    if file is None:
        raise UserError(
            f"timm's ImageNet weights for {name} are not in the local cache (simclr never "
            f"downloads them mid-run): where the network is reachable, run once python -c "
            f"\"import timm; timm.create_model('{model_name}', pretrained=True)\"")
    return file


def build_timm_backbone(name: str, stem: str, kwargs: dict[str, Any],
                        pretrained: bool = False) -> nn.Module:
    """``timm.create_model(NAME, num_classes=0, **kwargs)``; the CIFAR stem replaces a ResNet-like
    model's ``conv1`` and ``maxpool`` (``stem='cifar'``). ``pretrained=True`` takes timm's
    default ImageNet weights from the local cache (:func:`cached_weights_file`). ``kwargs``
    outside :data:`CREATE_KWARGS` are refused."""
    check_timm_name(name)
    check_create_kwargs(kwargs, name)
    timm = import_timm()
    model_name = timm_model_name(name)
    if pretrained:
        if stem == "cifar":
            raise UserError("--init imagenet needs the ImageNet stem: drop --stem cifar")
        file = imagenet_weights_file(name)
        return timm.create_model(model_name, pretrained=True, num_classes=0,
                                 pretrained_cfg_overlay={"file": file}, **kwargs)
    try:
        model = timm.create_model(model_name, pretrained=False, num_classes=0, **kwargs)
    except (TypeError, ValueError, AssertionError, RuntimeError) as err:
        raise UserError(f"timm cannot build {name} with {kwargs}: "
                        f"{str(err).splitlines()[0][:160]}") from None
    if stem == "cifar":
        form = small_image_form(model)
        if form == "resnet":
            apply_cifar_stem(model, name)
        elif form != "vit":  # a ViT's small-image form is its patch size, already in kwargs
            raise UserError(f"{name} has no CIFAR stem (no conv1 + maxpool, no patch "
                            "embedding): use --stem imagenet, or auto")
    return model


def check_num_features(name: str, model: nn.Module, probed: int) -> int:
    """``probed`` (the dummy forward's feature size) after checking it against the size timm
    declares: ``num_features``, or ``head_hidden_size`` for models whose pooled output passes a
    head convolution first (MobileNetV3: 576 channels, 1024 pooled features)."""
    declared = {int(v) for v in (getattr(model, "num_features", None),
                                 getattr(model, "head_hidden_size", None)) if v is not None}
    if declared and probed not in declared:
        raise UserError(f"{name} declares {max(declared)} features but its forward gives "
                        f"{probed}: its pooled output is not a feature vector")
    return probed


__all__ = ["CREATE_KWARGS", "INSTALL_HINT", "timm_model_name", "import_timm",
           "check_timm_name", "near_names", "check_create_kwargs", "cached_weights_file",
           "imagenet_weights_file", "resolve_timm_stem", "timm_create_kwargs",
           "build_timm_backbone", "check_num_features", "vit_patch_size", "small_image_form"]
