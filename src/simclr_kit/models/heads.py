"""The projection head and the modules built around a backbone: :class:`SimCLR` (backbone +
projection head, what pretraining trains) and :class:`Classifier` (backbone + linear head).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from simclr_kit.models.backbones import (backbone_feature_dim, backbone_kwargs, build_backbone,
                                         resolve_stem)


class ProjectionHead(nn.Module):
    """SimCLR's 2-layer MLP g(h): Linear(d, h) - BN - ReLU - Linear(h, p) (Chen et al. 2020, sec. 2.1).

    ``h: (N, d)`` -> ``z: (N, p)``; the paper uses p=128, the seed 256 (our default).
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_dim, hidden_dim, bias=False),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )

    def forward(self, h: Tensor) -> Tensor:
        return self.layers(h)


class SimCLR(nn.Module):
    """Backbone f and projection head g: ``x: (N, 3, S, S)`` -> ``z = g(f(x)): (N, projection_dim)``.

    The seed's layout (attributes ``backbone`` and ``projection_head``), so its state dicts load.
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, projection_dim: int = 256,
                 hidden_dim: int | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.projection_head = ProjectionHead(feature_dim, hidden_dim or feature_dim, projection_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.projection_head(self.backbone(x).flatten(1))


def build_simclr(backbone_name: str, stem: str, image_size: int, projection_dim: int = 256,
                 hidden_dim: int | None = None, weights: str | None = None) -> SimCLR:
    """Backbone by name with the stem resolved for ``image_size``, plus the projection head."""
    stem = resolve_stem(stem, image_size, backbone_name)
    backbone = build_backbone(backbone_name, stem, weights,
                              backbone_kwargs(backbone_name, stem, image_size))
    dim = backbone_feature_dim(backbone_name, backbone, image_size)
    return SimCLR(backbone, dim, projection_dim, hidden_dim)


class Classifier(nn.Module):
    """Extracted backbone plus a new head: ``x: (N, 3, S, S)`` -> logits ``(N, num_classes)``.

    With ``frozen=True`` the backbone stays in eval mode whatever ``.train()`` says, so its
    BatchNorm statistics never move (the trap in lightly #1440), and gets no gradients.
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int,
                 head: str = "linear", hidden_dim: int = 512, frozen: bool = True) -> None:
        super().__init__()
        self.backbone = backbone
        self.frozen = frozen
        if head == "linear":
            self.head: nn.Module = nn.Linear(feature_dim, num_classes)
        else:
            self.head = nn.Sequential(nn.Linear(feature_dim, hidden_dim), nn.ReLU(inplace=True),
                                      nn.Linear(hidden_dim, num_classes))
        if frozen:
            self.backbone.requires_grad_(False)

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
        return self

    def forward(self, x: Tensor) -> Tensor:
        if self.frozen:
            with torch.no_grad():
                features = self.backbone(x).flatten(1)
        else:
            features = self.backbone(x).flatten(1)
        return self.head(features)
