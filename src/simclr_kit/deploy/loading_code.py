"""The lines of plain timm or torchvision that load a hub folder, run before a card shows them.

Each snippet runs as written from inside the folder (it names ``model.safetensors`` or
``local-dir:.``) and leaves the backbone in ``model``. :func:`plain_loading_code` builds the
snippet for the folder's backbone, runs it against the folder and compares its features with
simclr-kit's own backbone on a random batch; a snippet that does not reproduce them is not shown.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from simclr_kit.models.backbones import build_backbone
from simclr_kit.models.timm_backbones import is_timm_name

WEIGHTS = "model.safetensors"
LOAD_LINE = f'model.load_state_dict(load_file("{WEIGHTS}"), strict=True)'
HUB_HINT = "from the hub: \"hf-hub:OWNER/NAME\""


@dataclass(frozen=True)
class LoadingCode:
    """``code`` (Python) loads the folder with ``library``; ``note`` says when to use it."""

    library: str
    code: str
    note: str = ""


def simclr_kit_code(feature_dim: int) -> LoadingCode:
    """``load_encoder`` on the folder, and features of a photo (``photo.jpg`` beside it)."""
    code = "\n".join([
        "from PIL import Image",
        "from simclr_kit import load_encoder",
        "",
        f'encoder = load_encoder(".")  # this folder; {HUB_HINT}',
        'x = encoder.transform([Image.open("photo.jpg")])  # resize, centre crop, normalise',
        f"features = encoder(x)  # (1, {feature_dim})",
    ])
    return LoadingCode("simclr-kit", code, "any image size and mode; the recorded transform")


def _stem_lines(state: dict[str, torch.Tensor]) -> list[str]:
    """The CIFAR stem (3x3 stride-1 conv1, no max-pool), which no constructor argument makes."""
    channels = int(state["conv1.weight"].shape[0])
    return [f"model.conv1 = torch.nn.Conv2d(3, {channels}, kernel_size=3, stride=1, padding=1, "
            "bias=False)  # CIFAR stem",
            "model.maxpool = torch.nn.Identity()"]


def _classifier_lines(name: str) -> list[str]:
    """What :func:`simclr_kit.models.backbones.build_backbone` removed of torchvision's ``name``, as
    assignments: found by comparing the two models, so it follows whatever is removed."""
    full = torchvision.models.get_model(name, weights=None)
    ours = build_backbone(name, "imagenet")
    lines = []
    for attr in ("fc", "classifier", "head", "heads"):
        mine, theirs = getattr(ours, attr, None), getattr(full, attr, None)
        if not isinstance(mine, nn.Module) or not isinstance(theirs, nn.Module):
            continue
        if isinstance(mine, nn.Identity) and not isinstance(theirs, nn.Identity):
            lines.append(f"model.{attr} = torch.nn.Identity()")
        elif isinstance(mine, nn.Sequential) and isinstance(theirs, nn.Sequential):
            if len(mine) < len(theirs):
                lines.append(f"model.{attr} = model.{attr}[:{len(mine)}]")
            lines += [f"model.{attr}[{i}] = torch.nn.Identity()" for i, (a, b)
                      in enumerate(zip(mine, theirs))
                      if isinstance(a, nn.Identity) and not isinstance(b, nn.Identity)]
    return lines


def _end_lines(feature_dim: int, size: int) -> list[str]:
    return [LOAD_LINE + f'  # from the hub: load_file(hf_hub_download("OWNER/NAME", "{WEIGHTS}"))',
            f"model.eval()  # (N, 3, {size}, {size}), normalised as config.json says -> "
            f"(N, {feature_dim})"]


def _candidates(meta: dict[str, Any], state: dict[str, torch.Tensor]) -> list[LoadingCode]:
    name, size, dim = meta["backbone"], int(meta["image_size"]), int(meta["feature_dim"])
    stem = _stem_lines(state) if meta["stem"] == "cifar" and "conv1.weight" in state else []
    if not is_timm_name(name):
        return [LoadingCode("torchvision", "\n".join(
            ["import torch", "import torchvision", "from safetensors.torch import load_file", "",
             f"model = torchvision.models.{name}()", *_classifier_lines(name), *stem,
             *_end_lines(dim, size)]))]
    local_dir = LoadingCode("timm", "\n".join([
        "import timm", "",
        f'model = timm.create_model("local-dir:.", pretrained=True)  # this folder; {HUB_HINT}',
        f"model.eval()  # (N, 3, {size}, {size}), normalised as config.json says -> (N, {dim})"]))
    kwargs = "".join(f", {k}={v!r}" for k, v in (meta.get("create_model_kwargs") or {}).items())
    plain = LoadingCode("timm", "\n".join(
        ["import timm", "import torch", "from safetensors.torch import load_file", "",
         f'model = timm.create_model("{name[len("timm/"):]}", pretrained=False, num_classes=0'
         f"{kwargs})", *stem, *_end_lines(dim, size)]),
        "timm's local-dir: cannot make the CIFAR stem, so the stem is replaced by hand")
    return [plain] if stem else [local_dir, plain]


def run_in_folder(code: str, folder: Path) -> nn.Module:
    """Run a snippet as if from inside ``folder`` (its relative names made absolute); returns
    the ``model`` it defines."""
    code = code.replace(f'"{WEIGHTS}"', repr(str(folder / WEIGHTS)))
    code = code.replace('"local-dir:."', repr(f"local-dir:{folder}"))
    scope: dict[str, Any] = {}
    exec(compile(code, "<loading code>", "exec"), scope)  # our own generated lines, nothing read
    return scope["model"]


@torch.no_grad()
def plain_loading_code(meta: dict[str, Any], state: dict[str, torch.Tensor], folder: Path,
                       backbone: nn.Module) -> LoadingCode | None:
    """The first snippet of plain timm or torchvision that, run against ``folder``, gives the
    features of ``backbone`` (the same weights, loaded by simclr-kit); None if none does."""
    size = int(meta["image_size"])
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    want = backbone.eval()(x).flatten(1)
    for candidate in _candidates(meta, state):
        try:
            got = run_in_folder(candidate.code, folder).eval()(x).flatten(1)
        except Exception:  # a snippet that fails is not shown; the next one is tried
            continue
        if got.shape == want.shape and torch.allclose(got, want, rtol=1e-4, atol=1e-5):
            return candidate
    return None
