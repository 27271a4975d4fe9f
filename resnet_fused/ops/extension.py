"""The compiled C++ ops (``resnet_fused._C``) as a backend: the same ops serve CPU tensors
(``cpu``: csrc/cpu/) and CUDA tensors (``cuda``: csrc/cuda/); the dispatcher picks by device."""

from __future__ import annotations

import torch

from . import aten
from .kernels import Kernels


def inference(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps, residual, stride, padding,
              dilation, groups, act, act_a, act_b, allow_tf32):
    # allow_tf32 unused: the C++ op convolves with at::convolution, which reads PyTorch's TF32 setting itself.
    return torch.ops.resnet_fused.conv_bn_act(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, float(eps),
                                              residual, stride, padding, dilation, groups, act, act_a, act_b)


def kernels():
    ops = torch.ops.resnet_fused

    def conv_stats(x, weight, bias, stride, padding, dilation, groups, allow_tf32):
        y = aten.convolution(x, weight, bias, stride, padding, dilation, groups)
        return (y, *ops.bn_stats(y))

    return Kernels(conv_stats, ops.bn_act_apply, ops.bn_act_backward_reduce, ops.bn_act_backward_apply,
                   ops.bn_update_running_stats_, ops.bn_stats)
