"""Residual fusion in blocks of any class: ``conv → BN [→ no-op] → add(other) → ReLU`` becomes one
fused conv whose epilogue adds ``other`` and applies the ReLU.

Runs after the conv+BN chain pass (chains.py), so the pattern is seen as a ``FusedConv2d``
without a ReLU, its ``FoldedBatchNorm2d`` (an identity), optional no-op modules, an add and a
ReLU. The block's forward is traced with torch.fx (plain ``nn.Sequential`` containers traced
through, every other module a leaf) in train *and* eval mode; the two traces must agree, or the
forward depends on its mode and is left alone. The add may be ``+``, ``+=``, ``torch.add`` or
``Tensor.add_`` on the conv's output; the ReLU a module (in-place or not), ``F.relu``,
``torch.relu`` or ``relu_``; ``other`` any value that does not depend on the conv's output
(the block input, or a shortcut computed after the conv: the fused call moves to where the add
was, so ``other`` exists by then).

The block keeps its class (``isinstance`` checks in user code still hold): only the instance's
``forward`` is replaced, by ``ResidualForward``, which runs the rewritten graph's code. It holds
no code of its own in pickles: on load (and after ``copy.deepcopy``) it traces the class's own
forward again and reapplies the same rewrite, which the fused modules make deterministic.
"""

from __future__ import annotations

import copy
import operator
import warnings

import torch
from torch import fx, nn

from ..nn import FOLDED, FusedBasicBlock, FusedBottleneck, FusedConv2d, has_hooks
from ..ops.activation import IDENTITY
from .tracing import Traces, augmented_assign, is_noop, is_relu_node, single_user, trace_in_mode

_ADDS = (operator.add, torch.add)


def add_operands(node: fx.Node) -> tuple | None:
    """The two tensors an add node sums, if it is a plain two-operand add."""
    if node.op == "call_function" and node.target in _ADDS and len(node.args) == 2 and not node.kwargs:
        return node.args
    if node.op == "call_method" and node.target in ("add", "add_") and len(node.args) == 2 and not node.kwargs:
        return node.args
    if _is_in_place_add(node):
        return node.args[1:]
    return None


def _is_in_place_add(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target is augmented_assign and node.args[0] == "iadd") or (
        node.op == "call_method" and node.target == "add_"
    )


def _may_mutate(node: fx.Node, block: nn.Module, traces: Traces) -> bool:
    """Whether ``node`` may write into a tensor it is given: augmented assignments, ``*_``
    methods and functions, mutating aten overloads, ``out=`` and ``inplace=True`` calls, item
    assignment, and module calls that are not known to be free of all of these."""
    if node.kwargs.get("inplace") or "out" in node.kwargs:
        return True
    if node.op == "call_module":
        return not _writes_nothing(block.get_submodule(node.target), traces)
    if node.op == "call_method":
        return node.target.endswith("_")
    if node.op == "call_function":
        target = node.target
        if isinstance(target, torch._ops.OpOverload):
            return target._schema.is_mutable
        return target in (augmented_assign, operator.setitem) or getattr(target, "__name__", "").endswith("_")
    return False


def _writes_nothing(module: nn.Module, traces: Traces) -> bool:
    """Whether calling ``module`` cannot write into its inputs: the fused modules, torch.nn's own
    modules without an ``inplace=True`` part, and any other module whose forward, traced in both
    modes, has no node that may write (hooks, or a forward fx cannot trace, count as writing).
    Decided once per module per conversion (``traces.verdicts``)."""
    verdicts = traces.verdicts
    if id(module) in verdicts:
        return verdicts[id(module)]
    verdicts[id(module)] = False  # while deciding: a module that reaches itself writes
    if has_hooks(module) or getattr(module, "inplace", False):
        verdict = False
    elif isinstance(module, (FusedConv2d, *FOLDED)):
        verdict = True
    elif type(module).__module__.startswith("torch.nn."):
        verdict = all(_writes_nothing(m, traces) for m in module.children())
    else:
        graphs = traces.of(module)
        verdict = None not in graphs and not any(
            _may_mutate(node, module, traces) for graph in graphs for node in graph.nodes)
    verdicts[id(module)] = verdict
    return verdict


def _depends_on(node, target: fx.Node) -> bool:
    seen, stack = set(), [node]
    while stack:
        current = stack.pop()
        if current is target:
            return True
        if isinstance(current, fx.Node) and current not in seen:
            seen.add(current)
            stack.extend(current.all_input_nodes)
    return False


def _fused_conv_feeding(node: fx.Node, block: nn.Module) -> fx.Node | None:
    """Walk back from an add operand through no-ops and the folded BatchNorm to a FusedConv2d
    call that applies no activation, ReLU or other (the rewrite sets the conv's ReLU, which would
    replace a SiLU, say); every node on the way used only by the next."""
    seen_bn = False
    while isinstance(node, fx.Node) and node.op == "call_module" and len(node.users) == 1:
        module = block.get_submodule(node.target)
        if isinstance(module, FusedConv2d):
            ok = seen_bn and module.act == IDENTITY and len(node.args) == 1 and not node.kwargs
            return node if ok else None
        if isinstance(module, FOLDED):
            seen_bn = True
        elif not is_noop(module):
            return None
        if len(node.args) != 1 or node.kwargs:
            return None
        node = node.args[0]
    return None


def _mutation_between(conv_node: fx.Node, operand: fx.Node, add_node: fx.Node, block: nn.Module, traces: Traces) -> bool:
    """Whether anything between the conv and the add (other than the BN/no-op chain from one to
    the other) may write into a tensor: the fused call runs where the add was, so the conv would
    read its input after such a write where the original read it before."""
    chain, node = set(), operand
    while node is not conv_node:
        chain.add(node)
        node = node.args[0]
    node = conv_node.next
    while node is not add_node:
        if node.op == "root" or (node not in chain and _may_mutate(node, block, traces)):
            return True  # (past the graph's end: the add is not after the conv)
        node = node.next
    return False


def candidates(block: nn.Module, graph: fx.Graph, traces: Traces):
    """Each ``relu(add(a, b))`` in ``graph`` (a trace of ``block``) where a fused conv (through
    its BN and no-ops) feeds an operand: ``(relu, add, operand, conv, other, in_place, why_not)``,
    ``why_not`` None when the add + ReLU can ride in that conv's epilogue, else the reason."""
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for relu_node in list(graph.nodes):
        if not is_relu_node(relu_node, block) or not isinstance(relu_node.args[0], fx.Node):
            continue
        add_node = relu_node.args[0]
        operands = add_operands(add_node)
        if operands is None or len(add_node.users) != 1:
            continue
        in_place = _is_in_place_add(add_node)
        for i, operand in enumerate(operands):
            if relu_node not in add_node.users:
                break  # the caller rewrote this add with the previous operand's conv
            conv_node = _fused_conv_feeding(operand, block)
            if conv_node is None:
                continue
            other = operands[1 - i]
            why_not = None
            if in_place and i == 1:
                why_not = "the add writes into the other operand in place (x += conv output)"
            elif calls[conv_node.target] != 1:
                why_not = "the conv is called more than once"
            elif not isinstance(other, fx.Node) or _depends_on(other, conv_node):
                why_not = "the other operand is a constant or depends on the conv's output"
            elif _mutation_between(conv_node, operand, add_node, block, traces):
                why_not = "something between the conv and the add may write in place"
            yield relu_node, add_node, operand, conv_node, other, in_place, why_not


def rewrite(block: nn.Module, graph: fx.Graph, traces: Traces) -> list[str]:
    """Fuse every residual pattern in ``graph`` (a trace of ``block``); the fused conv targets.

    Sets ``relu`` on each fused conv it rewrites, so it only runs where the rewritten graph
    will be the block's forward."""
    fused, in_place = [], set()
    for relu_node, add_node, operand, conv_node, other, adds_in_place, why_not in candidates(block, graph, traces):
        if why_not is not None:
            continue
        with graph.inserting_before(add_node):
            new = graph.call_module(conv_node.target, (conv_node.args[0],), {"residual": other})
        relu_node.replace_all_uses_with(new)
        for dead in (relu_node, add_node):
            graph.erase_node(dead)
        # The folded BN and no-ops between the conv and the add are now unused.
        node = operand
        while node is not conv_node:
            following = node.args[0]
            graph.erase_node(node)
            node = following
        graph.erase_node(conv_node)
        fused.append(conv_node.target)
        if adds_in_place:
            in_place.add(conv_node.target)
    for target in fused:
        block.get_submodule(target).relu = True
        block.get_submodule(target).residual_in_place = target in in_place
    return fused


def may_hold_residual(module: nn.Module) -> bool:
    """A module whose own forward may add a residual to a fused conv without an activation."""
    if isinstance(module, (FusedConv2d, FusedBasicBlock, FusedBottleneck)) or type(module) is nn.Sequential:
        return False
    return any(isinstance(m, FusedConv2d) and m.act == IDENTITY for m in module.modules())


def _plan(block: nn.Module, traces: Traces) -> tuple[fx.Graph | None, list[tuple[str, str]]]:
    """``(graph, misses)``: the block's rewritten graph, if its forward is traceable,
    mode-independent and has a residual pattern (``block``'s fused convs get their ReLU flag
    set), and each fused conv whose add + ReLU stays, with the reason, as the trace of the
    block's current mode shows them."""
    graphs = traces.of(block)
    current = graphs[block.training]
    misses = [] if current is None else _misses(block, current, traces)
    if None in graphs or graphs[0].python_code("self").src != graphs[1].python_code("self").src:
        return None, misses
    graph = copy.deepcopy(graphs[0])  # the shared trace stays as traced
    if not rewrite(block, graph, traces):
        return None, misses
    graph.lint()
    return graph, misses


def _misses(block: nn.Module, graph: fx.Graph, traces: Traces) -> list[tuple[str, str]]:
    """Fused convs without an activation whose output meets an add + ReLU that cannot ride in their
    epilogue: a module between the BatchNorm and the add (an SE module), or a candidate's
    ``why_not``."""
    misses = []
    for node in graph.nodes:
        if node.op != "call_module" or "residual" in node.kwargs:
            continue
        module = block.get_submodule(node.target)
        if not isinstance(module, FusedConv2d) or module.act != IDENTITY:
            continue
        consumer = _past_noops(block, node)
        if consumer is None or consumer.op != "call_module":
            continue
        between = block.get_submodule(consumer.target)
        if isinstance(between, (FusedConv2d, *FOLDED)) or not _leads_to_add(consumer):
            continue
        misses.append((node.target, f"{type(between).__name__} between the BatchNorm and the residual add"))
    found = list(candidates(block, graph, traces))
    # An add fused through one operand's conv is no miss for its other operand's conv.
    fused_adds = {add_node for _, add_node, *_, why_not in found if why_not is None}
    misses += [(conv_node.target, why_not) for _, add_node, _, conv_node, _, _, why_not in found
               if why_not is not None and add_node not in fused_adds]
    return misses


def _past_noops(block: nn.Module, node: fx.Node) -> fx.Node | None:
    node = single_user(node)
    while node is not None and node.op == "call_module" and (
        isinstance(block.get_submodule(node.target), FOLDED) or is_noop(block.get_submodule(node.target))
    ):
        node = single_user(node)
    return node


def _leads_to_add(node: fx.Node) -> bool:
    user = single_user(node)
    return user is not None and add_operands(user) is not None


class ResidualForward:
    """A block's forward after residual fusion: the rewritten graph's generated code.

    Stored as an instance attribute ``forward`` (nn.Module.__call__ reads ``self.forward``), so
    the block keeps its class. Pickling keeps only the block; the code is regenerated lazily
    from the class's own forward after a load or copy."""

    def __init__(self, block: nn.Module, graph: fx.Graph | None = None):
        self.block = block
        self._code = None if graph is None else _compile(graph)

    def __call__(self, *args, **kwargs):
        if self._code is None:
            # After unpickling: the fused convs already carry their residual role (relu set),
            # so the class forward traces to the same pattern with the conv's flag set.
            graph = _trace_for_restore(self.block)
            if graph is None:
                return _unfuse(self.block)(*args, **kwargs)
            self._code = _compile(graph)
        return self._code(self.block, *args, **kwargs)

    def __getstate__(self):
        return {"block": self.block}

    def __setstate__(self, state):
        self.block = state["block"]
        self._code = None


def _compile(graph: fx.Graph):
    code = graph.python_code("self")
    namespace = dict(code.globals)
    exec(code.src, namespace)  # noqa: S102  (fx's own code generation, as GraphModule does)
    return namespace["forward"]


def _trace_for_restore(block: nn.Module) -> fx.Graph | None:
    """Trace the class forward of an already fused block and redo the rewrite with the fused
    convs' ReLU flags temporarily cleared (the pattern matcher requires relu=False); None if
    the rewrite no longer comes out the same (the block changed since convert: a hook added to
    one of its modules makes the pass refuse)."""
    flagged = [m for m in block.modules() if isinstance(m, FusedConv2d) and m.residual_fused]
    for m in flagged:
        m.relu = False
    graph = trace_in_mode(block, block.training)
    if graph is None or sorted(rewrite(block, graph, Traces())) != sorted(n for n, m in block.named_modules() if m in flagged):
        for m in flagged:
            m.relu = True
        return None
    return graph


def _unfuse(block: nn.Module):
    """Undo a block's residual fusion: its fused convs apply no add or ReLU any more, and the
    class forward runs again (adds and ReLUs unfused, the answer unchanged); returns that
    forward. For a block whose rewrite cannot be restored after a copy or load."""
    warnings.warn(f"resnet_fused: the residual fusion of a {type(block).__name__} could not be redone after a copy or "
                  "load (was a hook added to one of its modules after convert?); its add + ReLU run unfused from now on",
                  stacklevel=3)
    for m in block.modules():
        if isinstance(m, FusedConv2d) and m.residual_fused:
            m.relu, m.residual_fused, m.residual_in_place = False, False, False
    del block.forward
    return block.forward


def fuse_residuals(block: nn.Module, traces: Traces) -> list[tuple[str, str]]:
    """Replace ``block``'s forward if it has fusible residual patterns; returns the places
    (conv target, reason) whose add + ReLU stays unfused."""
    if "forward" in block.__dict__:  # already rewritten, or a forward the user set
        return []
    graph, misses = _plan(block, traces)
    if graph is not None:
        fused = [node.target for node in graph.nodes if node.op == "call_module" and "residual" in node.kwargs]
        for target in fused:
            block.get_submodule(target).residual_fused = True
        block.forward = ResidualForward(block, graph)
    return misses
