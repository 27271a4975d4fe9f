"""``convert(model)``: swap fused modules into an existing model, keeping its state_dict.

Two passes over the module tree:
1. torchvision ``BasicBlock``/``Bottleneck`` (exact classes, whose forward we know) become
   ``FusedBasicBlock``/``FusedBottleneck``: the residual add + ReLU ride in the last conv.
2. Anywhere else, a Conv2d → BatchNorm2d (→ ReLU) chain is fused only when tracing the parent's
   forward (torch.fx, one level deep) proves the data really flows that way: each module called
   once, the conv's output feeding only the BN and the BN's only the ReLU. A parent that cannot
   be traced is left as it is — a missed fusion, never a wrong answer.
"""

from __future__ import annotations

import copy
from collections import Counter

import torch
import torch.nn.functional as F
from torch import fx, nn

from . import backends
from .nn import FusedBasicBlock, FusedBottleneck, fuse_conv_bn

_RELU_FUNCTIONS = (torch.relu, torch.relu_, F.relu)


def _torchvision_blocks() -> dict[type, type]:
    try:
        from torchvision.models.resnet import BasicBlock, Bottleneck
    except ImportError:  # torchvision is optional for models that do not use it
        return {}
    return {BasicBlock: FusedBasicBlock, Bottleneck: FusedBottleneck}


def convert(model: nn.Module, backend: str = "auto", inplace: bool = False) -> nn.Module:
    """Return ``model`` with its Conv2d→BatchNorm2d(→ReLU) chains and ResNet blocks fused.

    ``backend`` is ``"auto"`` (per call: Triton on CUDA tensors, the C++ op on CPU tensors) or
    one of ``available_backends()``. The result's ``state_dict()`` has exactly the original's
    keys and values, and its output matches the original's in eval and train mode alike.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert expects an nn.Module, got {type(model).__name__}")
    backends.check_backend_name(backend)
    if backend != "auto" and backend not in backends.available_backends():
        raise ValueError(f"backend {backend!r} is not available here; available: {backends.available_backends()}")
    if not inplace:
        model = copy.deepcopy(model)
    blocks = _torchvision_blocks()
    if type(model) in blocks:
        return blocks[type(model)](model, backend)
    _replace_blocks(model, blocks, backend)
    for parent in list(model.modules()):
        _fuse_chains(parent, backend)
    return model


def _replace_blocks(parent: nn.Module, blocks: dict[type, type], backend: str) -> None:
    for name, child in parent.named_children():
        fused = blocks.get(type(child))
        if fused is not None:
            setattr(parent, name, fused(child, backend))
        else:
            _replace_blocks(child, blocks, backend)


class _ChildrenAsLeaves(fx.Tracer):
    """Traces one module's own forward, calls to its direct children kept as call_module."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return "." not in qualified_name


def _single_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _is_relu(node: fx.Node, parent: nn.Module) -> bool:
    if node.op == "call_module":
        return type(parent.get_submodule(node.target)) is nn.ReLU
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _fuse_chains(parent: nn.Module, backend: str) -> None:
    if not any(type(child) is nn.Conv2d for child in parent.children()):
        return
    try:
        graph = _ChildrenAsLeaves().trace(parent)
    except Exception:  # data-dependent control flow and the like: leave this parent unfused
        return
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")

    def called_once(node: fx.Node, kind: type) -> bool:
        return (
            node.op == "call_module"
            and calls[node.target] == 1
            and type(parent.get_submodule(node.target)) is kind
            and len(node.args) == 1
            and not node.kwargs
        )

    for node in graph.nodes:
        if not called_once(node, nn.Conv2d):
            continue
        bn_node = _single_user(node)
        if bn_node is None or not called_once(bn_node, nn.BatchNorm2d) or bn_node.args[0] is not node:
            continue
        conv, bn = parent.get_submodule(node.target), parent.get_submodule(bn_node.target)
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str) or bn.num_features != conv.out_channels:
            continue
        relu_node = _single_user(bn_node)
        relu = relu_node is not None and relu_node.args[:1] == (bn_node,) and _is_relu(relu_node, parent)
        fused_conv, folded_bn = fuse_conv_bn(conv, bn, relu, backend)
        setattr(parent, node.target, fused_conv)
        setattr(parent, bn_node.target, folded_bn)
        # A ReLU module used only here is now redundant; a functional or shared ReLU stays,
        # which is harmless because relu(relu(y)) == relu(y).
        if relu and relu_node.op == "call_module" and calls[relu_node.target] == 1:
            setattr(parent, relu_node.target, nn.Identity())
