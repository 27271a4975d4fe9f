"""ATen's convolution (oneDNN on CPU, cuDNN on CUDA) as the training units of the C++ and
reference backends run it: the weight in the input's memory format, so the output's format is
the input's, as the fake kernels predict (shapes.output_memory_format)."""

from __future__ import annotations

import torch

from .shapes import output_memory_format


def convolution(x, weight, bias, stride, padding, dilation, groups):
    fmt = output_memory_format(x)
    return torch.ops.aten.convolution(
        x, weight.contiguous(memory_format=fmt), bias, stride, padding, dilation, False, [0, 0], groups
    )


def convolution_backward(dy, x, weight, has_bias, stride, padding, dilation, groups, output_mask):
    """``(dx, dw, d_bias)`` of ``convolution``, None where ``output_mask`` says not needed."""
    fmt = output_memory_format(x)
    return torch.ops.aten.convolution_backward(
        dy, x, weight.contiguous(memory_format=fmt), [weight.shape[0]] if has_bias else None,
        stride, padding, dilation, False, [0, 0], groups, output_mask,
    )
