"""resnet_fused: fused conv + BatchNorm + ReLU (+ residual add) for ResNet-style networks."""

from .backends import BACKENDS, available_backends
from .convert import convert
from .freeze import FrozenModel, freeze
from .functional import conv_batch_norm_act, conv_bn_act
from .nn import (
    FoldedBatchNorm2d,
    FoldedFrozenBatchNorm2d,
    FoldedGELU,
    FoldedHardswish,
    FoldedHardtanh,
    FoldedLeakyReLU,
    FoldedReLU,
    FoldedReLU6,
    FoldedSiLU,
    FoldedSyncBatchNorm,
    FusedBasicBlock,
    FusedBottleneck,
    FusedConv2d,
)
from .linear_norm import FusedLinearNorm
from .norm_act import FusedBatchNormAct2d

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "FoldedBatchNorm2d",
    "FoldedFrozenBatchNorm2d",
    "FoldedGELU",
    "FoldedHardswish",
    "FoldedHardtanh",
    "FoldedLeakyReLU",
    "FoldedReLU",
    "FoldedReLU6",
    "FoldedSiLU",
    "FoldedSyncBatchNorm",
    "FrozenModel",
    "FusedBasicBlock",
    "FusedBatchNormAct2d",
    "FusedBottleneck",
    "FusedConv2d",
    "FusedLinearNorm",
    "available_backends",
    "conv_batch_norm_act",
    "conv_bn_act",
    "convert",
    "freeze",
]
