"""Tiny CNN for smoke and CI runs: trains a few epochs on CPU in seconds."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn


class TinyCNN(nn.Module):
    """Three conv-bn-relu blocks (`block1`..`block3`, widths w, 2w, 4w), global pool, `fc`.

    The first two blocks end in a 2x2 max-pool; the global average pool lets any input of at
    least 4x4 through (8x8 and up is the intended range).

    Args:
        num_classes: Output logits.
        width: Channels of the first block; ~24k parameters at 16, ~94k at 32.
    """

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        widths = (width, 2 * width, 4 * width)
        self.block1 = self._make_block(3, widths[0], pool=True)
        self.block2 = self._make_block(widths[0], widths[1], pool=True)
        self.block3 = self._make_block(widths[1], widths[2], pool=False)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[2], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    @staticmethod
    def _make_block(in_channels: int, channels: int, pool: bool) -> nn.Sequential:
        layers: OrderedDict[str, nn.Module] = OrderedDict(
            conv=nn.Conv2d(in_channels, channels, 3, padding=1, bias=False),
            bn=nn.BatchNorm2d(channels),
            relu=nn.ReLU(),
        )
        if pool:
            layers["pool"] = nn.MaxPool2d(2)
        return nn.Sequential(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def tiny_cnn(num_classes: int = 10, width: int = 16) -> nn.Module:
    """Builds a `TinyCNN`; `width` scales all three blocks."""
    return TinyCNN(num_classes, width)
