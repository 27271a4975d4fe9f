"""Output shape and memory-format rules that every backend, fake kernel and layer shares."""

from __future__ import annotations

import torch


def output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def output_memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last in gives channels_last out, as PyTorch's own conv does: channels_last
    iff ``x`` is channels_last-dense and not NCHW-dense (the rule of csrc/bn_act.h too)."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def empty_output(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation) -> torch.Tensor:
    """The conv output of ``x`` and ``weight`` (K, C/groups, R, S): shape, dtype, device and
    memory format, uninitialized."""
    n, _, h, w = x.shape
    k, _, r, s = weight.shape
    p = output_size(h, r, stride[0], padding[0], dilation[0])
    q = output_size(w, s, stride[1], padding[1], dilation[1])
    return torch.empty((n, k, p, q), dtype=x.dtype, device=x.device, memory_format=output_memory_format(x))


def empty_like_activation(y: torch.Tensor) -> torch.Tensor:
    """A tensor shaped like ``y`` in the layout the BatchNorm ops write (output_memory_format)."""
    return torch.empty(y.shape, dtype=y.dtype, device=y.device, memory_format=output_memory_format(y))


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The per-channel statistics' dtype: float64 for float64 activations, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def span(t: torch.Tensor) -> int:
    """1 + the largest element offset ``t`` addresses: its strides, not its numel, decide
    whether 32-bit offsets suffice (a small view can reach far into a large buffer)."""
    return 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))
