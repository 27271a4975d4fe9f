"""Loads the compiled extension ``resnet_fused._C`` if it was built, without ever failing.

The package must stay importable without it: the Triton and reference backends need no C++.
``resnet-fused info`` reports why the extension is missing.
"""

from __future__ import annotations

import torch

from .ops.conv_bn_act import empty_output

try:
    from . import _C  # noqa: F401  (importing registers torch.ops.resnet_fused.conv_bn_act)

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


def has_cpu_ops() -> bool:
    return BUILD_INFO is not None


def has_cuda_ops() -> bool:
    return BUILD_INFO is not None and bool(BUILD_INFO.get("with_cuda"))
