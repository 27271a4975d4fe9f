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
    relu: bool = True,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
) -> torch.Tensor:
    """conv2d → batch_norm → [+ residual] → [relu], with F.batch_norm's train/eval semantics."""
    y = F.conv2d(x, weight, conv_bias, stride, padding, dilation, groups)
    y = F.batch_norm(y, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)
    return add_act(y, residual, relu)


def inference(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps, residual, stride, padding,
              dilation, groups, relu, allow_tf32):
    """The ``reference`` backend's inference op (the registry's signature); ``allow_tf32`` is
    PyTorch's own setting, which ``F.conv2d`` reads itself."""
    return conv_bn_act(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps=eps, residual=residual,
                       relu=relu, stride=stride, padding=padding, dilation=dilation, groups=groups)


def conv_bn_act_modules(
    x: torch.Tensor,
    conv: nn.Conv2d,
    bn: nn.BatchNorm2d,
    residual: torch.Tensor | None = None,
    relu: bool = True,
    in_place: bool = False,
) -> torch.Tensor:
    """Exactly what ``relu(bn(conv(x)) [+ residual])`` computes with these modules (``+=`` when
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
    return add_act(y, residual, relu)


def frozen_batch_norm(y: torch.Tensor, bn: nn.Module) -> torch.Tensor:
    """torchvision's FrozenBatchNorm2d.forward, operation for operation (its dtype promotion too)."""
    scale = bn.weight.reshape(1, -1, 1, 1) * (bn.running_var.reshape(1, -1, 1, 1) + bn.eps).rsqrt()
    return y * scale + (bn.bias.reshape(1, -1, 1, 1) - bn.running_mean.reshape(1, -1, 1, 1) * scale)


def add_act(y: torch.Tensor, residual: torch.Tensor | None, relu: bool) -> torch.Tensor:
    if residual is not None:
        y = y + residual
    return torch.relu(y) if relu else y


# The pieces of a fused training unit, in plain torch: the specification each backend's
# kernels implement (C++ ops in csrc/*/bn_act.*, Triton ops in ops/triton/), and the 'reference'
# kernel set of the training op. Per-channel statistics are in the input's accumulation type
# (float32 for fp16/bf16/fp32, float64 for float64), reduced over (N, H, W).


def bn_stats(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and *biased* variance of ``y`` (N, K, H, W)."""
    var, mean = torch.var_mean(y.to(acc_dtype(y.dtype)), dim=(0, 2, 3), correction=0)
    return mean, var


def bn_act_apply(y, mean, var, gamma, beta, eps: float, residual, relu: bool) -> torch.Tensor:
    """``act((y - mean) / sqrt(var + eps) * gamma + beta [+ residual])`` in ``y``'s dtype and
    memory format; ``gamma``/``beta`` None mean 1/0."""
    acc = acc_dtype(y.dtype)
    scale = 1.0 / torch.sqrt(var.to(acc) + eps)
    if gamma is not None:
        scale = scale * gamma.to(acc)
    shift = -mean.to(acc) * scale
    if beta is not None:
        shift = shift + beta.to(acc)
    z = y.to(acc) * scale[:, None, None] + shift[:, None, None]
    if residual is not None:
        z = z + residual.to(acc)
    if relu:
        z = torch.relu(z)
    return z.to(y.dtype)


def bn_act_backward_reduce(grad_out, out, y, mean, var, eps: float, relu: bool):
    """``(Σ g, Σ g·x̂)`` per channel, g = grad_out zeroed where ``out <= 0`` when ``relu``,
    x̂ = (y − mean)/√(var + ε): dβ and dγ."""
    acc = acc_dtype(y.dtype)
    g = _masked_grad(grad_out, out, relu).to(acc)
    xhat = (y.to(acc) - mean.to(acc)[:, None, None]) / torch.sqrt(var.to(acc) + eps)[:, None, None]
    return g.sum(dim=(0, 2, 3)), (g * xhat).sum(dim=(0, 2, 3))


def bn_act_backward_apply(grad_out, out, y, mean, var, gamma, eps: float, sum_g, sum_g_xhat, count: int,
                          training: bool, relu: bool, residual_grad: bool):
    """``(dy, d_residual)``, both in ``y``'s dtype (d_residual None unless ``residual_grad``).

    training (batch statistics, M = ``count`` values per channel):
        dy = γ·invstd·(g − Σg/M − x̂·Σ(g·x̂)/M)
    eval (running statistics are constants):
        dy = γ·invstd·g
    d_residual = g. ``sum_g``/``sum_g_xhat`` are ignored in eval.
    """
    acc = acc_dtype(y.dtype)
    g = _masked_grad(grad_out, out, relu).to(acc)
    invstd = 1.0 / torch.sqrt(var.to(acc) + eps)
    scale = invstd if gamma is None else invstd * gamma.to(acc)
    if training:
        xhat = (y.to(acc) - mean.to(acc)[:, None, None]) * invstd[:, None, None]
        g = g - (sum_g.to(acc) / count)[:, None, None] - xhat * (sum_g_xhat.to(acc) / count)[:, None, None]
    dy = (g * scale[:, None, None]).to(y.dtype)
    d_residual = _masked_grad(grad_out, out, relu).to(y.dtype) if residual_grad else None
    return dy, d_residual


def update_running_stats(running_mean, running_var, mean, var, count: int, momentum: float) -> None:
    """In place, as nn.BatchNorm2d in training: a ``momentum`` step towards the batch mean and
    the *unbiased* batch variance (``var · M/(M−1)``, M = ``count``)."""
    with torch.no_grad():
        running_mean.lerp_(mean.to(running_mean.dtype), momentum)
        running_var.lerp_((var * (count / (count - 1))).to(running_var.dtype), momentum)


def _masked_grad(grad_out, out, relu: bool):
    # Zero where out <= 0, as threshold_backward: a NaN output passes its gradient through.
    return torch.where(out <= 0, torch.zeros_like(grad_out), grad_out) if relu else grad_out


def kernels():
    """The ``reference`` backend's training kernels: ATen's convolution, these pieces."""
    def conv_stats(x, weight, bias, stride, padding, dilation, groups, allow_tf32):
        y = aten.convolution(x, weight, bias, stride, padding, dilation, groups)
        return (y, *bn_stats(y))

    return Kernels(conv_stats, bn_act_apply, bn_act_backward_reduce, bn_act_backward_apply, update_running_stats)
