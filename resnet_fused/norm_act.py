"""A BatchNorm2d and the activation after it, with no conv before them, as one fused unit.

Pre-activation networks (DenseNet, DPN, ResNetV2, Xception-p: BatchNorm → activation → conv,
often on a concat) and timm's ``BatchNormAct2d`` after an add or a concat have no conv for the
BatchNorm to fold into. ``FusedBatchNormAct2d`` takes the BatchNorm's slot and applies
``act(bn(x))`` in one pass instead of two (the activation's read and write of the whole tensor
go), with nn.BatchNorm2d's semantics in every mode: running statistics, momentum (None: the
cumulative average), ``num_batches_tracked``, ``track_running_stats=False``.

One op, ``resnet_fused::bn_act_train`` -> ``(out, mean, var)``, with a registered backward and
fake kernel: batch statistics of y (``running_mean``/``running_var`` None) or the running ones,
then out = act(γ·(y − mean)/√(var + ε) + β). The backward is the conv unit's without the conv
(``training.backward_norm``), with g = ∂L/∂z = act'(z)·∂L/∂out:
    dβ = Σ g,   dγ = Σ g·x̂
    batch statistics:   dy = γ·invstd·(g − Σg/M − x̂·Σ(g·x̂)/M)
    running statistics: dy = γ·invstd·g
The pieces are each backend's training kernels (``ops.kernels.Kernels``: ``stats``, ``apply``,
``backward_reduce``, ``backward_apply``, ``update_running_stats``); the inference call is the
apply pass with the running statistics.
"""

from __future__ import annotations

import copy

import torch
from torch import fx, nn

from . import backends, tuning
from .nn import share_state
from .ops import fakes, reference
from .ops.activation import Activation, Kind, resolve
from .ops.shapes import acc_dtype, output_memory_format
from .training import backward_norm, kernels, refuse_double_backward, saved_for_activation


@torch.library.custom_op("resnet_fused::bn_act_train", mutates_args=())
def bn_act_train(
    y: torch.Tensor,
    bn_weight: torch.Tensor | None,
    bn_bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    eps: float,
    act: int,
    act_a: float,
    act_b: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out, mean, var)`` of a dense (N, C, H, W) ``y``: batch statistics when
    ``running_mean``/``running_var`` are None, else those (copied into the accumulation type)."""
    k = kernels(backend)
    if running_mean is None:
        mean, var = k.stats(y)
    else:
        acc = acc_dtype(y.dtype)
        mean, var = running_mean.to(acc, copy=True), running_var.to(acc, copy=True)
    return k.apply(y, mean, var, bn_weight, bn_bias, eps, None, act, act_a, act_b), mean, var


bn_act_train.register_fake(fakes.bn_act_train)


def _setup_context(ctx, inputs, output):
    y, bn_weight, bn_bias, running_mean, _, eps, act, act_a, act_b, backend = inputs
    out, mean, var = output
    activation = Activation(act, act_a, act_b)
    ctx.mark_non_differentiable(mean, var)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(y, bn_weight, *saved_for_activation(activation, out, bn_bias), mean, var)
    ctx.eps, ctx.act, ctx.backend = eps, activation, backend
    ctx.beta_dtype = bn_bias.dtype if bn_bias is not None else None
    ctx.batch_stats = running_mean is None
    ctx.count = y.shape[0] * y.shape[2] * y.shape[3]


def _backward(ctx, grad_out, _grad_mean, _grad_var):
    if grad_out is None:
        return (None,) * 10
    refuse_double_backward()
    y, bn_weight, out, bn_bias, mean, var = ctx.saved_tensors
    need = ctx.needs_input_grad
    dy, dgamma, dbeta, _ = backward_norm(
        kernels(ctx.backend), grad_out, out, y, mean, var, bn_weight, bn_bias, ctx.eps, ctx.act, ctx.batch_stats,
        ctx.count, need_dy=need[0], need_gamma=need[1], need_beta=need[2], need_residual=False)
    if dbeta is not None:
        dbeta = dbeta.to(ctx.beta_dtype)
    return dy, dgamma, dbeta, *(None,) * 7


bn_act_train.register_autograd(_backward, setup_context=_setup_context)


class FusedBatchNormAct2d(nn.BatchNorm2d):
    """``act(batch_norm(x))`` in one pass, standing in for an ``nn.BatchNorm2d`` (or timm's
    ``BatchNormAct2d`` whose drop is the identity) and the activation after it. It holds the very
    parameter and buffer tensors of the module it replaces, so ``state_dict()`` is unchanged.
    The activation: ``act=`` an ``ops.activation.Activation`` or a stock activation module."""

    def __init__(self, bn: nn.BatchNorm2d, act: Activation | nn.Module, backend: str = "auto"):
        if not isinstance(bn, nn.BatchNorm2d) or isinstance(bn, nn.SyncBatchNorm):
            raise TypeError(f"FusedBatchNormAct2d replaces a BatchNorm2d, got {type(bn).__name__}")
        backends.check_backend_name(backend)
        super().__init__(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, device="meta")
        share_state(self, bn)
        self.act = resolve(act, None, "FusedBatchNormAct2d")
        self.backend = backend

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, act={self.act}, backend={self.backend!r}"

    def _unfused(self, x: torch.Tensor) -> torch.Tensor:
        return reference.activate(nn.BatchNorm2d.forward(self, x), self.act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, fx.Proxy):
            # A leaf in a trace (the op dispatches on device and dtype, which a Proxy lacks).
            return x.tracer.create_proxy("call_module", x.tracer.path_of_module(self), (x,), {})
        backend = backends.resolve(self.backend, x.device)  # raises where a named backend cannot run
        if (backends.get(backend).is_reference or x.dim() != 4 or x.dtype == torch.float64
                or not x.is_floating_point() or torch.is_autocast_enabled(x.device.type)):
            # float64 has no fused kernel; under autocast the unfused BatchNorm decides the dtype.
            return self._unfused(x)
        if self.backend == "auto" and not torch.compiler.is_compiling() and tuning.enabled():
            backend = self._measured_backend(x, backend)
            if backends.get(backend).is_reference:
                return self._unfused(x)
        return self._fused(x, backend)

    def _fused(self, x: torch.Tensor, backend: str) -> torch.Tensor:
        # nn.BatchNorm2d.forward's rules for which statistics, and whether they move.
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        batch_stats = self.training or self.running_mean is None
        count = x.shape[0] * x.shape[2] * x.shape[3]
        if batch_stats and count == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.shape}")
        y = x.contiguous(memory_format=output_memory_format(x))
        out, mean, var = bn_act_train(
            y, self.weight, self.bias, None if batch_stats else self.running_mean,
            None if batch_stats else self.running_var, float(self.eps), *self.act.args, backend)
        if self.training and self.track_running_stats and self.running_mean is not None and count > 0:
            kernels(backend).update_running_stats(self.running_mean, self.running_var, mean, var, count, float(factor))
        return out

    def _measured_backend(self, x: torch.Tensor, fallback: str) -> str:
        """``backend="auto"``: the fastest of the fused backends and the unfused ops for this
        kind of call, timed once on copies (tuning.py)."""
        recording = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, self.weight, self.bias))
        mode = ("train" if self.training else "eval") + ("+grad" if recording else "")
        key = tuning.norm_key(x, self.act.kind.name, mode)
        return tuning.choose(key, x.device, lambda name: self._trial(name, x, recording), fallback)

    def _trial(self, backend: str, x: torch.Tensor, recording: bool) -> None:
        """One call on ``backend`` that changes nothing the model holds (FusedConv2d._trial's
        rules: a shallow copy with cloned buffers, shared parameters, forward not __call__)."""
        unit = copy.copy(self)
        object.__setattr__(unit, "_buffers", {name: None if b is None else b.clone()
                                              for name, b in self._buffers.items()})
        x = x.detach().requires_grad_(x.requires_grad)
        run = (lambda: unit._unfused(x)) if backends.get(backend).is_reference else (lambda: unit._fused(x, backend))
        tuning.call_once(run, [x, unit.weight, unit.bias], recording)

