"""Backbone factory, feature-size probe, projection head and the frozen classifier."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from simclr_kit.errors import UserError
from simclr_kit.models.heads import Classifier, ProjectionHead, build_simclr
from simclr_kit.models.backbones import build_backbone, feature_dim, resolve_stem


@pytest.mark.parametrize("name,expected", [("resnet18", 512), ("resnet50", 2048),
                                           ("mobilenet_v3_small", 1024), ("efficientnet_b0", 1280)])
def test_feature_dim_probe_matches_torchvision_final_layer_input(name, expected):
    backbone = build_backbone(name, "imagenet")
    assert feature_dim(backbone, 32) == expected
    # Independent check: the size torchvision's final Linear would have consumed.
    reference = torchvision.models.get_model(name, weights=None)
    head = getattr(reference, "fc", None) or reference.classifier
    last = head if isinstance(head, nn.Linear) else [m for m in head if isinstance(m, nn.Linear)][-1]
    assert last.in_features == expected


_SLOW = pytest.mark.slow  # over ~5 s to build on 2 busy cores (a random init of 30-130 M weights)
# The smallest member of each torchvision classification family, the name of its final layer
# (read from torchvision's source), and the smallest input size (px) it runs on, at least 32.
FAMILIES = [
    ("resnet18", "fc", 32), ("resnext50_32x4d", "fc", 32),
    pytest.param("wide_resnet50_2", "fc", 32, marks=_SLOW),
    ("regnet_x_400mf", "fc", 32), ("regnet_y_400mf", "fc", 32),
    ("mobilenet_v2", "classifier.1", 32), ("mobilenet_v3_small", "classifier.3", 32),
    ("efficientnet_b0", "classifier.1", 32), ("efficientnet_v2_s", "classifier.1", 32),
    pytest.param("convnext_tiny", "classifier.2", 32, marks=_SLOW),
    pytest.param("vgg11", "classifier.6", 32, marks=_SLOW),
    ("alexnet", "classifier.6", 64), ("densenet121", "classifier", 32),
    ("shufflenet_v2_x0_5", "fc", 32), ("mnasnet0_5", "classifier.1", 32),
    # 64 px, not the 24 px it takes: its last map must be larger than 1 x 1 to tell the
    # pooled features from the flattened map.
    ("squeezenet1_0", "classifier.1", 64), ("squeezenet1_1", "classifier.1", 64),
    pytest.param("googlenet", "fc", 32, marks=_SLOW),
    pytest.param("inception_v3", "fc", 75, marks=_SLOW),
    pytest.param("vit_b_32", "heads.head", 224, marks=_SLOW),
    pytest.param("swin_t", "head", 32, marks=_SLOW),
    pytest.param("swin_v2_t", "head", 32, marks=_SLOW),
    ("maxvit_t", "classifier.5", 224),
]


@pytest.mark.parametrize("name,final,size", FAMILIES)
def test_features_are_torchvision_forward_up_to_its_final_layer(name, final, size):
    """Same weights, eval mode: the backbone's features are what torchvision's own model feeds
    its final layer (SqueezeNet's is a 1x1 conv: its input, globally averaged). Its state dict
    loads strictly into the torchvision model once that layer is restored, and in train mode
    the backbone returns a tensor (auxiliary classifiers removed)."""
    torch.manual_seed(0)
    backbone = build_backbone(name, "imagenet")
    # Without auxiliary classifiers (the backbone has none); built on the meta device where it
    # can be (no random init to wait for), the torchvision model takes the backbone's weights
    # plus a final layer of its own.
    extra = {"aux_logits": False, "init_weights": False} if name in (
        "googlenet", "inception_v3") else {}
    try:
        with torch.device("meta"):
            reference = torchvision.models.get_model(name, weights=None, **extra)
    except NotImplementedError:  # RegNet computes its widths with tensors while it is built
        reference = torchvision.models.get_model(name, weights=None, **extra)
    state = backbone.state_dict()
    head = {k: torch.randn(v.shape) for k, v in reference.state_dict().items()
            if k.startswith(final + ".")}
    assert head and not set(head) & set(state), "the final layer is the one thing missing"
    state.update(head)  # keeps the state dict's version metadata, which MNASNet's loader reads
    reference.load_state_dict(state, strict=True, assign=True)
    seen = []
    reference.get_submodule(final).register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        reference.eval()(x)
        features = backbone.eval()(x)
    expected = seen[0].mean((2, 3)) if seen[0].ndim == 4 else seen[0]
    torch.testing.assert_close(features.flatten(1), expected.flatten(1))
    assert isinstance(backbone.train()(x), torch.Tensor)


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
