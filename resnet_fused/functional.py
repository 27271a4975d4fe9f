"""Functional entry points of the fused ops: validate once, then dispatch to a backend.

``conv_bn_act`` is the inference op: ``act(conv(x, weight)·scale + shift [+ residual])`` with
BatchNorm's running statistics already folded into ``scale`` and ``shift`` (``fold_batch_norm``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import backends, reference
from .ops.conv_bn_act import conv_bn_act_triton

# The dtypes the fused kernels compute in; float64 models run the reference path.
FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _pair(value, name: str) -> list[int]:
    if isinstance(value, int):
        return [value, value]
    if isinstance(value, Sequence) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return list(value)
    raise ValueError(f"conv_bn_act: {name} must be an int or a pair of ints, got {value!r}")


def fold_batch_norm(
    conv_bias: torch.Tensor | None,
    bn_weight: torch.Tensor | None,
    bn_bias: torch.Tensor | None,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 per-channel (scale, shift) with ``bn(conv(x) + b) == conv(x)·scale + shift``.

    scale = γ/√(σ²+ε); shift = β − μ·scale + b·scale. Computed in fp32 whatever the model's
    dtype, so half-precision models do not round the statistics twice.
    """
    scale = torch.rsqrt(running_var.float() + eps)
    if bn_weight is not None:
        scale = scale * bn_weight.float()
    shift = -running_mean.float() * scale
    if bn_bias is not None:
        shift = shift + bn_bias.float()
    if conv_bias is not None:
        shift = shift + conv_bias.float() * scale
    return scale, shift


def check_conv_bn_act(x, weight, scale, shift, residual, stride, padding, dilation, groups) -> None:
    """Raise a ValueError/TypeError naming the problem; never let a bad call reach a kernel."""
    for name, t in (("input", x), ("weight", weight), ("shift", shift)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"conv_bn_act: {name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() != 4:
        raise ValueError(f"conv_bn_act: input must be 4-D (N, C, H, W), got {x.dim()}-D shape {tuple(x.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"conv_bn_act: weight must be 4-D (K, C/groups, R, S), got shape {tuple(weight.shape)}")
    if x.dtype not in FUSED_DTYPES:
        raise TypeError(f"conv_bn_act: input dtype {x.dtype} is not supported; use float32, float16 or bfloat16")
    if weight.dtype != x.dtype:
        raise TypeError(f"conv_bn_act: input dtype {x.dtype} does not match weight dtype {weight.dtype}")
    if not isinstance(groups, int) or groups < 1 or x.shape[1] % groups or weight.shape[0] % groups:
        raise ValueError(f"conv_bn_act: groups={groups!r} must be a positive int dividing input and output channels")
    if weight.shape[1] * groups != x.shape[1]:
        raise ValueError(
            f"conv_bn_act: expected input with {weight.shape[1] * groups} channels "
            f"(weight {tuple(weight.shape)}, groups={groups}), got {x.shape[1]} channels"
        )
    k = weight.shape[0]
    tensors = {"weight": weight, "shift": shift, "scale": scale, "residual": residual}
    for name, t in tensors.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"conv_bn_act: {name} is on {t.device} but input is on {x.device}")
    for name, t in (("scale", scale), ("shift", shift)):
        if t is not None and (t.dim() != 1 or t.shape[0] != k or not t.is_floating_point()):
            raise ValueError(f"conv_bn_act: {name} must be a 1-D float tensor of {k} channels, got {t.dtype} {tuple(t.shape)}")
    if any(s < 1 for s in stride) or any(p < 0 for p in padding) or any(d < 1 for d in dilation):
        raise ValueError(f"conv_bn_act: invalid stride={stride}, padding={padding}, dilation={dilation}")
    out_hw = [
        (size + 2 * p - d * (kernel - 1) - 1) // s + 1
        for size, kernel, s, p, d in zip(x.shape[2:], weight.shape[2:], stride, padding, dilation)
    ]
    if min(out_hw) < 1:
        raise ValueError(f"conv_bn_act: input {tuple(x.shape)} is too small for kernel {tuple(weight.shape[2:])}")
    if residual is not None:
        expected = (x.shape[0], k, *out_hw)
        if tuple(residual.shape) != expected:
            raise ValueError(f"conv_bn_act: residual shape {tuple(residual.shape)} != output shape {expected}")
        if residual.dtype != x.dtype:
            raise TypeError(f"conv_bn_act: residual dtype {residual.dtype} does not match input dtype {x.dtype}")


def conv_bn_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor | None,
    shift: torch.Tensor,
    residual: torch.Tensor | None = None,
    *,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    relu: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """Inference: ``act(conv2d(x, weight)·scale + shift [+ residual])`` in one fused launch.

    ``scale=None`` means ``weight`` already carries the BatchNorm scale. fp32 inputs use TF32
    exactly when ``torch.backends.cudnn.allow_tf32`` is set, as PyTorch's own convolution does.
    No autograd: callers that need gradients use ``reference`` (the fused modules do so).
    """
    stride, padding, dilation = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    check_conv_bn_act(x, weight, scale, shift, residual, stride, padding, dilation, groups)
    chosen = backends.resolve(backend, x.device)
    if chosen == "triton" and groups == 1:
        allow_tf32 = torch.backends.cudnn.allow_tf32
        return conv_bn_act_triton(x, weight, scale, shift, residual, stride, padding, dilation, relu, allow_tf32)
    if chosen in ("cpu", "cuda"):
        return torch.ops.resnet_fused.conv_bn_act(x, weight, scale, shift, residual, stride, padding, dilation, groups, relu)
    # Grouped convolutions are not tiled by the Triton kernel: the plain-torch path is exact.
    return reference.conv_affine_act(
        x, weight, scale, shift, residual, stride=stride, padding=padding, dilation=dilation, groups=groups, relu=relu
    )
