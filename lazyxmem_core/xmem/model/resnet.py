"""ResNet pieces in torchvision's parameter layout (stride on the 3x3 conv), built randomly:
the real weights always come from an XMem checkpoint, so nothing is downloaded."""
from __future__ import annotations

import torch
from torch import nn

from .fastconv import Conv2d


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    return Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False), nn.BatchNorm2d(cout)


class BasicBlock(nn.Module):
    """ResNet-18 block: two 3x3 convs."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(cin, cout, 3, stride)
        self.conv2, self.bn2 = _conv_bn(cout, cout, 3)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = nn.Sequential(*_conv_bn(cin, cout, 1, stride)) if (stride != 1 or cin != cout) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """ResNet-50 block: 1x1 reduce, 3x3 (carries the stride), 1x1 expand by 4."""

    def __init__(self, cin: int, width: int, stride: int = 1) -> None:
        super().__init__()
        cout = width * 4
        self.conv1, self.bn1 = _conv_bn(cin, width, 1)
        self.conv2, self.bn2 = _conv_bn(width, width, 3, stride)
        self.conv3, self.bn3 = _conv_bn(width, cout, 1)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = nn.Sequential(*_conv_bn(cin, cout, 1, stride)) if (stride != 1 or cin != cout) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


def stem(in_channels: int) -> tuple[nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d]:
    """ResNet's 7x7 stride-2 conv, BN and 3x3 stride-2 max-pool (to /4), unpacked so that the
    owning module keeps the official parameter names (conv1, bn1)."""
    conv, bn = _conv_bn(in_channels, 64, 7, stride=2)
    return conv, bn, nn.MaxPool2d(3, stride=2, padding=1)


def make_layer(block: type, cin: int, width: int, blocks: int, stride: int) -> nn.Sequential:
    expansion = 4 if block is Bottleneck else 1
    layers = [block(cin, width, stride)]
    layers += [block(width * expansion, width) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)
