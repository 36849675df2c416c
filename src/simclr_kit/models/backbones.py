"""Backbones: any torchvision classification model with the final layer of its classifier
replaced by ``nn.Identity()`` (:func:`final_layer`: everything before it stays, such as
ConvNeXt's last LayerNorm or MobileNetV3's 1024-wide hidden layer), or a timm model named
``timm/NAME`` (:mod:`simclr_kit.models.timm_backbones`); the feature size is found by a dummy
forward, never read from ``fc.in_features`` (which is gone once ``fc`` is an Identity).
Knows nothing about training or data.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from simclr_kit.errors import UserError
from simclr_kit.models.cifar_stem import CIFAR_STEM_MAX_SIZE, apply_cifar_stem
from simclr_kit.models.timm_backbones import (build_timm_backbone, check_num_features,
                                              check_timm_name, imagenet_weights_file, is_timm_name,
                                              resolve_timm_stem, timm_create_kwargs)


def available_backbones() -> list[str]:
    """Names of the torchvision classification models that can serve as backbones."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def check_backbone_name(name: str) -> None:
    """Raise a one-line UserError when ``name`` is neither a torchvision classification model
    nor ``timm/NAME`` with timm installed and knowing NAME."""
    if is_timm_name(name):
        check_timm_name(name)
        return
    if name not in available_backbones():
        hint = ", ".join(n for n in available_backbones() if n.startswith("resnet"))
        raise UserError(f"unknown backbone {name!r}: use a torchvision classification model "
                        f"name such as {hint}, mobilenet_v3_small, efficientnet_b0, or "
                        "timm/NAME for a timm model")


def resolve_stem(stem: str, image_size: int, backbone: str = "resnet18") -> str:
    """'cifar' for images <= 64 px, 'imagenet' above, unless forced. A timm model without a
    small-image form keeps its own stem ('imagenet') at any size."""
    if is_timm_name(backbone):
        return resolve_timm_stem(backbone, stem, image_size, CIFAR_STEM_MAX_SIZE)
    if stem != "auto":
        return stem
    return "cifar" if image_size <= CIFAR_STEM_MAX_SIZE else "imagenet"


def backbone_kwargs(name: str, stem: str, image_size: int) -> dict[str, Any]:
    """What the backbone is built with beyond its name and stem: timm's ``create_model``
    keyword arguments (a ViT's ``img_size``, ``patch_size``); {} for torchvision models."""
    if not is_timm_name(name):
        return {}
    return timm_create_kwargs(name, stem, image_size)


_CLASSIFIER_ATTRIBUTES = ("fc", "classifier", "head", "heads")


def classifier_attribute(model: nn.Module) -> str:
    """The attribute holding a torchvision model's classifier: ``fc``, ``classifier``,
    ``head`` or ``heads``."""
    for attr in _CLASSIFIER_ATTRIBUTES:
        if isinstance(getattr(model, attr, None), nn.Module):
            return attr
    raise UserError(f"cannot find the classifier of {type(model).__name__} to remove")


def final_layer(model: nn.Module) -> str:
    """The dotted name of a torchvision classification model's final layer, the one that
    makes the class scores: its classifier when that is a single layer (``fc``), else the
    classifier's last Linear (``classifier.3``, ``heads.head``). SqueezeNet's classifier is
    convolutional (dropout, 1x1 conv to the classes, ReLU, global average pool): its final
    layer is that conv, so its features are the global average of the last Fire module's
    ``(N, 512, h, w)`` output."""
    attr = classifier_attribute(model)
    head = getattr(model, attr)
    if not isinstance(head, nn.Sequential):
        return attr
    for name, layer in reversed(list(head.named_children())):
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            return f"{attr}.{name}"
    raise UserError(f"cannot find the final layer of {type(model).__name__}'s {attr}")


def _drop_classifier(model: nn.Module) -> None:
    """Replace the final layer (:func:`final_layer`) of a torchvision model by an Identity,
    in place, so the model returns what that layer took in; dropout before it is kept (the
    identity in eval mode, as in torchvision's own forward). Auxiliary classifiers (GoogLeNet,
    Inception v3) are removed: in train mode they would make the model return a tuple."""
    parent, _, child = final_layer(model).rpartition(".")
    setattr(model.get_submodule(parent), child, nn.Identity())
    if hasattr(model, "aux_logits"):
        model.aux_logits = False
        for aux in ("aux1", "aux2", "AuxLogits"):
            if hasattr(model, aux):
                setattr(model, aux, None)


def removed_layer(backbone: nn.Module) -> str:
    """The dotted name of the Identity that stands in a torchvision ``backbone`` where
    torchvision's model has its final layer (or, in the former form, its whole classifier):
    set that to ``nn.Identity()`` in ``torchvision.models.<name>()`` and the backbone's
    weights load into it strictly."""
    attr = classifier_attribute(backbone)
    head = getattr(backbone, attr)
    if isinstance(head, nn.Sequential):
        for name, layer in reversed(list(head.named_children())):
            if isinstance(layer, nn.Identity):
                return f"{attr}.{name}"
    return attr


def fit_former_classifier(backbone: nn.Module, stored: list[str]) -> None:
    """Give a torchvision ``backbone`` the form of the checkpoints written before only the
    final layer was replaced, in place, when the ``stored`` state dict keys call for it: then
    the whole classifier attribute was an Identity, so a classifier with weights before its
    final layer (ConvNeXt's LayerNorm, MobileNetV3's hidden layer, VGG's) has none stored."""
    attr = classifier_attribute(backbone)
    prefix = attr + "."
    if (any(k.startswith(prefix) for k in backbone.state_dict())
            and not any(k.startswith(prefix) for k in stored)):
        setattr(backbone, attr, nn.Identity())


def build_backbone(name: str = "resnet18", stem: str = "imagenet", weights: str | None = None,
                   kwargs: dict[str, Any] | None = None) -> nn.Module:
    """A torchvision model by name, classifier removed, or ``timm/NAME`` built with ``kwargs``
    (see :func:`backbone_kwargs`); ``stem`` is 'cifar' or 'imagenet'.

    ``weights='imagenet'`` loads torchvision's (or timm's) default ImageNet weights (ImageNet
    stem only). Forward: ``x: (N, 3, S, S)`` -> features ``(N, D)`` (``(N, D, 1, 1)`` for some
    torchvision models: callers flatten).
    """
    if is_timm_name(name):
        return build_timm_backbone(name, stem, kwargs or {}, pretrained=weights == "imagenet")
    check_backbone_name(name)
    if weights == "imagenet":
        if stem == "cifar":
            raise UserError("--init imagenet needs the ImageNet stem: drop --stem cifar")
        model = _load_imagenet_model(name)
    else:
        model = torchvision.models.get_model(name, weights=None)
    _drop_classifier(model)
    if stem == "cifar":
        apply_cifar_stem(model, name)
    return model


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def fetch_imagenet_weights(name: str) -> None:
    """Make sure the ImageNet weights ``--init imagenet`` needs for ``name`` are on this
    machine, before any data is decoded: timm's must be in its local cache; torchvision's are
    downloaded into torch hub's cache now, unless offline (``HF_HUB_OFFLINE=1``), where a
    missing file is an error at once. torchvision's file is also read with
    ``weights_only=True`` here: torchvision's own loader would unpickle it in full."""
    if is_timm_name(name):
        imagenet_weights_file(name)
        return
    check_backbone_name(name)
    weights = torchvision.models.get_model_weights(name).DEFAULT
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    file = weights.url.rsplit("/", 1)[-1]
    hint = f"put {file} from {weights.url} into {cache}"
    if _offline() and not (cache / file).is_file():
        raise UserError(f"ImageNet weights for {name} are not in the local cache and the "
                        f"network is off (HF_HUB_OFFLINE): {hint}")
    try:
        torch.hub.load_state_dict_from_url(weights.url, progress=False, check_hash=True,
                                           weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"{cache / file} holds pickled objects besides tensors: it is not "
                        f"torchvision's file and is not loaded; {hint}") from None
    except Exception as err:  # offline: urllib raises URLError, hub raises RuntimeError
        raise UserError(f"cannot download ImageNet weights for {name} ({type(err).__name__}): "
                        f"{hint}") from None


def _load_imagenet_model(name: str) -> nn.Module:
    fetch_imagenet_weights(name)  # from here on, a checked file in the cache
    return torchvision.models.get_model(name, weights=torchvision.models.get_model_weights(
        name).DEFAULT)


@torch.no_grad()
def feature_dim(backbone: nn.Module, image_size: int = 32) -> int:
    """Output size of ``backbone`` found by a dummy forward of a (2, 3, S, S) batch.

    The module's train/eval mode is restored afterwards; BatchNorm running statistics are not
    touched because the probe runs in eval mode.
    """
    was_training = backbone.training
    backbone.eval()
    try:
        param = next(backbone.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        out = backbone(torch.zeros(2, 3, image_size, image_size, device=device))
    finally:
        backbone.train(was_training)
    return int(out.flatten(1).shape[1])


def backbone_feature_dim(name: str, backbone: nn.Module, image_size: int) -> int:
    """:func:`feature_dim` at the size the backbone will see; for a timm model, also checked
    against its declared ``num_features`` (its ViTs accept only the ``img_size`` they were
    built for, so they are probed at exactly that size)."""
    if not is_timm_name(name):
        return feature_dim(backbone, max(image_size, 32))
    try:
        probed = feature_dim(backbone, image_size)
    except (RuntimeError, AssertionError, ValueError) as err:
        raise UserError(f"{name} does not run on {image_size} px images: "
                        f"{str(err).splitlines()[0][:160]}") from None
    return check_num_features(name, backbone, probed)
