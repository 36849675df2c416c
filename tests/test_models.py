"""Backbone factory, feature-size probe, projection head and the frozen classifier."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from simclr_kit.errors import UserError
from simclr_kit.models import (Classifier, ProjectionHead, build_backbone, build_simclr,
                               feature_dim, resolve_stem)


@pytest.mark.parametrize("name,expected", [("resnet18", 512), ("resnet50", 2048),
                                           ("mobilenet_v3_small", 576), ("efficientnet_b0", 1280)])
def test_feature_dim_probe_matches_torchvision_classifier_input(name, expected):
    backbone = build_backbone(name, "imagenet")
    assert feature_dim(backbone, 32) == expected
    # Independent check: the size the torchvision classifier would have consumed.
    reference = torchvision.models.get_model(name, weights=None)
    head = getattr(reference, "fc", None) or reference.classifier
    first = head if isinstance(head, nn.Linear) else next(m for m in head if isinstance(m, nn.Linear))
    assert first.in_features == expected


def test_classifier_is_removed_and_output_is_features():
    backbone = build_backbone("resnet18", "imagenet")
    assert isinstance(backbone.fc, nn.Identity)
    assert backbone.eval()(torch.zeros(3, 3, 64, 64)).shape == (3, 512)


def test_stem_switch():
    assert resolve_stem("auto", 32) == "cifar" and resolve_stem("auto", 64) == "cifar"
    assert resolve_stem("auto", 96) == "imagenet" and resolve_stem("imagenet", 32) == "imagenet"
    cifar = build_backbone("resnet18", "cifar")
    assert cifar.conv1.kernel_size == (3, 3) and cifar.conv1.stride == (1, 1)
    assert isinstance(cifar.maxpool, nn.Identity)
    # CIFAR stem keeps a 32 px image at 32x32 into layer1; the ImageNet stem shrinks it to 8x8.
    seen = {}
    for stem in ("cifar", "imagenet"):
        model = build_backbone("resnet18", stem).eval()
        model.layer1.register_forward_hook(lambda m, i, o, s=stem: seen.__setitem__(s, o.shape[-1]))
        model(torch.zeros(1, 3, 32, 32))
    assert seen == {"cifar": 32, "imagenet": 8}


def test_cifar_stem_refused_for_non_resnet():
    with pytest.raises(UserError, match="stem"):
        build_backbone("mobilenet_v3_small", "cifar")


def test_unknown_backbone_is_a_user_error():
    with pytest.raises(UserError, match="unknown backbone"):
        build_backbone("resnet19", "cifar")


def test_projection_head_shapes_and_layout():
    head = ProjectionHead(512, 512, 256)
    kinds = [type(m) for m in head.layers]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert head(torch.randn(4, 512)).shape == (4, 256)
    model = build_simclr("resnet18", "auto", 16, projection_dim=64, hidden_dim=128)
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 64)
    assert model.feature_dim == 512


def test_frozen_classifier_keeps_backbone_in_eval_and_bit_identical():
    backbone = build_backbone("resnet18", "cifar")
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    model = Classifier(backbone, 512, 3, frozen=True).train()
    assert not backbone.training
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    for _ in range(2):
        loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 8, 8)), torch.tensor([0, 1, 2, 0]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, before[key]), key
