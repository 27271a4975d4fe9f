"""The LinearNorm pass: timm's LeViT ``LinearNorm`` becomes ``FusedLinearNorm`` (linear_norm.py).

It is recognised by exact class, whose forward is known (``bn(linear(x).flatten(0, 1))``
reshaped back), so no trace is needed; it is replaced when its layers are exactly an nn.Linear
and an nn.BatchNorm1d over the Linear's outputs, and neither it nor they have hooks or are used
anywhere else. Anything else stays (the report says why).
"""

from __future__ import annotations

from torch import nn

from ..linear_norm import FusedLinearNorm, timm_linear_norm_type
from ..nn import has_hooks


def fuse_linear_norms(model: nn.Module, shared: set[int], backend: str) -> None:
    linear_norm = timm_linear_norm_type()
    if linear_norm is None:
        return
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is linear_norm and is_plain_linear_norm(child, shared):
                setattr(parent, name, FusedLinearNorm(child.linear, child.bn, backend))


def is_plain_linear_norm(module: nn.Module, shared: set[int]) -> bool:
    linear, bn = getattr(module, "linear", None), getattr(module, "bn", None)
    return (type(linear) is nn.Linear and type(bn) is nn.BatchNorm1d and bn.num_features == linear.out_features
            and set(module._modules) == {"linear", "bn"}
            and not any(has_hooks(m) or id(m) in shared for m in (module, linear, bn)))
