"""Loads the compiled extension ``resnet_fused._C`` if it was built, without ever failing.

The package must stay importable without it: the Triton and reference backends need no C++.
``resnet-fused info`` reports why the extension is missing.
"""

from __future__ import annotations

import torch

from .ops.conv_bn_act import empty_output

try:
    from . import _C  # noqa: F401  (importing registers the torch.ops.resnet_fused ops)

    BUILD_INFO: dict | None = dict(_C.build_info())
    LOAD_ERROR: str | None = None
except ImportError as error:  # not built, or built against another torch
    BUILD_INFO = None
    LOAD_ERROR = f"{type(error).__name__}: {error}"

if BUILD_INFO is not None:
    # Shapes for torch.compile and opcheck; the C++ schema carries no shape function.
    @torch.library.register_fake("resnet_fused::conv_bn_act")
    def _(input, weight, bias, bn_weight, bn_bias, mean, var, eps, residual, stride, padding, dilation, groups, relu):
        return empty_output(input, weight, stride, padding, dilation)

    # The training BatchNorm ops (csrc/bn_act.h): outputs exactly as the C++ driver allocates them.
    def _bn_memory_format(y):
        # channels_last iff y is channels_last-dense and not NCHW-dense: the rule of csrc/bn_act.h.
        if y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous():
            return torch.channels_last
        return torch.contiguous_format

    def _bn_like(y):
        return torch.empty(y.shape, dtype=y.dtype, device=y.device, memory_format=_bn_memory_format(y))

    def _bn_per_channel(y):
        # (K,) in the accumulation type: float64 for float64, float32 otherwise.
        acc = torch.float64 if y.dtype == torch.float64 else torch.float32
        return y.new_empty((y.shape[1],), dtype=acc)

    @torch.library.register_fake("resnet_fused::bn_stats")
    def _(y):
        return _bn_per_channel(y), _bn_per_channel(y)

    @torch.library.register_fake("resnet_fused::bn_act_apply")
    def _(y, mean, var, gamma, beta, eps, residual, relu):
        return _bn_like(y)

    @torch.library.register_fake("resnet_fused::bn_act_backward_reduce")
    def _(grad_out, out, y, mean, var, eps, relu):
        return _bn_per_channel(y), _bn_per_channel(y)

    @torch.library.register_fake("resnet_fused::bn_act_backward_apply")
    def _(grad_out, out, y, mean, var, gamma, eps, sum_g, sum_g_xhat, count, training, relu, residual_grad):
        d_residual = _bn_like(y) if residual_grad else y.new_empty((0,))
        return _bn_like(y), d_residual

    @torch.library.register_fake("resnet_fused::bn_update_running_stats_")
    def _(running_mean, running_var, mean, var, count, momentum):
        return None


def has_cpu_ops() -> bool:
    return BUILD_INFO is not None


def has_cuda_ops() -> bool:
    return BUILD_INFO is not None and bool(BUILD_INFO.get("with_cuda"))
