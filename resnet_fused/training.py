"""Conv2d → BatchNorm2d [→ + residual] → activation under autograd: the fused training unit.

One functional op, ``resnet_fused::conv_bn_act_train``, with a registered backward
(``register_autograd``) and fake kernel, so ``torch.compile(fullgraph=True)`` traces a whole
training step. It covers both BatchNorm modes that need gradients:

- batch statistics (``running_mean``/``running_var`` None: a BatchNorm in training, or one
  without running statistics): y = conv(x); per-channel mean and biased variance of y;
  out = act(z), z = γ·(y − mean)/√(var + ε) + β [+ residual], ``act`` an
  ``ops.activation.Activation`` passed as its ``(code, a, b)``.
- running statistics (frozen BatchNorm, e.g. ``model.eval()`` while fine-tuning): the same
  apply pass with the running mean and variance as constants.

It returns ``(out, y, mean, var)``; only ``out`` is differentiable. ``y`` (the conv output, in
its storage dtype), ``mean`` and ``var`` are what the backward needs, and ``mean``/``var`` are
what the caller folds into the running statistics with ``update_running_stats`` — a separate
in-place op, because an op with a registered backward must be functional.

Backward, with x̂ = (y − mean)·invstd and g = ∂L/∂z = act'(z)·∂L/∂out:
    identity:   g = ∂L/∂out
    ReLU:       g = ∂L/∂out where out > 0, else 0 (out > 0 ⟺ z > 0; a NaN passes, as in torch)
    Hardtanh(a, b):  g = ∂L/∂out where a < z < b, else 0
    LeakyReLU(s):    g = ∂L/∂out where z > 0, else s·∂L/∂out
    SiLU:       g = ∂L/∂out·σ(z)·(1 + z·(1 − σ(z))),  σ(z) = 1/(1 + e^−z)
    Hardswish:  g = 0 for z ≤ −3, ∂L/∂out·(z/3 + 1/2) for −3 < z < 3, ∂L/∂out for z ≥ 3
    GELU:       g = ∂L/∂out·(Φ(z) + z·φ(z)),  Φ, φ the standard normal CDF and density
    GELU (tanh): g = ∂L/∂out·(½(1 + t) + ½z·(1 − t²)·√(2/π)·(1 + 3·0.044715·z²)),
                t = tanh(√(2/π)·(z + 0.044715·z³))
  (each ATen's own backward of the function). ReLU reads its mask from the saved output; the
  kinds past it need z itself, which the backward kernels recompute from the saved conv output
  y as γ·x̂ + β, never stored. That z has no residual in it: with a residual, z = γ·x̂ + β + r
  would need r saved too (an activation-sized tensor the unfused modules would not keep for
  their backward either), so those kinds are accepted with a residual only where nothing is
  differentiated; while autograd records, a residual with them is a ValueError. Every ResNet
  block puts ReLU after its residual add, which is unaffected.
    dβ = Σ g,   dγ = Σ g·x̂                                   (one reduction pass)
    batch statistics:   dy = γ·invstd·(g − Σg/M − x̂·Σ(g·x̂)/M)
    running statistics: dy = γ·invstd·g
    d residual = g                                             (one elementwise pass)
then the convolution's input, weight and bias gradients from dy (ATen's
``convolution_backward``). x̂ is recomputed from y, never stored. Work whose gradient nobody
needs is skipped (the reduction pass, the residual gradient, the conv gradients).

Each backend supplies the same kernels (``ops.kernels.Kernels``, from its registry record):
C++ ops for ``cpu``/``cuda`` (ops/extension.py over csrc/*/bn_act.*), Triton ops for
``triton`` (ops/triton/conv_bn_stats.py, ops/triton/bn_act.py), and the plain-torch
specification in ops/reference.py for ``reference``.
"""

from __future__ import annotations

import torch

from . import backends
from .ops import aten, fakes
from .ops.activation import Activation, Kind
from .ops.kernels import Kernels
from .ops.shapes import acc_dtype, output_memory_format


def kernels(backend: str) -> Kernels:
    return backends.get(backend).kernels()


@torch.library.custom_op("resnet_fused::conv_bn_act_train", mutates_args=())
def conv_bn_act_train(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    bn_weight: torch.Tensor | None,
    bn_bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    act: int,
    act_a: float,
    act_b: float,
    backend: str,
    allow_tf32: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out, y, mean, var)``: batch statistics when ``running_mean``/``running_var`` are None,
    else those running statistics. Arguments are assumed validated (functional.py)."""
    k = kernels(backend)
    acc = acc_dtype(x.dtype)
    if running_mean is None:
        y, mean, var = k.conv_stats(x, weight, bias, stride, padding, dilation, groups, allow_tf32)
    else:
        y = aten.convolution(x, weight, bias, stride, padding, dilation, groups)
        # Copies: an op's outputs may not alias its inputs.
        mean, var = running_mean.to(acc, copy=True), running_var.to(acc, copy=True)
    out = k.apply(y, mean, var, bn_weight, bn_bias, eps, residual, act, act_a, act_b)
    return out, y, mean, var


conv_bn_act_train.register_fake(fakes.conv_bn_act_train)


def _setup_context(ctx, inputs, output):
    (x, weight, bias, bn_weight, bn_bias, running_mean, _, eps, residual, stride, padding, dilation, groups, act, act_a,
     act_b, backend, _) = inputs
    activation = Activation(act, act_a, act_b)
    check_differentiable(activation, residual is not None)
    out, y, mean, var = output
    ctx.mark_non_differentiable(y, mean, var)
    # No zero-filled activation-sized gradients for the non-differentiable outputs.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, weight, bn_weight, *saved_for_activation(activation, out, bn_bias), y, mean, var)
    ctx.conv = dict(stride=stride, padding=padding, dilation=dilation, groups=groups, has_bias=bias is not None)
    ctx.eps, ctx.act, ctx.backend = eps, activation, backend
    ctx.beta_dtype = bn_bias.dtype if bn_bias is not None else None
    ctx.batch_stats = running_mean is None
    ctx.has_residual = residual is not None
    ctx.count = y.shape[0] * y.shape[2] * y.shape[3]


def _backward(ctx, grad_out, _grad_y, _grad_mean, _grad_var):
    if grad_out is None:  # the output did not reach the loss
        return (None,) * 18
    refuse_double_backward()
    x, weight, bn_weight, out, bn_bias, y, mean, var = ctx.saved_tensors
    need = ctx.needs_input_grad
    grads = backward_unit(
        kernels(ctx.backend), grad_out, x, weight, bn_weight, bn_bias, out, y, mean, var, ctx.eps, ctx.act,
        ctx.batch_stats, ctx.count, ctx.conv, need_input=need[0], need_weight=need[1], need_bias=need[2],
        need_gamma=need[3], need_beta=need[4], need_residual=need[8] and ctx.has_residual,
    )
    dx, dw, db, dgamma, dbeta, dres = grads
    if dbeta is not None:
        dbeta = dbeta.to(ctx.beta_dtype)
    return dx, dw, db, dgamma, dbeta, None, None, None, dres, *(None,) * 9


def check_differentiable(act: Activation, has_residual: bool) -> None:
    """The one combination the backward cannot take: a residual under an activation whose
    derivative needs z (see the module docstring)."""
    if has_residual and act.needs_preactivation:
        raise ValueError(
            f"resnet_fused: {act} after a residual add is supported in inference only: its backward needs the "
            "pre-activation z = bn(conv(x)) + residual, and the residual is not saved for it. Use ReLU or no "
            "activation with a residual, or backend='reference'"
        )


def saved_for_activation(act: Activation, out: torch.Tensor, bn_bias: torch.Tensor | None):
    """``(out, β)`` as the backward needs them, None where it does not: out only for the ReLU
    mask (otherwise the caller may update it in place, ``out += residual``, as the unfused
    BatchNorm's output may be), β only to recompute z."""
    return (out if act.kind == Kind.RELU else None), (bn_bias if act.needs_preactivation else None)


def refuse_double_backward() -> None:
    """The backward kernels are not differentiable themselves: a second derivative through them
    would silently miss terms, so ``create_graph=True`` (grad mode on in the backward) fails."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            "resnet_fused: the fused conv+BatchNorm backward is not differentiable (double backward, "
            "create_graph=True, e.g. a gradient penalty); convert the model with backend='reference' for that"
        )


def backward_unit(k: Kernels, grad_out, x, weight, bn_weight, bn_bias, out, y, mean, var, eps, act: Activation,
                  batch_stats, count, conv, *, need_input, need_weight, need_bias, need_gamma, need_beta,
                  need_residual, all_reduce=None):
    """Gradients of one unit: ``(dx, dw, d_conv_bias, dγ, dβ, d_residual)``, None where not needed.

    ``out`` and ``bn_bias`` as ``saved_for_activation`` keeps them. ``all_reduce``, when given,
    sums the per-channel (Σg, Σg·x̂) over processes for dy (SyncBatchNorm); ``count`` is then
    the global number of values per channel."""
    need_conv = need_input or need_weight or need_bias
    dy, dgamma, dbeta, d_residual = backward_norm(
        k, grad_out, out, y, mean, var, bn_weight, bn_bias, eps, act, batch_stats, count, need_dy=need_conv,
        need_gamma=need_gamma, need_beta=need_beta, need_residual=need_residual, all_reduce=all_reduce)
    dx = dw = db = None
    if need_conv:
        dx, dw, db = aten.convolution_backward(
            dy, x, weight, conv["has_bias"], conv["stride"], conv["padding"], conv["dilation"], conv["groups"],
            [need_input, need_weight, need_bias],
        )
    return dx, dw, db, dgamma, dbeta, d_residual


def backward_norm(k: Kernels, grad_out, out, y, mean, var, bn_weight, bn_bias, eps, act: Activation, batch_stats,
                  count, *, need_dy, need_gamma, need_beta, need_residual, all_reduce=None):
    """The BatchNorm + activation part of a unit's backward: ``(dy, dγ, dβ, d_residual)`` for the
    normalized input y, None where not needed (``backward_unit``'s arguments)."""
    grad_out = grad_out.contiguous(memory_format=output_memory_format(y))
    if out is None:  # saved only for ReLU, the one kind whose kernels read it (for the mask)
        out = grad_out
    identity = act.kind == Kind.IDENTITY
    sum_g = sum_g_xhat = None
    if need_gamma or need_beta or (batch_stats and need_dy):
        sum_g, sum_g_xhat = k.backward_reduce(grad_out, out, y, mean, var, bn_weight, bn_bias, eps, *act.args)
    # dγ and dβ are this process's sums (data-parallel training adds them up across
    # processes); dy needs the sums over every value the statistics came from.
    total_g, total_g_xhat = sum_g, sum_g_xhat
    if all_reduce is not None and batch_stats and need_dy:
        total_g, total_g_xhat = all_reduce(sum_g, sum_g_xhat)
    dy = d_residual = None
    if need_dy or (need_residual and not identity):
        dy, d_residual = k.backward_apply(
            grad_out, out, y, mean, var, bn_weight, bn_bias, eps,
            total_g if total_g is not None else mean, total_g_xhat if total_g_xhat is not None else mean,
            count, batch_stats, *act.args, need_residual and not identity,
        )
    if need_residual and identity:
        d_residual = grad_out  # the add passes its gradient through unchanged
    dgamma = sum_g_xhat.to(bn_weight.dtype) if need_gamma else None
    dbeta = sum_g if need_beta else None
    return dy if need_dy else None, dgamma, dbeta, d_residual if need_residual else None


conv_bn_act_train.register_autograd(_backward, setup_context=_setup_context)
