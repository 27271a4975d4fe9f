"""A Linear layer and the BatchNorm1d after it as one fused unit: timm's LeViT ``LinearNorm``.

LeViT (timm ``levit_*``) normalises every attention and MLP projection with a BatchNorm1d over
the tokens: ``bn(linear(x).flatten(0, 1)).reshape_as(linear(x))`` on (B, N, C) tokens. That is a
1x1 convolution and a BatchNorm2d on (B·N, C, 1, 1): the statistics of BatchNorm1d over the B·N
rows are a BatchNorm2d's over (N, H, W) = (B·N, 1, 1), with the same count for the running
variance's correction. ``FusedLinearNorm`` runs it as the fused conv unit
(``functional.conv_batch_norm_act``) on that view, in every mode, with nn.BatchNorm1d's
semantics (momentum None, no running statistics, ``num_batches_tracked``), so its backward is
the conv unit's (training.py). Its children are the very ``linear`` and ``bn`` modules it
replaces, so ``state_dict()`` is unchanged; where the fused op does not compute what they would
(float64, autocast, not (B, N, C)) it calls them as LinearNorm did.
``backend="auto"`` times the fused backends against those unfused calls once per kind of call
(tuning.py), as the fused conv does.
"""

from __future__ import annotations

import copy

import torch
from torch import fx, nn

from . import backends, functional, tuning
from .ops.activation import IDENTITY


def timm_linear_norm_type() -> type | None:
    """timm's LeViT ``LinearNorm`` class when timm is imported (never imported here)."""
    import sys

    levit = sys.modules.get("timm.models.levit")
    return getattr(levit, "LinearNorm", None)


class FusedLinearNorm(nn.Module):
    """``bn(linear(x))`` over (B, N, C) tokens as one fused conv unit; ``linear`` (no bias or a
    bias) and ``bn`` (an ``nn.BatchNorm1d`` over its outputs) are kept as children."""

    def __init__(self, linear: nn.Linear, bn: nn.BatchNorm1d, backend: str = "auto"):
        super().__init__()
        if type(linear) is not nn.Linear or type(bn) is not nn.BatchNorm1d:
            raise TypeError(f"FusedLinearNorm fuses an nn.Linear and an nn.BatchNorm1d, got {type(linear).__name__} "
                            f"and {type(bn).__name__}")
        if bn.num_features != linear.out_features:
            raise ValueError(f"BatchNorm1d has {bn.num_features} features but the Linear has {linear.out_features} "
                             "outputs")
        backends.check_backend_name(backend)
        self.linear, self.bn, self.backend = linear, bn, backend

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"

    def _unfused(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        return self.bn(y.flatten(0, 1)).reshape_as(y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, fx.Proxy):
            # A leaf in a trace (the op dispatches on device and dtype, which a Proxy lacks).
            return x.tracer.create_proxy("call_module", x.tracer.path_of_module(self), (x,), {})
        backend = backends.resolve(self.backend, x.device)  # raises where a named backend cannot run
        if (backends.get(backend).is_reference or x.dim() != 3 or x.dtype == torch.float64
                or not x.is_floating_point() or x.dtype != self.linear.weight.dtype
                or torch.is_autocast_enabled(x.device.type)):
            # No fused float64 kernel; under autocast the unfused layers decide the dtypes.
            return self._unfused(x)
        if self.backend == "auto" and not torch.compiler.is_compiling() and tuning.enabled():
            backend = self._measured_backend(x, backend)
            if backends.get(backend).is_reference:  # the unfused layers measured faster here
                return self._unfused(x)
        return self._fused(x, backend)

    def _fused(self, x: torch.Tensor, backend: str) -> torch.Tensor:
        linear, bn = self.linear, self.bn
        tokens, features = x.shape[0] * x.shape[1], x.shape[2]
        out = functional.conv_batch_norm_act(
            x.reshape(tokens, features, 1, 1), linear.weight.reshape(linear.out_features, features, 1, 1),
            bn.running_mean, bn.running_var, training=bn.training, momentum=bn.momentum, eps=bn.eps,
            bias=linear.bias, bn_weight=bn.weight, bn_bias=bn.bias, num_batches_tracked=bn.num_batches_tracked,
            track_running_stats=bn.track_running_stats, act=IDENTITY, backend=backend)
        return out.view(x.shape[0], x.shape[1], linear.out_features)

    def _measured_backend(self, x: torch.Tensor, fallback: str) -> str:
        """``backend="auto"``: the fastest of the fused backends and the unfused layers for this
        kind of call, timed once on copies (tuning.py; the key of the 1x1 conv unit it runs)."""
        linear, bn = self.linear, self.bn
        recording = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, linear.weight, linear.bias, bn.weight, bn.bias))
        mode = ("train" if bn.training else "eval") + ("+grad" if recording else "")
        key = tuning.unit_key(x.reshape(-1, x.shape[2], 1, 1), linear.weight[:, :, None, None], None, (1, 1), (0, 0),
                              (1, 1), 1, IDENTITY.kind.name, mode)
        return tuning.choose(key, x.device, lambda name: self._trial(name, x, recording), fallback)

    def _trial(self, backend: str, x: torch.Tensor, recording: bool) -> None:
        """One call on ``backend`` that changes nothing the model holds (FusedConv2d._trial's
        rules: shallow copies with cloned buffers, shared parameters, forward not __call__)."""
        unit, bn = copy.copy(self), copy.copy(self.bn)
        object.__setattr__(bn, "_buffers", {name: None if b is None else b.clone() for name, b in self.bn._buffers.items()})
        object.__setattr__(unit, "_modules", {**self._modules, "bn": bn})
        x = x.detach().requires_grad_(x.requires_grad)
        run = (lambda: unit._unfused(x)) if backends.get(backend).is_reference else (lambda: unit._fused(x, backend))
        tuning.call_once(run, [x, unit.linear.weight, unit.linear.bias, bn.weight, bn.bias], recording)
