"""Fake (meta) kernels: the output shapes, dtypes and layouts of every op, for torch.compile and
``opcheck``. Written once; each is registered under every op name that shares its signature
(the C++ op and its Triton twin), by ``register`` from _extension.py and ops/triton/."""

from __future__ import annotations

import torch

from .shapes import acc_dtype, empty_like_activation, empty_output


def _per_channel(y: torch.Tensor) -> torch.Tensor:
    # (K,) in the accumulation type.
    return y.new_empty((y.shape[1],), dtype=acc_dtype(y.dtype))


def conv_bn_act(input, weight, bias, bn_weight, bn_bias, mean, var, eps, residual, stride, padding, dilation, groups,
                act, act_a, act_b, allow_tf32=None):
    return empty_output(input, weight, stride, padding, dilation)


def bn_stats(y):
    return _per_channel(y), _per_channel(y)


def bn_act_apply(y, mean, var, gamma, beta, eps, residual, act, act_a, act_b):
    return empty_like_activation(y)


def bn_act_backward_reduce(grad_out, out, y, mean, var, gamma, beta, eps, act, act_a, act_b):
    return _per_channel(y), _per_channel(y)


def bn_act_backward_apply(grad_out, out, y, mean, var, gamma, beta, eps, sum_g, sum_g_xhat, count, training, act,
                          act_a, act_b, residual_grad):
    d_residual = empty_like_activation(y) if residual_grad else y.new_empty((0,))
    return empty_like_activation(y), d_residual


def bn_update_running_stats_(running_mean, running_var, mean, var, count, momentum):
    return None


def register(op_names: dict[str, str]) -> None:
    """Register the fake of each op name here (a key: this module's function) under the given
    op name (``"resnet_fused::bn_stats"``, ``"resnet_fused::bn_act_apply_triton"``, ...)."""
    for fake_name, op_name in op_names.items():
        torch.library.register_fake(op_name)(globals()[fake_name])


def conv_bn_stats(x, weight, bias, stride, padding, dilation, groups, allow_tf32):
    y = empty_output(x, weight, stride, padding, dilation)
    return y, _per_channel(y), _per_channel(y)


def conv_bn_act_train(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps, residual, stride, padding,
                      dilation, groups, act, act_a, act_b, backend, allow_tf32):
    out = empty_output(x, weight, stride, padding, dilation)
    return out, torch.empty_like(out), _per_channel(out), _per_channel(out)


def bn_act_train(y, bn_weight, bn_bias, running_mean, running_var, eps, act, act_a, act_b, backend):
    return empty_like_activation(y), _per_channel(y), _per_channel(y)
