"""simclr-kit: SimCLR contrastive pretraining of image encoders, and what they are worth downstream.

The Python API mirrors the command line::

    from simclr_kit import PretrainConfig, DataConfig, pretrain, evaluate, load_encoder
    run_dir = pretrain(PretrainConfig(data=DataConfig(data="digits"), epochs=2))
    encoder = load_encoder(run_dir)            # eval-mode backbone + encoder.transform
    evaluate(run_dir, DataConfig(data="digits"))

Names are imported lazily so that ``simclr --help`` stays quick.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "PretrainConfig": "simclr_kit.config", "DataConfig": "simclr_kit.config",
    "AugmentConfig": "simclr_kit.config", "EvalConfig": "simclr_kit.config",
    "ClassifierConfig": "simclr_kit.config", "UserError": "simclr_kit.errors",
    "pretrain": "simclr_kit.train.loop", "evaluate": "simclr_kit.evaluation.protocols",
    "train_classifier": "simclr_kit.classifier", "predict": "simclr_kit.classifier",
    "load_classifier": "simclr_kit.classifier",
    "load_encoder": "simclr_kit.models.encoder", "export_backbone": "simclr_kit.models.encoder",
    "Encoder": "simclr_kit.models.encoder", "SimCLR": "simclr_kit.models.heads",
    "ProjectionHead": "simclr_kit.models.heads", "Classifier": "simclr_kit.models.heads",
    "build_backbone": "simclr_kit.models.backbones", "build_simclr": "simclr_kit.models.heads",
    "feature_dim": "simclr_kit.models.backbones", "NTXentLoss": "simclr_kit.models.loss",
    "nt_xent": "simclr_kit.models.loss", "SimCLRAugment": "simclr_kit.augment",
    "export_onnx": "simclr_kit.deploy.onnx_export", "export_hub": "simclr_kit.deploy.hub",
    "predict_onnx": "simclr_kit.deploy.onnx_predict",
}
__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'simclr_kit' has no attribute {name!r}")
