"""CIFAR model families of the KD literature: ResNet, Wide ResNet and VGG for 32x32 inputs.

Architectures follow CRD's model zoo (Tian et al. 2020, github.com/HobbitLong/RepDistiller), so
accuracies and parameter counts compare with the published KD tables. Every `forward` returns
logits only; feature-distillation losses tap intermediate outputs by `named_modules()` name
(`layer1`..`layer3` for ResNet, `block1`..`block3` for WRN, `block0`..`block4` for VGG), so those
names are part of the interface.

Differences from CRD, none of which changes the parameter count:
- ReLUs are never in-place and every ReLU is its own module, so a forward hook on any module
  sees a tensor that later layers do not overwrite, and fires once per forward.
- The final pooling is adaptive, so inputs other than 32x32 also work.

Parameter counts in the docstrings are for a 100-class head, as in the CRD tables.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

__all__ = [
    "resnet8",
    "resnet8x4",
    "resnet14",
    "resnet20",
    "resnet32",
    "resnet32x4",
    "resnet44",
    "resnet56",
    "resnet110",
    "vgg8",
    "vgg11",
    "vgg13",
    "wrn_16_1",
    "wrn_16_2",
    "wrn_40_1",
    "wrn_40_2",
]


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def _kaiming_init(model: nn.Module) -> None:
    # He et al. 2015 "fan_out" normal for convs, as all three CRD families do; BN starts at
    # identity. Linear layers are initialised by each family.
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# ---------------------------------------------------------------------------------------------
# ResNet (He et al. 2016, Sec. 4.2): 3 stages of 6n+2 layers, widths 16-32-64.


class BasicBlock(nn.Module):
    """Post-activation residual block: conv-bn-relu-conv-bn, add shortcut, relu."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, channels, stride)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU()
        self.conv2 = _conv3x3(channels, channels)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(channels),
            )
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + identity)


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs: 3x3 stem, three stages of BasicBlocks, global pool, `fc`.

    Args:
        depth: Total weighted layers, 6n+2 (n blocks per stage).
        widths: Stem width then the three stage widths.
        num_classes: Output logits.
    """

    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int = 10):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"ResNet depth must be 6n+2 (8, 14, 20, ...), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = _conv3x3(3, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        self.layer1 = self._make_stage(widths[0], widths[1], n, stride=1)
        self.layer2 = self._make_stage(widths[1], widths[2], n, stride=2)
        self.layer3 = self._make_stage(widths[2], widths[3], n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        _kaiming_init(self)

    @staticmethod
    def _make_stage(in_channels: int, channels: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_channels, channels, stride)]
        layers += [BasicBlock(channels, channels) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet8(num_classes: int = 10) -> nn.Module:
    """ResNet-8, ~0.08M parameters."""
    return CifarResNet(8, (16, 16, 32, 64), num_classes)


def resnet14(num_classes: int = 10) -> nn.Module:
    """ResNet-14, ~0.18M parameters."""
    return CifarResNet(14, (16, 16, 32, 64), num_classes)


def resnet20(num_classes: int = 10) -> nn.Module:
    """ResNet-20, ~0.28M parameters."""
    return CifarResNet(20, (16, 16, 32, 64), num_classes)


def resnet32(num_classes: int = 10) -> nn.Module:
    """ResNet-32, ~0.47M parameters."""
    return CifarResNet(32, (16, 16, 32, 64), num_classes)


def resnet44(num_classes: int = 10) -> nn.Module:
    """ResNet-44, ~0.67M parameters."""
    return CifarResNet(44, (16, 16, 32, 64), num_classes)


def resnet56(num_classes: int = 10) -> nn.Module:
    """ResNet-56, ~0.86M parameters."""
    return CifarResNet(56, (16, 16, 32, 64), num_classes)


def resnet110(num_classes: int = 10) -> nn.Module:
    """ResNet-110, ~1.7M parameters."""
    return CifarResNet(110, (16, 16, 32, 64), num_classes)


def resnet8x4(num_classes: int = 10) -> nn.Module:
    """ResNet-8 with 4x wider stages (CRD's student for ResNet-32x4), ~1.2M parameters."""
    return CifarResNet(8, (32, 64, 128, 256), num_classes)


def resnet32x4(num_classes: int = 10) -> nn.Module:
    """ResNet-32 with 4x wider stages (CRD's strongest teacher), ~7.4M parameters."""
    return CifarResNet(32, (32, 64, 128, 256), num_classes)


# ---------------------------------------------------------------------------------------------
# Wide ResNet (Zagoruyko & Komodakis 2016): pre-activation blocks, depth 6n+4, widths k*16-32-64.


class WideBasicBlock(nn.Module):
    """Pre-activation block: bn-relu-conv-bn-relu-conv, add shortcut (no activation after)."""

    def __init__(self, in_channels: int, channels: int, stride: int, dropout: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU()
        self.conv1 = _conv3x3(in_channels, channels, stride)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu2 = nn.ReLU()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = _conv3x3(channels, channels)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu1(self.bn1(x))
        # As in the reference WRN, a projection shortcut reads the pre-activated input while an
        # identity shortcut reads the raw input.
        identity = x if self.shortcut is None else self.shortcut(act)
        out = self.relu2(self.bn2(self.conv1(act)))
        out = self.conv2(self.dropout(out))
        return out + identity


class WideResNet(nn.Module):
    """WRN-d-k for 32x32 inputs: 3x3 stem, `block1`..`block3`, final bn-relu, global pool, `fc`.

    Args:
        depth: Total weighted layers, 6n+4 (n blocks per stage).
        widen_factor: Multiplier k of the stage widths 16-32-64.
        num_classes: Output logits.
        dropout: Dropout between the two convs of each block (0 in CRD).
    """

    def __init__(
        self, depth: int, widen_factor: int, num_classes: int = 10, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n+4 (10, 16, 22, ...), got {depth}")
        n = (depth - 4) // 6
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.conv1 = _conv3x3(3, widths[0])
        self.block1 = self._make_stage(widths[0], widths[1], n, 1, dropout)
        self.block2 = self._make_stage(widths[1], widths[2], n, 2, dropout)
        self.block3 = self._make_stage(widths[2], widths[3], n, 2, dropout)
        # Blocks end without activation, so the network closes with the last bn-relu.
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        _kaiming_init(self)
        nn.init.zeros_(self.fc.bias)

    @staticmethod
    def _make_stage(
        in_channels: int, channels: int, blocks: int, stride: int, dropout: float
    ) -> nn.Sequential:
        layers = [WideBasicBlock(in_channels, channels, stride, dropout)]
        layers += [WideBasicBlock(channels, channels, 1, dropout) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = self.relu(self.bn1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def wrn_16_1(num_classes: int = 10) -> nn.Module:
    """WRN-16-1, ~0.18M parameters."""
    return WideResNet(16, 1, num_classes)


def wrn_16_2(num_classes: int = 10) -> nn.Module:
    """WRN-16-2, ~0.70M parameters."""
    return WideResNet(16, 2, num_classes)


def wrn_40_1(num_classes: int = 10) -> nn.Module:
    """WRN-40-1, ~0.57M parameters."""
    return WideResNet(40, 1, num_classes)


def wrn_40_2(num_classes: int = 10) -> nn.Module:
    """WRN-40-2, ~2.2M parameters."""
    return WideResNet(40, 2, num_classes)


# ---------------------------------------------------------------------------------------------
# VGG with batch norm (Simonyan & Zisserman 2015), CIFAR variant: five conv blocks, one linear.

_VGG_BLOCKS: dict[str, tuple[tuple[int, ...], ...]] = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
}


class CifarVGG(nn.Module):
    """VGG-BN for 32x32 inputs: `block0`..`block4` each followed by `relu0`..`relu4`.

    Each block is conv-bn(-relu-conv-bn)*; its closing ReLU is the separate `reluK` module, so a
    hook on `blockK` sees pre-activation features and one on `reluK` post-activation ones (CRD
    distils from both). Max-pools `pool0`..`pool2` halve the resolution after the first three
    blocks; `block3` and `block4` both run at 4x4 for 32x32 inputs, as in CRD, before a global
    average pool and a single linear `classifier`.

    Args:
        blocks: Conv widths of each of the five blocks.
        num_classes: Output logits.
    """

    def __init__(self, blocks: tuple[tuple[int, ...], ...], num_classes: int = 10) -> None:
        super().__init__()
        in_channels = 3
        for i, widths in enumerate(blocks):
            self.add_module(f"block{i}", self._make_block(in_channels, widths))
            self.add_module(f"relu{i}", nn.ReLU())
            if i < 3:
                self.add_module(f"pool{i}", nn.MaxPool2d(2))
            in_channels = widths[-1]
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(in_channels, num_classes)
        _kaiming_init(self)
        nn.init.normal_(self.classifier.weight, 0.0, 0.01)
        nn.init.zeros_(self.classifier.bias)

    @staticmethod
    def _make_block(in_channels: int, widths: tuple[int, ...]) -> nn.Sequential:
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        for j, width in enumerate(widths, start=1):
            if j > 1:
                layers[f"relu{j - 1}"] = nn.ReLU()
            # Convs keep their bias despite the BN after them, as in CRD, so parameter counts
            # match the published tables.
            layers[f"conv{j}"] = nn.Conv2d(in_channels, width, 3, padding=1)
            layers[f"bn{j}"] = nn.BatchNorm2d(width)
            in_channels = width
        return nn.Sequential(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool0(self.relu0(self.block0(x)))
        x = self.pool1(self.relu1(self.block1(x)))
        x = self.pool2(self.relu2(self.block2(x)))
        x = self.relu3(self.block3(x))
        x = self.relu4(self.block4(x))
        return self.classifier(torch.flatten(self.avgpool(x), 1))


def vgg8(num_classes: int = 10) -> nn.Module:
    """VGG-8 with batch norm (CRD's "S" config), ~4.0M parameters."""
    return CifarVGG(_VGG_BLOCKS["vgg8"], num_classes)


def vgg11(num_classes: int = 10) -> nn.Module:
    """VGG-11 with batch norm ("A" config), ~9.3M parameters."""
    return CifarVGG(_VGG_BLOCKS["vgg11"], num_classes)


def vgg13(num_classes: int = 10) -> nn.Module:
    """VGG-13 with batch norm ("B" config), ~9.5M parameters."""
    return CifarVGG(_VGG_BLOCKS["vgg13"], num_classes)
