"""The ImageNet ResNets of He et al. 2015 (Table 1), written as the paper draws them.

Each block is conv → BN → ReLU, ..., conv → BN, then ``out += shortcut; out = relu(out)`` in
the block's own forward: the textbook form that ``resnet_fused.convert`` fuses generically
(conv + BN + ReLU into one op, the residual add + final ReLU into the last conv's epilogue).
Every ReLU is its own module, used once, so each one folds into the conv before it.

Module names follow torchvision's ResNet (``conv1, bn1, relu, maxpool, layer1..4, avgpool, fc``;
blocks ``conv1, bn1, conv2, bn2[, conv3, bn3], downsample``), so ``state_dict`` keys and shapes
equal torchvision's model of the same depth and its checkpoints load with ``load_state_dict``.

Where a bottleneck strides: the paper puts the stride in the first 1x1 conv
(``stride_in="conv1x1"``, the default here); torchvision's "v1.5" puts it in the 3x3 conv
(``stride_in="conv3x3"``), which costs 4.1 instead of 3.8 GMACs for ResNet-50. Both have the
same parameters; only with ``"conv3x3"`` does a torchvision checkpoint compute what it computed
in torchvision. Shortcuts are the paper's option B: identity, and a strided 1x1 conv + BN
(``downsample``) where the shape changes. ``residual=False`` gives the plain nets (no shortcut).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

STRIDE_IN = ("conv1x1", "conv3x3")


def _conv(c_in: int, c_out: int, kernel: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel, stride, padding=kernel // 2, bias=False)


def _projection(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    """Option B shortcut: 1x1 conv (strided) + BN, named ``downsample.0`` / ``downsample.1``."""
    return nn.Sequential(_conv(c_in, c_out, 1, stride), nn.BatchNorm2d(c_out))


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34): relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))."""

    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int = 1, residual: bool = True, stride_in: str = "conv1x1"):
        super().__init__()
        c_out = planes * self.expansion
        self.residual = residual
        self.conv1 = _conv(c_in, planes, 3, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = _conv(planes, c_out, 3)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = _projection(c_in, c_out, stride) if residual and (stride != 1 or c_in != c_out) else None
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.residual:
            out += x if self.downsample is None else self.downsample(x)
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 (reduce) → 3x3 → 1x1 (expand, 4x), each conv + BN, ReLU between, add + ReLU last."""

    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int = 1, residual: bool = True, stride_in: str = "conv1x1"):
        super().__init__()
        if stride_in not in STRIDE_IN:
            raise ValueError(f"stride_in must be one of {STRIDE_IN}, got {stride_in!r}")
        c_out = planes * self.expansion
        s1, s2 = (stride, 1) if stride_in == "conv1x1" else (1, stride)
        self.residual = residual
        self.conv1 = _conv(c_in, planes, 1, s1)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = _conv(planes, planes, 3, s2)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = _conv(planes, c_out, 1)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.downsample = _projection(c_in, c_out, stride) if residual and (stride != 1 or c_in != c_out) else None
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.residual:
            out += x if self.downsample is None else self.downsample(x)
        return self.relu(out)


class ResNet(nn.Module):
    """7x7/2 conv stem, 3x3/2 max pool, four stages of 64/128/256/512 planes (the last three
    start with stride 2), global average pool, ``num_classes``-way fc."""

    def __init__(self, block: type[nn.Module], layers: Sequence[int], num_classes: int = 1000,
                 residual: bool = True, stride_in: str = "conv1x1"):
        super().__init__()
        if stride_in not in STRIDE_IN:
            raise ValueError(f"stride_in must be one of {STRIDE_IN}, got {stride_in!r}")
        self.stride_in = stride_in
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        c_in = 64
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers)):
            blocks = []
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(block(c_in, planes, stride, residual=residual, stride_in=stride_in))
                c_in = planes * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(c_in, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _init_weights(model: nn.Module) -> None:
    """He initialisation (the paper's [13]) for convs; BN weight 1, bias 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def resnet18(num_classes: int = 1000) -> ResNet:
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes)


def resnet34(num_classes: int = 1000) -> ResNet:
    return ResNet(BasicBlock, (3, 4, 6, 3), num_classes)


def resnet50(num_classes: int = 1000, stride_in: str = "conv1x1") -> ResNet:
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes, stride_in=stride_in)


def resnet101(num_classes: int = 1000, stride_in: str = "conv1x1") -> ResNet:
    return ResNet(Bottleneck, (3, 4, 23, 3), num_classes, stride_in=stride_in)


def resnet152(num_classes: int = 1000, stride_in: str = "conv1x1") -> ResNet:
    return ResNet(Bottleneck, (3, 8, 36, 3), num_classes, stride_in=stride_in)


def plain18(num_classes: int = 1000) -> ResNet:
    """ResNet-18 without shortcuts (the paper's plain-18): no ``downsample`` modules."""
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes, residual=False)


def plain34(num_classes: int = 1000) -> ResNet:
    """ResNet-34 without shortcuts (the paper's plain-34, Fig. 3 middle)."""
    return ResNet(BasicBlock, (3, 4, 6, 3), num_classes, residual=False)
