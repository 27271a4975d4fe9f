"""The unfused computation in plain torch ops: the test oracle, the benchmark baseline and the
fallback for anything a fused path does not cover.

Nothing here is clever on purpose: each function is the sequence of PyTorch calls that the
fused kernels must reproduce.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import aten
from .activation import Activation, Kind, resolve
from .kernels import Kernels
from .shapes import acc_dtype


def conv_bn_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    bn_weight: torch.Tensor | None,
    bn_bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    *,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    residual: torch.Tensor | None = None,
    relu: bool | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    act: Activation | nn.Module | None = None,
) -> torch.Tensor:
    """conv2d → batch_norm → [+ residual] → act, with F.batch_norm's train/eval semantics;
    ``act`` from ``relu=`` or ``act=`` as in functional.conv_bn_act (default ReLU)."""
    y = F.conv2d(x, weight, conv_bias, stride, padding, dilation, groups)
    y = F.batch_norm(y, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)
    return add_act(y, residual, resolve(act, relu, "reference.conv_bn_act"))


def inference(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps, residual, stride, padding,
              dilation, groups, act, act_a, act_b, allow_tf32):
    """The ``reference`` backend's inference op (the registry's signature); ``allow_tf32`` is
    PyTorch's own setting, which ``F.conv2d`` reads itself."""
    return conv_bn_act(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps=eps, residual=residual,
                       act=Activation(act, act_a, act_b), stride=stride, padding=padding, dilation=dilation,
                       groups=groups)


def conv_bn_act_modules(
    x: torch.Tensor,
    conv: nn.Conv2d,
    bn: nn.BatchNorm2d,
    residual: torch.Tensor | None = None,
    act: Activation = Activation(Kind.RELU),
    in_place: bool = False,
) -> torch.Tensor:
    """Exactly what ``act(bn(conv(x)) [+ residual])`` computes with these modules (``+=`` when
    ``in_place``: the sum keeps the BatchNorm output's dtype).

    The base classes' forward methods are called directly so that subclasses (the fused
    modules themselves) get stock nn.Conv2d / nn.BatchNorm2d / nn.SyncBatchNorm behaviour: padding modes, batch
    statistics in training, running-stat updates, momentum=None averaging, num_batches_tracked.
    """
    y = nn.Conv2d.forward(conv, x)
    if getattr(bn, "frozen", False):
        y = frozen_batch_norm(y, bn)
    else:
        y = (nn.SyncBatchNorm if isinstance(bn, nn.SyncBatchNorm) else nn.BatchNorm2d).forward(bn, y)
    if in_place and residual is not None:
        y += residual
        residual = None
    return add_act(y, residual, act)


def frozen_batch_norm(y: torch.Tensor, bn: nn.Module) -> torch.Tensor:
    """torchvision's FrozenBatchNorm2d.forward, operation for operation (its dtype promotion too)."""
    scale = bn.weight.reshape(1, -1, 1, 1) * (bn.running_var.reshape(1, -1, 1, 1) + bn.eps).rsqrt()
    return y * scale + (bn.bias.reshape(1, -1, 1, 1) - bn.running_mean.reshape(1, -1, 1, 1) * scale)


def add_act(y: torch.Tensor, residual: torch.Tensor | None, act: Activation) -> torch.Tensor:
    if residual is not None:
        y = y + residual
    return activate(y, act)


def activate(z: torch.Tensor, act: Activation) -> torch.Tensor:
    """The activation's module function from torch.nn.functional: the specification of
    ``act`` in csrc/epilogue.h and ops/triton/activation.py."""
    if act.kind == Kind.HARDTANH:
        return F.hardtanh(z, act.a, act.b)
    if act.kind == Kind.LEAKY_RELU:
        return F.leaky_relu(z, act.a)
    if act.kind in (Kind.GELU, Kind.GELU_TANH):
        return F.gelu(z, approximate="tanh" if act.kind == Kind.GELU_TANH else "none")
    return {Kind.IDENTITY: lambda v: v, Kind.RELU: torch.relu, Kind.SILU: F.silu, Kind.HARDSWISH: F.hardswish}[
        act.kind](z)


def activate_grad(grad_out: torch.Tensor, v: torch.Tensor, act: Activation) -> torch.Tensor:
    """∂L/∂z from ∂L/∂act(z), by ATen's own backward of each function: ``v`` is the output for
    ReLU (threshold_backward masks where out <= 0, so a NaN passes its gradient) and the
    pre-activation z for the kinds that need it (``Activation.needs_preactivation``)."""
    aten = torch.ops.aten
    if act.kind == Kind.IDENTITY:
        return grad_out
    if act.kind == Kind.RELU:
        return aten.threshold_backward(grad_out, v, 0)
    if act.kind == Kind.HARDTANH:
        return aten.hardtanh_backward(grad_out, v, act.a, act.b)
    if act.kind == Kind.LEAKY_RELU:
        return aten.leaky_relu_backward(grad_out, v, act.a, False)
    if act.kind == Kind.SILU:
        return aten.silu_backward(grad_out, v)
    if act.kind in (Kind.GELU, Kind.GELU_TANH):
        return aten.gelu_backward(grad_out, v, approximate="tanh" if act.kind == Kind.GELU_TANH else "none")
    return aten.hardswish_backward(grad_out, v)


# The pieces of a fused training unit, in plain torch: the specification each backend's
# kernels implement (C++ ops in csrc/*/bn_act.*, Triton ops in ops/triton/), and the 'reference'
# kernel set of the training op. Per-channel statistics are in the input's accumulation type
# (float32 for fp16/bf16/fp32, float64 for float64), reduced over (N, H, W).


def bn_stats(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and *biased* variance of ``y`` (N, K, H, W)."""
    var, mean = torch.var_mean(y.to(acc_dtype(y.dtype)), dim=(0, 2, 3), correction=0)
    return mean, var


def _normalize(y, mean, var, gamma, beta, eps: float) -> torch.Tensor:
    """``(y − mean)/√(var + eps)·γ + β`` in the accumulation type; γ/β None mean 1/0."""
    acc = acc_dtype(y.dtype)
    scale = 1.0 / torch.sqrt(var.to(acc) + eps)
    if gamma is not None:
        scale = scale * gamma.to(acc)
    shift = -mean.to(acc) * scale
    if beta is not None:
        shift = shift + beta.to(acc)
    return y.to(acc) * scale[:, None, None] + shift[:, None, None]


def bn_act_apply(y, mean, var, gamma, beta, eps: float, residual, act: int, act_a: float, act_b: float) -> torch.Tensor:
    """``act((y - mean) / sqrt(var + eps) * gamma + beta [+ residual])`` in ``y``'s dtype and
    memory format; ``gamma``/``beta`` None mean 1/0; ``(act, act_a, act_b)`` is ``Activation.args``."""
    z = _normalize(y, mean, var, gamma, beta, eps)
    if residual is not None:
        z = z + residual.to(z.dtype)
    return activate(z, Activation(act, act_a, act_b)).to(y.dtype)


def bn_act_backward_reduce(grad_out, out, y, mean, var, gamma, beta, eps: float, act: int, act_a: float,
                           act_b: float):
    """``(Σ g, Σ g·x̂)`` per channel, g = ∂L/∂z (``_act_grad``), x̂ = (y − mean)/√(var + ε):
    dβ and dγ."""
    acc = acc_dtype(y.dtype)
    g = _act_grad(grad_out, out, y, mean, var, gamma, beta, eps, Activation(act, act_a, act_b)).to(acc)
    xhat = (y.to(acc) - mean.to(acc)[:, None, None]) / torch.sqrt(var.to(acc) + eps)[:, None, None]
    return g.sum(dim=(0, 2, 3)), (g * xhat).sum(dim=(0, 2, 3))


def bn_act_backward_apply(grad_out, out, y, mean, var, gamma, beta, eps: float, sum_g, sum_g_xhat, count: int,
                          training: bool, act: int, act_a: float, act_b: float, residual_grad: bool):
    """``(dy, d_residual)``, both in ``y``'s dtype (d_residual None unless ``residual_grad``).

    g = ∂L/∂z (``_act_grad``); then in training (batch statistics, M = ``count`` values per channel):
        dy = γ·invstd·(g − Σg/M − x̂·Σ(g·x̂)/M)
    eval (running statistics are constants):
        dy = γ·invstd·g
    d_residual = g. ``sum_g``/``sum_g_xhat`` are ignored in eval.
    """
    acc = acc_dtype(y.dtype)
    g = _act_grad(grad_out, out, y, mean, var, gamma, beta, eps, Activation(act, act_a, act_b)).to(acc)
    invstd = 1.0 / torch.sqrt(var.to(acc) + eps)
    scale = invstd if gamma is None else invstd * gamma.to(acc)
    d_residual = g.to(y.dtype) if residual_grad else None
    if training:
        xhat = (y.to(acc) - mean.to(acc)[:, None, None]) * invstd[:, None, None]
        g = g - (sum_g.to(acc) / count)[:, None, None] - xhat * (sum_g_xhat.to(acc) / count)[:, None, None]
    dy = (g * scale[:, None, None]).to(y.dtype)
    return dy, d_residual


def update_running_stats(running_mean, running_var, mean, var, count: int, momentum: float) -> None:
    """In place, as nn.BatchNorm2d in training: a ``momentum`` step towards the batch mean and
    the *unbiased* batch variance (``var · M/(M−1)``, M = ``count``)."""
    with torch.no_grad():
        running_mean.lerp_(mean.to(running_mean.dtype), momentum)
        running_var.lerp_((var * (count / (count - 1))).to(running_var.dtype), momentum)


def _act_grad(grad_out, out, y, mean, var, gamma, beta, eps: float, act: Activation) -> torch.Tensor:
    """g = ∂L/∂z, z the pre-activation, in the accumulation type: from ``out`` for ReLU; for the
    kinds that need z, z recomputed from y (no residual: training.py refuses one for them)."""
    acc = acc_dtype(y.dtype)
    if act.needs_preactivation:
        return activate_grad(grad_out.to(acc), _normalize(y, mean, var, gamma, beta, eps), act)
    return activate_grad(grad_out.to(acc), out.to(acc), act)


def kernels():
    """The ``reference`` backend's training kernels: ATen's convolution, these pieces."""
    def conv_stats(x, weight, bias, stride, padding, dilation, groups, allow_tf32):
        y = aten.convolution(x, weight, bias, stride, padding, dilation, groups)
        return (y, *bn_stats(y))

    return Kernels(conv_stats, bn_act_apply, bn_act_backward_reduce, bn_act_backward_apply, update_running_stats,
                   bn_stats)
