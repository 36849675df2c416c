"""ONNX export: an encoder (features) or a classifier (logits) as one graph that takes pixels.

The graph: input ``pixels: (N, 3, S, S) uint8``, RGB, N free, S the recorded image size -> float32
``(pixels / 255 - mean) / std`` with the recorded per-channel mean and std (the arithmetic of
:func:`simclr_kit.augment.normalize`) -> the network in eval mode -> ``features: (N, D)`` float32
for an encoder, ``logits: (N, C)`` float32 for a classifier (their softmax is the probability
``predict`` writes). The caller gives S x S pixels: resizing and cropping stay outside the graph
and are done as ``Encoder.to_uint8`` and ``predict`` do them, so the evaluation transform has one
implementation.

``metadata_props`` say what a deployer and ``predict --onnx`` need: ``simclr_kit`` (the
checkpoint's or classifier's metadata as JSON: image size, class names, backbone, provenance),
``input``, ``output``, ``image_size``, ``mean``, ``std``, ``backbone`` and, for a classifier,
``class_names`` (a JSON list); the graph's ``doc_string`` repeats the input and output.

Exporter: ``torch.onnx.export(..., dynamo=False)``, the TorchScript-based one: it needs nothing
beyond torch and exports every backbone the tests cover (torchvision ResNets with either stem,
timm ResNets and ViTs); the torch.export-based exporter would add the onnxscript package. Opset 17
(ONNX 1.12): LayerNormalization is one operator, so a ViT's norms stay fused. Every export is run
once by ONNX Runtime on random pixels and compared with torch before it is written.
"""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from simclr_kit.atomic import atomic_write_bytes
from simclr_kit.checkpoint_files import META_KEY, read_metadata
from simclr_kit.data.pixels import chosen_crop_fraction, resize_side
from simclr_kit.deploy.onnx_runtime import INPUT_NAME, cpu_session, import_onnx_package
from simclr_kit.errors import UserError
from simclr_kit.models.encoder import encoder_from_weights, export_metadata, read_weights

OPSET = 17
# Largest ONNX Runtime - torch difference accepted, relative to the output's largest magnitude
# (at least 1): float32 reordering stays near 1e-6 of it.
TOLERANCE = 1e-4


class PixelModel(nn.Module):
    """``pixels: (N, 3, S, S) uint8`` -> ``net((pixels / 255 - mean) / std).flatten(1)``."""

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.net = net.eval()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, pixels: Tensor) -> Tensor:
        x = (pixels.to(torch.float32) / 255.0 - self.mean) / self.std
        return self.net(x).flatten(1)


@dataclass
class OnnxExport:
    """What :func:`export_onnx` wrote: the file, ``kind`` ('backbone' or 'classifier'), the
    output's name and width, and ONNX Runtime's largest difference from torch."""

    path: Path
    kind: str
    output: str
    width: int
    max_difference: float


def is_classifier(source: str | Path) -> bool:
    """Whether ``source`` is a classifier saved by ``train-classifier`` (its folder or file)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return (path / "classifier.safetensors").is_file()
    return path.suffix == ".safetensors" and path.is_file() and \
        read_metadata(path).get("kind") == "classifier"


def _network(source: str | Path, backbone: str | None) -> tuple[nn.Module, dict[str, Any]]:
    """The network to export (eval mode, CPU) and the metadata the graph will carry."""
    if is_classifier(source):
        from simclr_kit.classifier import load_classifier

        if backbone is not None:
            raise UserError("--backbone is for a foreign weights file; a classifier records its own")
        model, meta = load_classifier(source, torch.device("cpu"))
        return model, meta
    weights = read_weights(source, backbone)
    encoder = encoder_from_weights(weights)  # the image size and statistics, defaults filled in
    meta = dict(export_metadata(weights, encoder.backbone), image_size=encoder.image_size, mean=list(encoder.mean),
                std=list(encoder.std), feature_dim=encoder.feature_dim)
    return encoder.backbone, meta


def _describe(meta: dict[str, Any], width: int) -> dict[str, str]:
    """The graph's ``metadata_props``."""
    size = int(meta["image_size"])
    props = {META_KEY: json.dumps(meta), "image_size": str(size), "backbone": str(meta["backbone"]),
             "mean": json.dumps(meta["mean"]), "std": json.dumps(meta["std"]),
             "crop_fraction": str(chosen_crop_fraction(None, meta)),
             "input": f"{INPUT_NAME}: (N, 3, {size}, {size}) uint8 RGB; resized (shorter side to "
                      f"{resize_side(size, chosen_crop_fraction(None, meta))}) and centre-cropped "
                      "by the caller; normalised inside the graph"}
    if meta["kind"] == "classifier":
        props["output"] = f"logits: (N, {width}) float32; softmax gives the class probabilities"
        props["class_names"] = json.dumps(meta["class_names"])
    else:
        props["output"] = f"features: (N, {width}) float32, the backbone's pooled features"
    return props


def _trace(graph: PixelModel, size: int, output: str) -> bytes:
    buf = io.BytesIO()
    example = torch.zeros(2, 3, size, size, dtype=torch.uint8)
    with warnings.catch_warnings():
        # The exporter's deprecation notice, and tracer notes on shape checks that hold for
        # every batch size (the comparison below runs another one).
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        try:
            torch.onnx.export(graph, (example,), buf, dynamo=False, opset_version=OPSET,
                              input_names=[INPUT_NAME], output_names=[output],
                              dynamic_axes={INPUT_NAME: {0: "batch"}, output: {0: "batch"}})
        except Exception as err:  # the exporter's errors name an operator it cannot convert
            raise UserError(f"torch.onnx.export cannot export this network: "
                            f"{str(err).splitlines()[0][:200]}") from None
    return buf.getvalue()


@torch.no_grad()
def _difference(graph: PixelModel, model: bytes, size: int) -> tuple[float, float]:
    """ONNX Runtime against torch on 3 random images (not the traced batch of 2): the largest
    absolute difference and the output's largest magnitude."""
    pixels = torch.randint(0, 256, (3, 3, size, size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    want = graph(pixels).numpy()
    got = cpu_session(model).run(None, {INPUT_NAME: pixels.numpy()})[0]
    if got.shape != want.shape:
        raise UserError(f"the exported graph gives {got.shape} for a batch of 3, torch "
                        f"{want.shape}: the batch dimension did not stay free")
    return float(np.abs(got - want).max()), float(np.abs(want).max())


def export_onnx(source: str | Path, out: str | Path, backbone: str | None = None) -> OnnxExport:
    """Write ``out`` (``.onnx``): the encoder of a run, checkpoint or weights file (output
    ``features``), or a ``train-classifier`` folder's classifier (output ``logits``); see the
    module docstring for the graph and its metadata. Checked with ``onnx.checker`` and against
    torch with ONNX Runtime before anything is written."""
    out = Path(out)
    if out.suffix != ".onnx":
        raise UserError(f"ONNX export target {out} must end in .onnx")
    onnx = import_onnx_package("onnx")
    import_onnx_package("onnxruntime")  # both before any model is built: said at once
    net, meta = _network(source, backbone)
    graph = PixelModel(net, meta["mean"], meta["std"]).eval()
    size = int(meta["image_size"])
    output = "logits" if meta["kind"] == "classifier" else "features"
    proto = onnx.load_from_string(_trace(graph, size, output))
    width = len(meta["class_names"]) if meta["kind"] == "classifier" else int(meta["feature_dim"])
    props = _describe(meta, width)
    onnx.helper.set_model_props(proto, props)
    proto.doc_string = (f"simclr-kit {meta['kind']} ({meta['backbone']}). Input {props['input']}."
                        f" Output {props['output']}.")
    onnx.checker.check_model(proto, full_check=True)
    serialised = proto.SerializeToString()
    difference, scale = _difference(graph, serialised, size)
    if difference > TOLERANCE * max(1.0, scale):
        raise UserError(f"ONNX Runtime's {output} differ from torch's by {difference:.3g} (largest "
                        f"value {scale:.3g}): the exporter does not reproduce {meta['backbone']}; "
                        "nothing was written")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, serialised)
    return OnnxExport(out, meta["kind"], output, width, difference)
