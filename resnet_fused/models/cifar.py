"""The CIFAR-10 networks of He et al. 2015, Sec. 4.2: 6n+2 weighted layers.

A 3x3 conv (16 filters), three stages of n basic blocks on 32/16/8-pixel maps with 16/32/64
filters (the second and third start with stride 2), global average pool, 10-way fc. ResNet-20/32/
44/56/110 have n = 3/5/7/9/18 and 0.27M/0.46M/0.66M/0.85M/1.7M parameters.

Shortcuts are option A, parameter-free: identity, and where a stage halves the map and doubles
the filters, the input subsampled with stride 2 (``x[:, :, ::2, ::2]``, the positions a 3x3
stride-2 conv with padding 1 centres on, so odd sizes line up too) with zero channels appended
(input channel k stays channel k; the new channels are zero). The plain nets are the same stack
without shortcuts.

``width`` (16 in the paper) scales all three stages, ``in_channels`` the input; the blocks are in
the textbook form ``resnet_fused.convert`` fuses, add + ReLU included.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .imagenet import _init_weights


class ShortcutA(nn.Module):
    """Option A shortcut: subsample by ``stride``, then zero-pad the channels to ``c_out``."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        if c_out < c_in:
            raise ValueError(f"option A can only add channels ({c_in} -> {c_out})")
        self.c_in, self.c_out, self.stride = c_in, c_out, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.c_out != self.c_in:
            x = F.pad(x, (0, 0, 0, 0, 0, self.c_out - self.c_in))
        return x

    def extra_repr(self) -> str:
        return f"{self.c_in}, {self.c_out}, stride={self.stride}"


class CifarBlock(nn.Module):
    """Two 3x3 conv + BN, ReLU between; ``out += shortcut(x); out = relu(out)`` when residual."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, residual: bool = True):
        super().__init__()
        self.residual = residual
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        if residual:
            self.shortcut = ShortcutA(c_in, c_out, stride) if stride != 1 or c_in != c_out else nn.Identity()
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.residual:
            out += self.shortcut(x)
        return self.relu(out)


class CifarResNet(nn.Module):
    """6n+2 layers: conv, 3 stages × n blocks × 2 convs, fc."""

    def __init__(self, n: int, num_classes: int = 10, residual: bool = True, width: int = 16, in_channels: int = 3):
        super().__init__()
        self.n = n
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        c_in = width
        for i in range(3):
            c_out = width << i
            blocks = []
            for j in range(n):
                blocks.append(CifarBlock(c_in, c_out, 2 if i > 0 and j == 0 else 1, residual))
                c_in = c_out
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(c_in, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _depth_to_n(depth: int) -> int:
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNets have 6n+2 layers, got {depth}")
    return (depth - 2) // 6


def cifar_resnet(depth: int, num_classes: int = 10, width: int = 16, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(_depth_to_n(depth), num_classes, True, width, in_channels)


def cifar_plain(depth: int, num_classes: int = 10, width: int = 16, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(_depth_to_n(depth), num_classes, False, width, in_channels)


def resnet20(**kwargs) -> CifarResNet:
    return cifar_resnet(20, **kwargs)


def resnet32(**kwargs) -> CifarResNet:
    return cifar_resnet(32, **kwargs)


def resnet44(**kwargs) -> CifarResNet:
    return cifar_resnet(44, **kwargs)


def resnet56(**kwargs) -> CifarResNet:
    return cifar_resnet(56, **kwargs)


def resnet110(**kwargs) -> CifarResNet:
    return cifar_resnet(110, **kwargs)


def plain20(**kwargs) -> CifarResNet:
    return cifar_plain(20, **kwargs)


def plain32(**kwargs) -> CifarResNet:
    return cifar_plain(32, **kwargs)


def plain44(**kwargs) -> CifarResNet:
    return cifar_plain(44, **kwargs)


def plain56(**kwargs) -> CifarResNet:
    return cifar_plain(56, **kwargs)


def plain110(**kwargs) -> CifarResNet:
    return cifar_plain(110, **kwargs)
