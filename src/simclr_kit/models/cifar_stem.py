"""The CIFAR stem of small images (He et al. 2016, section 4.2): a 3x3 stride-1 first conv and
no max-pool, for torchvision and timm ResNets alike.
"""

from __future__ import annotations

from torch import nn

from simclr_kit.errors import UserError

# Images at or below this size get the CIFAR stem: the ImageNet stem (7x7 stride-2 conv and a
# max-pool) shrinks a 32 px image to 8x8 before the first residual block.
CIFAR_STEM_MAX_SIZE = 64


def apply_cifar_stem(model: nn.Module, name: str) -> None:
    """3x3 stride-1 first conv and no max-pool (He et al. 2016, section 4.2, CIFAR ResNets)."""
    if not isinstance(getattr(model, "conv1", None), nn.Conv2d):
        raise UserError(f"the CIFAR stem is defined for ResNet-style backbones, not {name!r}: "
                        "use --stem imagenet")
    out_channels = model.conv1.out_channels
    model.conv1 = nn.Conv2d(3, out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
