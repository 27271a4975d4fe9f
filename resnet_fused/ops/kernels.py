"""``Kernels``: the six pieces of the training unit that every backend supplies (its registry
record's ``kernels()``; semantics: ops/reference.py, composed by training.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Kernels:
    # (x, weight, bias, stride, padding, dilation, groups, allow_tf32) -> (y, mean, var)
    conv_stats: Callable
    apply: Callable  # reference.bn_act_apply
    backward_reduce: Callable  # reference.bn_act_backward_reduce
    backward_apply: Callable  # reference.bn_act_backward_apply
    update_running_stats: Callable  # reference.update_running_stats (in place)
    stats: Callable  # reference.bn_stats: (y) -> (mean, var), for a BatchNorm no conv feeds (norm_act.py)
