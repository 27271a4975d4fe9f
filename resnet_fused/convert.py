"""``convert(model)``: swap fused modules into an existing model, keeping its state_dict.

Two passes over the module tree:
1. torchvision ``BasicBlock``/``Bottleneck`` (exact classes, whose forward we know) become
   ``FusedBasicBlock``/``FusedBottleneck``: the residual add + ReLU ride in the last conv.
2. Anywhere else, a Conv2d → BatchNorm2d (→ ReLU) chain is fused only when tracing the parent's
   forward (torch.fx, one level deep, in eval *and* train mode) shows the data flowing that way
   in both: each module called once, the conv's output feeding only the BN and the BN's only
   the ReLU. A parent that cannot be traced is left as it is — a missed fusion, never a wrong
   answer.

Only plain modules are fused: exactly nn.Conv2d (zero padding given as numbers) and exactly
nn.BatchNorm2d, without hooks or parametrizations; subclasses (frozen, synchronized or
weight-standardized variants) may compute something else. What tracing cannot see, Python side
effects in a forward (appending an intermediate tensor to a list), is not covered.
"""

from __future__ import annotations

import copy
from collections import Counter

import torch
import torch.nn.functional as F
from torch import fx, nn

from . import backends
from .nn import (
    FusedBasicBlock, FusedBottleneck, FusedConv2d, fuse_conv_bn, has_hooks, is_plain_batch_norm, is_plain_conv,
)
from .report import build_report
from .residual import fuse_residuals, is_noop, is_relu_node, leaves, single_user, trace_in_mode


def _torchvision_blocks() -> dict[type, type]:
    try:
        from torchvision.models.resnet import BasicBlock, Bottleneck
    except ImportError:  # torchvision is optional for models that do not use it
        return {}
    return {BasicBlock: FusedBasicBlock, Bottleneck: FusedBottleneck}


def convert(model: nn.Module, backend: str = "auto", inplace: bool = False, report: bool = False):
    """Return ``model`` with its Conv2d→BatchNorm2d(→ReLU) chains and ResNet blocks fused.

    ``backend`` is ``"auto"`` (per call: Triton on CUDA tensors, the C++ op on CPU tensors) or
    one of ``available_backends()``. The result's ``state_dict()`` has exactly the original's
    keys and values, and its output matches the original's in eval and train mode alike.
    With ``inplace=True`` the model's children are replaced in place; use the returned module
    all the same (a model that is itself a ResNet block is replaced, not modified).
    With ``report=True`` it returns ``(model, ConversionReport)``: what was fused, and each
    place left unfused with the reason (``print(report)``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert expects an nn.Module, got {type(model).__name__}")
    backends.check_backend_name(backend)
    if backend != "auto" and backend not in backends.available_backends():
        raise ValueError(f"backend {backend!r} is not available here; available: {backends.available_backends()}")
    if not inplace:
        model = copy.deepcopy(model)
    # A module registered under two names (or in two parents) is replaced in one slot only:
    # such modules are never fused.
    counts = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    shared = {key for key, count in counts.items() if count > 1}
    blocks = _torchvision_blocks()
    if type(model) in blocks and _block_is_plain(model, shared):
        model = blocks[type(model)](model, backend)
    else:
        _replace_blocks(model, blocks, shared, backend)
        for parent in list(model.modules()):
            _fuse_chains(parent, shared, backend)
        for block in list(model.modules()):
            if _may_hold_residual(block):
                fuse_residuals(block)
    return (model, build_report(model, backend, shared)) if report else model


def _may_hold_residual(module: nn.Module) -> bool:
    """A module whose own forward may add a residual to a fused conv without a ReLU."""
    if isinstance(module, (FusedConv2d, FusedBasicBlock, FusedBottleneck)) or type(module) is nn.Sequential:
        return False
    return any(isinstance(m, FusedConv2d) and not m.relu for m in module.modules())


def _replace_blocks(parent: nn.Module, blocks: dict[type, type], shared: set[int], backend: str) -> None:
    for name, child in parent.named_children():
        fused = blocks.get(type(child))
        if fused is not None and _block_is_plain(child, shared):
            setattr(parent, name, fused(child, backend))
        else:
            _replace_blocks(child, blocks, shared, backend)


def _block_is_plain(block: nn.Module, shared: set[int]) -> bool:
    """A torchvision block whose convs and norms are the stock, unshared modules its known
    forward assumes (its shortcut runs as it is unless it is a plain conv + BN pair); anything
    else is left to the generic chain pass."""
    n = 3 if hasattr(block, "conv3") else 2
    convs = [getattr(block, f"conv{i}") for i in range(1, n + 1)]
    norms = [getattr(block, f"bn{i}") for i in range(1, n + 1)]
    return (
        not has_hooks(block)
        and not any(id(m) in shared for m in block.modules())
        and all(is_plain_conv(c) for c in convs)
        and all(is_plain_batch_norm(b) and b.num_features == c.out_channels for b, c in zip(norms, convs))
        and type(block.relu) is nn.ReLU
        and not has_hooks(block.relu)
    )


def _is_inplace_relu(node: fx.Node, parent: nn.Module) -> bool:
    if node.op == "call_module":
        return parent.get_submodule(node.target).inplace
    if node.op == "call_function":
        return node.target is torch.relu_ or (node.target is F.relu and bool(node.kwargs.get("inplace", node.args[1:2] == (True,))))
    return node.target == "relu_"


def _chains(parent: nn.Module, graph: fx.Graph | None, shared: set[int]) -> dict[str, tuple[str, bool, str | None]] | None:
    """conv target → (bn target, relu follows, ReLU module used only here) for the chains a
    trace of the parent's forward shows; None if it could not be traced."""
    if graph is None:
        return None
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")

    def called_once(node: fx.Node, plain) -> bool:
        return (
            node.op == "call_module"
            and calls[node.target] == 1
            and id(parent.get_submodule(node.target)) not in shared
            and plain(parent.get_submodule(node.target))
            and len(node.args) == 1
            and not node.kwargs
        )

    found = {}
    for node in graph.nodes:
        if not called_once(node, is_plain_conv):
            continue
        bn_node = single_user(node)
        if bn_node is None or not called_once(bn_node, is_plain_batch_norm) or bn_node.args[0] is not node:
            continue
        if parent.get_submodule(bn_node.target).num_features != parent.get_submodule(node.target).out_channels:
            continue
        # No-op modules (Identity, Dropout(p=0)) may stand between the BatchNorm and the ReLU:
        # relu(noop(y)) == noop(relu(y)), so the ReLU still folds into the conv.
        before, relu_node = bn_node, single_user(bn_node)
        while relu_node is not None and called_once(relu_node, is_noop) and relu_node.args[0] is before:
            before, relu_node = relu_node, single_user(relu_node)
        relu = relu_node is not None and relu_node.args[:1] == (before,) and is_relu_node(relu_node, parent)
        # A ReLU module used only here becomes redundant; a functional or shared ReLU stays,
        # which is harmless because relu(relu(y)) == relu(y) -- unless it works in place: it
        # would then overwrite the fused output that autograd keeps for the ReLU mask, so it
        # is not folded and runs after the fused conv+BN as it ran after the BatchNorm.
        own_relu = (
            relu_node.target
            if relu
            and relu_node.op == "call_module"
            and calls[relu_node.target] == 1
            and id(parent.get_submodule(relu_node.target)) not in shared
            else None
        )
        if relu and own_relu is None and _is_inplace_relu(relu_node, parent):
            relu = False
        found[node.target] = (bn_node.target, relu, own_relu)
    return found


def _fuse_chains(parent: nn.Module, shared: set[int], backend: str) -> None:
    if not any(is_plain_conv(m) for m in leaves(parent)):
        return
    # A forward may branch on self.training; a chain must hold in both modes.
    per_mode = [_chains(parent, trace_in_mode(parent, mode), shared) for mode in (False, True)]
    if None in per_mode:
        return
    eval_chains, train_chains = per_mode
    for conv_name, (bn_name, relu, own_relu) in eval_chains.items():
        other = train_chains.get(conv_name)
        if other is None or other[0] != bn_name:
            continue
        relu = relu and other[1]
        own_relu = own_relu if relu and own_relu == other[2] else None
        fused_conv, folded_bn = fuse_conv_bn(parent.get_submodule(conv_name), parent.get_submodule(bn_name), relu, backend)
        _set_submodule(parent, conv_name, fused_conv)
        _set_submodule(parent, bn_name, folded_bn)
        if own_relu is not None:
            _set_submodule(parent, own_relu, nn.Identity())


def _set_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    """Put ``module`` in the slot ``target`` names (dotted: inside a traced-through Sequential)."""
    owner, _, name = target.rpartition(".")
    setattr(root.get_submodule(owner) if owner else root, name, module)
