"""Functional entry points of the fused ops: validate once, resolve the backend once, then run
the backend's registered implementation (backends.REGISTRY).

``conv_bn_act`` is the inference op: ``act(batch_norm_eval(conv2d(x, weight) + bias)
[+ residual])``, the BatchNorm applied from its running statistics inside the kernel.
``conv_batch_norm_act`` is the same unit with ``F.batch_norm``'s semantics in every mode and
under autograd: batch statistics and running-statistics updates in training, gradients for
every input; it takes the inference op when nothing needs either.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from torch import nn

from . import backends
from .ops.activation import Activation, resolve
from .ops.shapes import output_size
from .sync_batch_norm import SyncConvBatchNormAct, sync_group_size
from .training import check_differentiable, conv_bn_act_train, kernels

# The dtypes the fused kernels compute in; float64 models run the reference path.
FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _pair(value, name: str) -> list[int]:
    if isinstance(value, int):
        return [value, value]
    if isinstance(value, Sequence) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return list(value)
    raise ValueError(f"conv_bn_act: {name} must be an int or a pair of ints, got {value!r}")


def check_conv_bn_act(x, weight, per_channel: dict, eps, residual, stride, padding, dilation, groups) -> None:
    """Raise a ValueError/TypeError naming the problem; never let a bad call reach a kernel.

    ``per_channel`` maps names to the (K,) tensors (None where absent)."""
    for name, t in (("input", x), ("weight", weight)):
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
    if groups > 1 and weight.shape[0] < groups:  # as torch: no zero-width groups (K = 0 divides)
        raise ValueError(f"conv_bn_act: groups={groups} needs at least {groups} output channels, "
                         f"got weight {tuple(weight.shape)}")
    if weight.shape[1] * groups != x.shape[1]:
        raise ValueError(
            f"conv_bn_act: expected input with {weight.shape[1] * groups} channels "
            f"(weight {tuple(weight.shape)}, groups={groups}), got {x.shape[1]} channels"
        )
    k = weight.shape[0]
    for name, t in {"weight": weight, **per_channel, "residual": residual}.items():
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"conv_bn_act: {name} must be a torch.Tensor or None, got {type(t).__name__}")
        if t is not None and t.device != x.device:
            raise ValueError(f"conv_bn_act: {name} is on {t.device} but input is on {x.device}")
    for name, t in per_channel.items():
        if t is not None and (t.dim() != 1 or t.shape[0] != k or not t.is_floating_point()):
            raise ValueError(f"conv_bn_act: {name} must be a 1-D float tensor of {k} channels, got {t.dtype} {tuple(t.shape)}")
    # A symbolic eps (torch.compile(dynamic=True)) is checked by the kernels at run time.
    if not isinstance(eps, (int, float, torch.SymFloat)):
        raise ValueError(f"conv_bn_act: eps must be a non-negative number, got {eps!r}")
    # Comparisons rather than math.isfinite, which torch.compile cannot trace on a symbolic eps.
    if isinstance(eps, (int, float)) and (eps != eps or eps < 0 or eps == math.inf):
        raise ValueError(f"conv_bn_act: eps must be a non-negative number, got {eps!r}")
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
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    bn_weight: torch.Tensor | None = None,
    bn_bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    residual: torch.Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    relu: bool | None = None,
    backend: str = "auto",
    act: Activation | nn.Module | None = None,
) -> torch.Tensor:
    """Inference: ``act(batch_norm(conv2d(x, weight) + bias) [+ residual])`` in one fused op,
    BatchNorm in eval mode (running statistics). The activation: ``act=`` (an
    ``ops.activation.Activation`` or a stock module such as ``nn.SiLU()``), or ``relu=`` (True:
    ReLU, False: none); neither: ReLU; both: a ValueError.

    fp32 inputs use TF32 exactly when PyTorch's own convolution would (cuDNN's TF32 setting).
    No autograd: callers that need gradients use ``reference`` (the fused modules do so).
    """
    stride, padding, dilation = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    per_channel = {"bias": bias, "bn_weight": bn_weight, "bn_bias": bn_bias,
                   "running_mean": running_mean, "running_var": running_var}
    if running_mean is None or running_var is None:
        raise ValueError("conv_bn_act: running_mean and running_var are required (eval-mode BatchNorm)")
    activation = resolve(act, relu, "conv_bn_act")
    check_conv_bn_act(x, weight, per_channel, eps, residual, stride, padding, dilation, groups)
    chosen = backends.resolve(backend, x.device)
    return backends.get(chosen).inference(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps,
                                          residual, stride, padding, dilation, groups, *activation.args,
                                          conv_allows_tf32())


def conv_allows_tf32() -> bool:
    """Whether PyTorch's own fp32 convolutions may use TF32 right now.

    Reading the legacy ``cudnn.allow_tf32`` raises once a user has set the newer
    ``cudnn.conv.fp32_precision``, so that one is consulted then.
    """
    try:
        return bool(torch.backends.cudnn.allow_tf32)
    except RuntimeError:
        return torch.backends.cudnn.conv.fp32_precision == "tf32"


def conv_batch_norm_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    *,
    training: bool,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    bias: torch.Tensor | None = None,
    bn_weight: torch.Tensor | None = None,
    bn_bias: torch.Tensor | None = None,
    num_batches_tracked: torch.Tensor | None = None,
    track_running_stats: bool = True,
    residual: torch.Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    relu: bool | None = None,
    backend: str = "auto",
    synchronize: bool = False,
    process_group=None,
    act: Activation | nn.Module | None = None,
) -> torch.Tensor:
    """``act(bn(conv2d(x, weight) + bias) [+ residual])`` exactly as an ``nn.Conv2d`` followed
    by an ``nn.BatchNorm2d`` in the given mode and the activation would compute it,
    differentiable. ``act``/``relu`` as in ``conv_bn_act``; under autograd an activation other
    than ReLU and the identity cannot follow a residual (training.py says why).

    ``synchronize``: as ``nn.SyncBatchNorm`` with ``process_group`` (None: every process):
    in training, under an initialized ``torch.distributed`` with more than one process, the
    statistics are those of the global batch (sync_batch_norm.py); on CPU too.

    As ``nn.BatchNorm2d.forward``: in training with ``track_running_stats``,
    ``num_batches_tracked`` (when given) is incremented and the running statistics take a
    ``momentum`` step (``momentum=None``: the cumulative average) towards the batch mean and
    unbiased variance; batch statistics are used in training and whenever the running ones are
    None. The running buffers are updated in place, outside autograd.
    """
    stride, padding, dilation = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    per_channel = {"bias": bias, "bn_weight": bn_weight, "bn_bias": bn_bias,
                   "running_mean": running_mean, "running_var": running_var}
    if (running_mean is None) != (running_var is None):
        raise ValueError("conv_batch_norm_act: give both running_mean and running_var, or neither")
    activation = resolve(act, relu, "conv_batch_norm_act")
    check_conv_bn_act(x, weight, per_channel, eps, residual, stride, padding, dilation, groups)
    return run_unit(
        x, weight, running_mean, running_var, training, momentum, eps, bias, bn_weight, bn_bias, num_batches_tracked,
        track_running_stats, residual, stride, padding, dilation, groups, activation,
        backends.resolve(backend, x.device), synchronize, process_group,
    )


def run_unit(x, weight, running_mean, running_var, training, momentum, eps, bias, bn_weight, bn_bias,
             num_batches_tracked, track_running_stats, residual, stride, padding, dilation, groups, act: Activation,
             chosen, synchronize, process_group) -> torch.Tensor:
    """``conv_batch_norm_act``'s body, for callers that validated the arguments
    (``check_conv_bn_act``; stride, padding and dilation as lists of two ints) and resolved
    the backend (``chosen``) themselves: the fused modules, once per call."""
    tensors = (x, weight, bias, bn_weight, bn_bias, residual)
    recording = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    if recording:
        check_differentiable(act, residual is not None)  # before num_batches_tracked moves
    # Which statistics, and whether to update the running ones: nn.BatchNorm2d's rules.
    factor = 0.0 if momentum is None else momentum
    if training and track_running_stats and num_batches_tracked is not None:
        num_batches_tracked.add_(1)
        factor = 1.0 / float(num_batches_tracked) if momentum is None else momentum
    batch_stats = training or running_mean is None
    if batch_stats and isinstance(eps, (int, float)) and eps <= 0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")  # torch's words
    update = training and track_running_stats and running_mean is not None

    if not batch_stats and not recording:
        return backends.get(chosen).inference(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps,
                                              residual, stride, padding, dilation, groups, *act.args,
                                              conv_allows_tf32())

    out_shape = (x.shape[0], weight.shape[0], *(
        output_size(*dims) for dims in zip(x.shape[2:], weight.shape[2:], stride, padding, dilation)))
    count = out_shape[0] * out_shape[2] * out_shape[3]
    if synchronize and training and sync_group_size(process_group) > 1:
        group = process_group if process_group is not None else torch.distributed.group.WORLD
        out, mean, var, count = SyncConvBatchNormAct.apply(
            x, weight, bias, bn_weight, bn_bias, residual, float(eps), stride, padding, dilation, groups, act,
            chosen, conv_allows_tf32(), group,
        )
    elif batch_stats and count == 1:
        # F.batch_norm's own check and message (it sees the conv output's size).
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {torch.Size(out_shape)}")
    else:
        out, _, mean, var = conv_bn_act_train(
            x, weight, bias, bn_weight, bn_bias, None if batch_stats else running_mean,
            None if batch_stats else running_var, float(eps), residual, stride, padding, dilation, groups, *act.args,
            chosen, conv_allows_tf32(),
        )
    if update and count > 0:  # an empty batch leaves the running statistics alone, as in torch
        kernels(chosen).update_running_stats(running_mean, running_var, mean, var, count, float(factor))
    return out

