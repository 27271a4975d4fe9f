"""The unfused computation in plain torch ops: the test oracle, the benchmark baseline and the
fallback for anything a fused path does not cover.

Nothing here is clever on purpose: each function is the sequence of PyTorch calls that the
fused kernels must reproduce.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    bn_weight: torch.Tensor | None,
    bn_bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    *,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    residual: torch.Tensor | None = None,
    relu: bool = True,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
) -> torch.Tensor:
    """conv2d → batch_norm → [+ residual] → [relu], with F.batch_norm's train/eval semantics."""
    y = F.conv2d(x, weight, conv_bias, stride, padding, dilation, groups)
    y = F.batch_norm(y, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)
    return add_act(y, residual, relu)


def conv_bn_act_modules(
    x: torch.Tensor,
    conv: nn.Conv2d,
    bn: nn.BatchNorm2d,
    residual: torch.Tensor | None = None,
    relu: bool = True,
) -> torch.Tensor:
    """Exactly what ``relu(bn(conv(x)) [+ residual])`` computes with these modules.

    The base classes' forward methods are called directly so that subclasses (the fused
    modules themselves) get stock nn.Conv2d / nn.BatchNorm2d behaviour: padding modes, batch
    statistics in training, running-stat updates, momentum=None averaging, num_batches_tracked.
    """
    y = nn.Conv2d.forward(conv, x)
    y = nn.BatchNorm2d.forward(bn, y)
    return add_act(y, residual, relu)


def add_act(y: torch.Tensor, residual: torch.Tensor | None, relu: bool) -> torch.Tensor:
    if residual is not None:
        y = y + residual
    return torch.relu(y) if relu else y
