"""The shared test grids, each defined once, and the builders that turn a grid entry into tensors.

A grid here is data (shapes, and per backend and device the dtypes and flags worth running);
the test files under ops/ decide what to check. Nothing here touches the GPU: a ``device`` is
only used when a test builds its tensors.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import resnet50


# --- ResNet-50's convolutions ----------------------------------------------------------------


def resnet50_conv_shapes(batch: int = 2, size: int = 224) -> list[dict]:
    """Every distinct conv of torchvision's ResNet-50 as the kwargs of cuda_conv_plan, traced on
    the meta device (no memory, no compute), in first-use order."""
    with torch.device("meta"):
        model = resnet50()
    seen: dict[tuple, dict] = {}

    def record(conv, args):
        shape = dict(
            input_shape=list(args[0].shape), weight_shape=list(conv.weight.shape), stride=list(conv.stride),
            padding=list(conv.padding), dilation=list(conv.dilation), groups=conv.groups,
        )
        seen.setdefault(tuple(map(str, shape.values())), shape)

    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            module.register_forward_pre_hook(record)
    model(torch.empty(batch, 3, size, size, device="meta"))
    return list(seen.values())


RESNET50 = resnet50_conv_shapes()
RESNET50_IDS = [
    f"{s['input_shape'][1]}-{s['weight_shape'][0]}-{s['weight_shape'][2]}x{s['weight_shape'][3]}-s{s['stride'][0]}-"
    f"{s['input_shape'][2]}px"
    for s in RESNET50
]
