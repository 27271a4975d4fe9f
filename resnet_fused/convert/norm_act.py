"""The norm-activation pass: a BatchNorm2d that no conv fuses, with an activation after it,
becomes one ``FusedBatchNormAct2d`` (norm_act.py). It runs after the chain pass, so every
BatchNorm a conv could absorb is already folded; what is left is mostly pre-activation
(BatchNorm → activation → conv, on a concat or a residual sum: DenseNet, DPN, ResNetV2).

- timm's ``BatchNormAct2d`` applies its own activation, so its forward is known and no trace
  is needed: it is replaced when its drop is the identity and its activation one the fused ops
  apply (``nn.norm_act_activation``).
- A plain ``nn.BatchNorm2d`` is replaced when the parent's forward, traced in eval and train
  mode alike, feeds its output only to an activation (the chain pass's rule,
  ``chains.activation_after``), whose module then becomes a pass-through.

SyncBatchNorm and the frozen norms stay as they are (the report says why).
"""

from __future__ import annotations

from torch import fx, nn

from ..nn import folded_activation, has_hooks, is_plain_batch_norm, norm_act_activation, timm_norm_act_types
from ..norm_act import FusedBatchNormAct2d
from ..ops.activation import IDENTITY, Activation
from .chains import activation_after, disagreeing_modes, is_called_once, module_calls, set_submodule
from .tracing import Traces, leaves


def fuse_norm_acts(parent: nn.Module, shared: set[int], backend: str, traces: Traces,
                   outer: set[int] = frozenset()) -> None:
    """Fuse, in ``parent``'s own slots, the BatchNorm + activation pairs described above.
    ``outer`` as in ``chains.fuse_chains``: a plain pair an enclosing forward calls stays (a
    BatchNormAct2d computes the same whoever calls it)."""
    norm_act = timm_norm_act_types().get("BatchNormAct2d")
    plain = []
    for name, module in parent.named_children():
        if norm_act is not None and type(module) is norm_act and id(module) not in shared:
            act = norm_act_activation(module)
            if act not in (None, IDENTITY):
                setattr(parent, name, FusedBatchNormAct2d(module, act, backend))
    for name, module in leaves(parent):
        if is_plain_batch_norm(module) and type(module) is nn.BatchNorm2d and id(module) not in shared:
            plain.append(name)
    if not plain:
        return
    graphs = traces.of(parent)
    if None in graphs:
        return
    found = [_activations(parent, graph, shared, set(plain)) for graph in graphs]
    for bn_name, (act, own) in found[0].items():
        other = found[1].get(bn_name)
        if other is None or any(id(parent.get_submodule(t)) in outer for t in (bn_name, own, other[1]) if t):
            continue
        if (act, own) != other:
            act, own = disagreeing_modes(parent, act, own, *other)
            if act == IDENTITY:
                continue
        set_submodule(parent, bn_name, FusedBatchNormAct2d(parent.get_submodule(bn_name), act, backend))
        if own is not None:
            set_submodule(parent, own, folded_activation(parent.get_submodule(own)))


def _activations(parent: nn.Module, graph: fx.Graph, shared: set[int],
                 names: set[str]) -> dict[str, tuple[Activation, str | None]]:
    """For each BatchNorm of ``names`` this trace calls once, on one argument, the activation
    after it and its own module (``chains.activation_after``); those with none are left out."""
    calls = module_calls(graph)
    found = {}
    for node in graph.nodes:
        if node.op == "call_module" and node.target in names \
                and is_called_once(node, parent, calls, shared, lambda m: not has_hooks(m)):
            act, own = activation_after(node, parent, calls, shared)
            if act != IDENTITY:
                found[node.target] = (act, own)
    return found
