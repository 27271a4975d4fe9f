"""Loads the compiled extension ``resnet_fused._C`` if it was built, without ever failing.

The package must stay importable without it: the Triton and reference backends need no C++.
``resnet-fused info`` reports why the extension is missing.
"""

from __future__ import annotations

import torch

from .ops import fakes

try:
    from . import _C  # noqa: F401  (importing registers the torch.ops.resnet_fused ops)

    BUILD_INFO: dict | None = dict(_C.build_info())
    LOAD_ERROR: str | None = None
except ImportError as error:  # not built, or built against another torch
    BUILD_INFO = None
    LOAD_ERROR = f"{type(error).__name__}: {error}"

if BUILD_INFO is not None:
    # Shapes for torch.compile and opcheck; the C++ schemas carry no shape functions.
    fakes.register({name: f"resnet_fused::{name}" for name in (
        "conv_bn_act", "bn_stats", "bn_act_apply", "bn_act_backward_reduce", "bn_act_backward_apply",
        "bn_update_running_stats_")})

def has_cpu_ops() -> bool:
    return BUILD_INFO is not None

def has_cuda_ops() -> bool:
    return BUILD_INFO is not None and bool(BUILD_INFO.get("with_cuda"))
