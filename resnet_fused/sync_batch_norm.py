"""Conv2d → SyncBatchNorm [→ + residual] → activation across processes: the fused training unit with
statistics over the global batch, on GPU (nccl) and on CPU (gloo) alike.

``nn.SyncBatchNorm`` itself refuses CPU tensors; this unit runs wherever its backend's kernels
do. Per call, two collectives:

- forward, one ``all_gather`` of each process's (count, mean, M2) per channel, merged with
  Chan's formula: M2 = Σ M2_i + Σ n_i·(mean_i − mean)². It is one collective like an
  all-reduce of (Σy, Σy², count), without the cancellation of E[y²] − E[y]² (the choice
  nn.SyncBatchNorm makes too, for the same reason);
- backward, one ``all_reduce`` (sum) of (Σg, Σg·x̂) per channel for the input gradient.

γ and β get this process's own sums, as with nn.SyncBatchNorm: data-parallel training adds
them up across processes. The oracle (tests/convert/test_sync_batch_norm.py): outputs, summed
parameter gradients and running statistics equal those of a plain BatchNorm2d on the
concatenated global batch in one process.

This is an ``autograd.Function`` rather than a custom op: a custom op cannot take a process
group, so torch.compile breaks the graph here.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .ops.activation import Activation
from .training import backward_unit, kernels, refuse_double_backward, saved_for_activation


def global_stats(mean: torch.Tensor, var: torch.Tensor, count: int, group) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Merge every process's per-channel (count, mean, biased var): one all_gather."""
    k = mean.shape[0]
    if count == 0:  # an empty shard contributes nothing (its statistics are NaN)
        mean, var = torch.zeros_like(mean), torch.zeros_like(var)
    local = torch.cat([mean.new_full((1,), float(count)), mean, var * count])
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local, group=group)
    table = torch.stack(gathered)  # (world, 1 + 2K): count, mean, M2
    counts, means, m2 = table[:, :1], table[:, 1 : 1 + k], table[:, 1 + k :]
    total = counts.sum()
    global_mean = (counts * means).sum(0) / total
    global_m2 = m2.sum(0) + (counts * (means - global_mean) ** 2).sum(0)
    return global_mean, global_m2 / total, int(total.item())


class SyncConvBatchNormAct(torch.autograd.Function):
    """``act(bn(conv(x)) [+ residual])`` with batch statistics over every process in ``group``.

    Returns ``(out, mean, var, count)``: global statistics for the running-stat update."""

    @staticmethod
    def forward(ctx, x, weight, bias, bn_weight, bn_bias, residual, eps, stride, padding, dilation, groups,
                act: Activation, backend, allow_tf32, group):
        k = kernels(backend)
        y, mean, var = k.conv_stats(x, weight, bias, stride, padding, dilation, groups, allow_tf32)
        local_count = y.shape[0] * y.shape[2] * y.shape[3]
        mean, var, count = global_stats(mean, var, local_count, group)
        if count == 1:
            raise ValueError("Expected more than 1 value per channel when training, got a global batch of one value")
        out = k.apply(y, mean, var, bn_weight, bn_bias, eps, residual, *act.args)
        ctx.mark_non_differentiable(mean, var)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, weight, bn_weight, *saved_for_activation(act, out, bn_bias), y, mean, var)
        ctx.conv = dict(stride=stride, padding=padding, dilation=dilation, groups=groups, has_bias=bias is not None)
        ctx.eps, ctx.act, ctx.backend, ctx.group, ctx.count = eps, act, backend, group, count
        ctx.beta_dtype = bn_bias.dtype if bn_bias is not None else None
        ctx.has_residual = residual is not None
        return out, mean, var, count

    @staticmethod
    def backward(ctx, grad_out, _grad_mean, _grad_var, _grad_count):
        if grad_out is None:
            # Every process must still join the backward all_reduce: a zero gradient does.
            grad_out = torch.zeros_like(ctx.saved_tensors[5])  # y
        refuse_double_backward()
        x, weight, bn_weight, out, bn_bias, y, mean, var = ctx.saved_tensors
        need = ctx.needs_input_grad

        def all_reduce(sum_g, sum_g_xhat):
            both = torch.cat([sum_g, sum_g_xhat])
            dist.all_reduce(both, group=ctx.group)
            return both.chunk(2)

        dx, dw, db, dgamma, dbeta, dres = backward_unit(
            kernels(ctx.backend), grad_out, x, weight, bn_weight, bn_bias, out, y,
            mean, var, ctx.eps, ctx.act, True, ctx.count, ctx.conv, need_input=need[0], need_weight=need[1],
            need_bias=need[2], need_gamma=need[3], need_beta=need[4], need_residual=need[5] and ctx.has_residual,
            all_reduce=all_reduce,
        )
        if dbeta is not None:
            dbeta = dbeta.to(ctx.beta_dtype)
        return dx, dw, db, dgamma, dbeta, dres, None, None, None, None, None, None, None, None, None


def sync_group_size(group) -> int:
    """The number of processes a SyncBatchNorm with ``group`` averages over now (1: no sync)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group if group is not None else dist.group.WORLD)
