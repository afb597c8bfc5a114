"""He et al.'s ResNets for small images: :class:`BasicBlock`, :class:`CifarResNet` and the
builders ``resnet8`` ... ``resnet110`` (the 6n + 2 family) and ``resnet_digits``.

Shortcuts. He et al. train their CIFAR ResNets with option A shortcuts (identity plus zero
padding on downsampling), which has no parameters and pads channels with zeros. We use option B
(a 1x1 convolution + BatchNorm projection where the shape changes, identity elsewhere): it adds
two small projections per network (ResNet-20: +1% parameters, +0.6% FLOPs) but makes every
residual add a plain ``a + b`` of two conv/BN outputs, which torch-pruning's dependency graph
couples exactly, so the channels of a stage can be pruned together and the FLOPs saving is real.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..ops.checks import check_counts

__all__ = ["BasicBlock", "CifarResNet", "resnet8", "resnet20", "resnet32", "resnet56", "resnet110", "resnet_digits"]


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers and a residual add (He et al. 2016, Fig. 2 left).

    The shortcut is the identity when the shape is kept and a 1x1 conv + BN projection
    (option B) when ``stride != 1`` or the width changes.

    Shape:
        - Input: (N, in_planes, H, W)
        - Output: (N, planes, H_out, W_out) with H_out = ceil(H / stride).
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """A ResNet for small images: a 3x3 stem, stages of :class:`BasicBlock`, global pooling, a linear head.

    Stage ``i`` has ``depths[i]`` blocks of width ``widths[i]``; every stage after the first
    halves the spatial size in its first block.

    Args:
        depths: blocks per stage, e.g. ``(3, 3, 3)`` for ResNet-20.
        widths: channels per stage, e.g. ``(16, 32, 64)``; the stem has ``widths[0]``.
        num_classes: outputs of the classifier.
        in_channels: channels of the input images.

    Shape:
        - Input: (N, in_channels, H, W)
        - Output: (N, num_classes)
    """

    def __init__(
        self, depths: Sequence[int], widths: Sequence[int], num_classes: int = 10, in_channels: int = 3
    ) -> None:
        super().__init__()
        if len(depths) != len(widths) or not depths or min(depths) < 1 or min(widths) < 1:
            raise ValueError(
                f"depths and widths must be non-empty sequences of positive ints of equal length, "
                f"got depths={tuple(depths)}, widths={tuple(widths)}"
            )
        check_counts(False, num_classes=num_classes, in_channels=in_channels)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        stages = []
        in_planes = widths[0]
        for i, (depth, planes) in enumerate(zip(depths, widths)):
            blocks = []
            for j in range(depth):
                blocks.append(BasicBlock(in_planes, planes, stride=2 if i > 0 and j == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layers = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _cifar_resnet(depth: int, num_classes: int, in_channels: int) -> CifarResNet:
    n = (depth - 2) // 6
    return CifarResNet((n, n, n), (16, 32, 64), num_classes, in_channels)


def resnet8(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-8 for small images (3 stages x 1 block, 16/32/64 channels, ~78k parameters).

    The depth-8 member of He et al.'s 6n + 2 family: the network 2 CPU cores train on
    Fashion-MNIST (28x28x1) to over 92% test top-1 in about ten minutes.
    """
    return _cifar_resnet(8, num_classes, in_channels)


def resnet20(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-20 for 32x32 images (3 stages x 3 blocks, 16/32/64 channels, ~0.27M parameters)."""
    return _cifar_resnet(20, num_classes, in_channels)


def resnet32(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-32 for 32x32 images (3 stages x 5 blocks, 16/32/64 channels, ~0.47M parameters)."""
    return _cifar_resnet(32, num_classes, in_channels)


def resnet56(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-56 for 32x32 images (3 stages x 9 blocks, 16/32/64 channels, ~0.86M parameters)."""
    return _cifar_resnet(56, num_classes, in_channels)


def resnet110(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-110 for 32x32 images (3 stages x 18 blocks, 16/32/64 channels, ~1.7M parameters)."""
    return _cifar_resnet(110, num_classes, in_channels)


def resnet_digits(num_classes: int = 10, in_channels: int = 1) -> CifarResNet:
    """A small ResNet for 8x8 digits: 2 stages x 1 block of 16/32 channels (~20k parameters).

    Stage 2 downsamples 8x8 to 4x4 and carries a projection shortcut, so the network has
    both kinds of residual coupling a pruner must handle.
    """
    return CifarResNet((1, 1), (16, 32), num_classes, in_channels)
