"""The chain pass: a Conv2d → BatchNorm2d (→ activation) chain is fused when the trace of the
parent's forward (torch.fx, through plain Sequentials, in eval *and* train mode) shows the data
flowing that way in both: each module called once, the conv's output feeding only the BN and the
BN's only the activation (ReLU, ReLU6/Hardtanh, LeakyReLU, SiLU, Hardswish, GELU). Every conv the pass looks at and leaves alone gets the reason, which the report
prints as it is.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..nn import (FusedConv2d, can_fold, folded_activation, fuse_conv_bn, has_hooks, is_fusible_conv, is_fusible_norm,
                  norm_act_activation, norm_features, numeric_padding, timm_same_conv_type)
from ..ops.activation import IDENTITY, RELU, Activation
from .tracing import Traces, activation_of, is_noop, leaves, single_user

# conv target → (bn target, activation the fused conv applies, activation module used only here)
Chain = tuple[str, Activation, str | None]


def is_norm(module: nn.Module) -> bool:
    """A normalization layer the report accounts for (torchvision's FrozenBatchNorm2d and timm's
    FrozenBatchNormAct2d are no _NormBase)."""
    return (isinstance(module, nn.modules.batchnorm._NormBase)
            or type(module).__name__ in ("FrozenBatchNorm2d", "FrozenBatchNormAct2d"))


def conv_why_not(conv: nn.Conv2d, shared: set[int]) -> str | None:
    """Why this conv module can never be fused, whatever its forward does; None if it can."""
    if type(conv) is not nn.Conv2d and type(conv) is not timm_same_conv_type():
        return f"{type(conv).__name__} is not a plain nn.Conv2d (it may compute something else)"
    if numeric_padding(conv) is None:
        return (f"padding {conv.padding!r} / padding_mode={conv.padding_mode!r}: only zero padding the same on both "
                "sides is fused")
    if has_hooks(conv):
        return "has hooks, which a fused op would not call"
    if id(conv) in shared:
        return "registered under more than one name"
    return None


def _is_inplace_relu(node: fx.Node, parent: nn.Module) -> bool:
    if node.op == "call_module":
        return parent.get_submodule(node.target).inplace
    if node.op == "call_function":
        return node.target is torch.relu_ or (node.target is F.relu and bool(node.kwargs.get("inplace", node.args[1:2] == (True,))))
    return node.target == "relu_"


def _name(node: fx.Node, parent: nn.Module) -> str:
    if node.op == "call_module":
        return type(parent.get_submodule(node.target)).__name__
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))


def _chains(parent: nn.Module, graph: fx.Graph, shared: set[int]) -> tuple[dict[str, Chain], dict[str, str]]:
    """``(chains, why_not)`` of one trace of the parent's forward: the chains it shows, and for
    every other plain conv it calls, why not."""
    calls = module_calls(graph)

    def called_once(node: fx.Node, plain) -> bool:
        return is_called_once(node, parent, calls, shared, plain)

    found, why_not = {}, {}
    for node in graph.nodes:
        if node.op != "call_module" or not is_fusible_conv(parent.get_submodule(node.target)):
            continue
        if not called_once(node, is_fusible_conv):
            why_not[node.target] = f"called {calls[node.target]} times (or with extra arguments) in the forward of " \
                                   f"{type(parent).__name__}"
            continue
        bn_node = single_user(node)
        if bn_node is None:
            why_not[node.target] = "its output is used more than once (or not at all)"
            continue
        if not called_once(bn_node, is_fusible_norm) or bn_node.args[0] is not node:
            follower = _name(bn_node, parent)
            is_bn = bn_node.op == "call_module" and is_norm(parent.get_submodule(bn_node.target))
            why_not[node.target] = (f"followed by {follower}, which is not fused (see its own line)" if is_bn
                                    else f"followed by {follower}, not a BatchNorm2d")
            continue
        if norm_features(parent.get_submodule(bn_node.target)) != parent.get_submodule(node.target).out_channels:
            why_not[node.target] = "its BatchNorm's channel count differs from the conv's out_channels"
            continue
        own_act = norm_act_activation(parent.get_submodule(bn_node.target))
        if own_act not in (None, IDENTITY):
            found[node.target] = (bn_node.target, own_act, None)  # the norm module applies it itself
            continue
        found[node.target] = (bn_node.target, *activation_after(bn_node, parent, calls, shared))
    return found, why_not


def disagreeing_modes(parent: nn.Module, act: Activation, own: str | None, other_act: Activation,
                      other_own: str | None) -> tuple[Activation, None]:
    """The activation to fuse when eval and train mode show different ones after a BatchNorm: a
    ReLU both apply may still fold with both modules left to run (idempotent), unless one works
    in place (it would overwrite the fused output autograd keeps for the mask); otherwise none."""
    in_place = any(getattr(parent.get_submodule(t), "inplace", False) for t in (own, other_own) if t)
    return (RELU, None) if act == other_act == RELU and not in_place else (IDENTITY, None)


def module_calls(graph: fx.Graph) -> Counter:
    """How many times the trace calls each module target."""
    return Counter(node.target for node in graph.nodes if node.op == "call_module")


def is_called_once(node: fx.Node, parent: nn.Module, calls: Counter, shared: set[int], plain) -> bool:
    """Whether ``node`` calls a module that ``plain`` accepts, unshared, once in the trace, on one
    argument."""
    return (
        node.op == "call_module"
        and calls[node.target] == 1
        and id(parent.get_submodule(node.target)) not in shared
        and plain(parent.get_submodule(node.target))
        and len(node.args) == 1
        and not node.kwargs
    )


def activation_after(bn_node: fx.Node, parent: nn.Module, calls: Counter,
                     shared: set[int]) -> tuple[Activation, str | None]:
    """``(activation, own module)``: the activation a fused unit ending in the BatchNorm of
    ``bn_node`` may apply (IDENTITY: none), and the target of the activation module that then
    becomes a pass-through (None: nothing to replace)."""
    # No-op modules (Identity, Dropout(p=0)) may stand between the BatchNorm and the
    # activation: act(noop(y)) == noop(act(y)), so the activation still folds.
    before, act_node = bn_node, single_user(bn_node)
    while act_node is not None and is_called_once(act_node, parent, calls, shared, is_noop) \
            and act_node.args[0] is before:
        before, act_node = act_node, single_user(act_node)
    act = activation_of(act_node, parent) if act_node is not None and act_node.args[:1] == (before,) else None
    # An activation module used only here becomes a pass-through (folded_activation). A
    # functional or shared ReLU stays, which is harmless because relu(relu(y)) == relu(y) --
    # unless it works in place: it would then overwrite the fused output that autograd keeps
    # for the ReLU mask, so it is not folded and runs after the fused unit as it ran after the
    # BatchNorm. Any other activation applied twice changes the answer: it folds only as a
    # module of its own.
    own = (
        act_node.target
        if act is not None
        and act_node.op == "call_module"
        and calls[act_node.target] == 1
        and id(parent.get_submodule(act_node.target)) not in shared
        and can_fold(parent.get_submodule(act_node.target))
        else None
    )
    if act is None or own is None and (act != RELU or _is_inplace_relu(act_node, parent)):
        act = IDENTITY
    return act, own if act != IDENTITY else None


def fuse_chains(parent: nn.Module, shared: set[int], backend: str, traces: Traces,
                outer: set[int] = frozenset()) -> dict[str, str]:
    """Fuse the chains the parent's forward shows in both modes; returns, for each conv module
    it calls and leaves alone (a target under ``parent``), why. ``outer``: ids of the modules an
    enclosing forward's trace calls (``Traces.seen_by_ancestors``), whose verdict stands."""
    convs = {name: m for name, m in leaves(parent) if isinstance(m, nn.Conv2d) and not isinstance(m, FusedConv2d)}
    why_not = {name: reason for name, m in convs.items() if (reason := conv_why_not(m, shared)) is not None}
    if len(why_not) == len(convs):
        return why_not  # nothing to trace for
    # A forward may branch on self.training; a chain must hold in both modes.
    graphs = traces.of(parent)
    if None in graphs:
        untraceable = f"the forward of {type(parent).__name__} cannot be traced by torch.fx, takes more than one " \
                      "argument, or changes module state (assigns attributes, writes into its dicts/lists/sets)"
        return {**{name: untraceable for name in convs}, **why_not}
    (eval_chains, eval_why), (train_chains, train_why) = (_chains(parent, g, shared) for g in graphs)
    # A conv that can never be fused keeps that reason; the others get what the trace of the
    # parent's current mode shows.
    why_not = {**(train_why if parent.training else eval_why), **why_not}
    for conv_name, (bn_name, act, own_act) in eval_chains.items():
        other = train_chains.get(conv_name)
        if other is None or other[0] != bn_name:
            why_not.setdefault(conv_name, "its forward feeds it to a BatchNorm in one mode only (train or eval)")
            continue
        if any(id(parent.get_submodule(t)) in outer for t in (conv_name, bn_name, own_act, other[2]) if t):
            why_not.setdefault(conv_name, "an enclosing forward calls these modules itself (see its line)")
            continue
        why_not.pop(conv_name, None)
        if (act, own_act) != other[1:]:
            act, own_act = disagreeing_modes(parent, act, own_act, *other[1:])
        fused_conv, folded_bn = fuse_conv_bn(parent.get_submodule(conv_name), parent.get_submodule(bn_name),
                                             backend=backend, act=act)
        set_submodule(parent, conv_name, fused_conv)
        set_submodule(parent, bn_name, folded_bn)
        if own_act is not None:
            set_submodule(parent, own_act, folded_activation(parent.get_submodule(own_act)))
    for conv_name in train_chains.keys() - eval_chains.keys():
        why_not.setdefault(conv_name, "its forward feeds it to a BatchNorm in one mode only (train or eval)")
    return why_not


def set_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    """Put ``module`` in the slot ``target`` names (dotted: inside a traced-through Sequential)."""
    owner, _, name = target.rpartition(".")
    setattr(root.get_submodule(owner) if owner else root, name, module)
