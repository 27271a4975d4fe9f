"""The networks of He et al. 2015 ("Deep Residual Learning for Image Recognition"), built from
textbook blocks that ``resnet_fused.convert`` fuses completely (conv + BN + ReLU, and each
block's residual add + final ReLU):

- ImageNet (Table 1): ``resnet18/34/50/101/152``, state_dict-compatible with torchvision's
  models of the same depth; bottlenecks stride in the first 1x1 conv as in the paper
  (``stride_in="conv1x1"``) or in the 3x3 as torchvision's v1.5 (``stride_in="conv3x3"``).
  Plain counterparts ``plain18/plain34``.
- CIFAR-10 (Sec. 4.2): ``resnet20/32/44/56/110`` with option-A (parameter-free) shortcuts, and
  the plain nets ``plain20/32/44/56/110``.

``count_macs(model, input_size)`` counts the multiply-adds of the convs and linear layers.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .cifar import (
    CifarBlock, CifarResNet, ShortcutA, cifar_plain, cifar_resnet,
    plain20, plain32, plain44, plain56, plain110, resnet20, resnet32, resnet44, resnet56, resnet110,
)
from .imagenet import BasicBlock, Bottleneck, ResNet, plain18, plain34, resnet18, resnet34, resnet50, resnet101, resnet152


def count_macs(model: nn.Module, input_size: Sequence[int]) -> int:
    """Multiply-adds of one forward of one sample through ``model``'s Conv2d and Linear layers.

    ``input_size`` is ``(C, H, W)`` (or with a leading batch size, which is divided out). The
    forward runs once on zeros, in eval mode and without gradients, on the device of the
    model's parameters -- a model built under ``torch.device("meta")`` is counted without
    computing anything. Biases, BatchNorm, ReLU, pooling and adds are not counted, as in the
    paper's FLOPs (which are multiply-adds).
    """
    size = tuple(input_size)
    if len(size) == 3:
        size = (1,) + size
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    total = 0

    def conv_hook(module, inputs, output):
        nonlocal total
        k = module.weight[0].numel()  # in_channels / groups × kernel area
        total += output.numel() * k

    def linear_hook(module, inputs, output):
        nonlocal total
        total += output.numel() * module.in_features

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(size, device=device, dtype=dtype))
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    return total // size[0]


__all__ = [
    "BasicBlock", "Bottleneck", "CifarBlock", "CifarResNet", "ResNet", "ShortcutA",
    "cifar_plain", "cifar_resnet", "count_macs",
    "plain18", "plain34", "plain20", "plain32", "plain44", "plain56", "plain110",
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
]
