"""Residual fusion in blocks of any class: ``conv → BN [→ no-op] → add(other) → ReLU`` becomes one
fused conv whose epilogue adds ``other`` and applies the ReLU.

Runs after the conv+BN chain pass (convert.py), so the pattern is seen as a ``FusedConv2d``
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

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from .nn import FoldedBatchNorm2d, FoldedSyncBatchNorm, FusedConv2d, has_hooks

_ADDS = (operator.add, torch.add)
_RELU_FUNCTIONS = (torch.relu, torch.relu_, F.relu)
_AUGMENTED_OPS = ("iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "imatmul", "iand", "ior",
                  "ixor", "ilshift", "irshift")


def augmented_assign(op: str, target, value):
    """``target op= value`` (``op`` an ``operator`` name such as "iadd") as a call: what a traced
    ``+=``, ``*=``, ... records. Tensors are updated in place and returned; other values (ints
    from ``x.shape``) give the new value without touching the old one.

    fx's own Proxy has no in-place operators, so ``a += b`` traced as ``a = a + b``: the
    regenerated forward then allocated and type-promoted where the original updated in place
    (under autocast a bf16 conv output ``+= x`` of fp32 stays bf16; ``+`` makes fp32), and left
    tensors the original mutated (the caller's input, views) unchanged. Nor is ``operator.iadd``
    the recorded target: fx prints it back as ``a += b; iadd = a``, rebinding the name ``a``
    for every later use of an int it held."""
    return getattr(operator, op)(target, value)


def _recorder(op: str):
    def record(self, other):
        return self.tracer.create_proxy("call_function", augmented_assign, (op, self, other), {})

    return record


class _AugmentedAssignProxy(fx.Proxy):
    """A Proxy that records augmented assignments as ``augmented_assign`` calls."""


for _op in _AUGMENTED_OPS:
    setattr(_AugmentedAssignProxy, f"__{_op}__", _recorder(_op))


class SequentialsTraced(fx.Tracer):
    """Leaves: every module but plain ``nn.Sequential`` containers, whose forward is known.
    Augmented assignments are recorded as such (``augmented_assign``)."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return not (type(module) is nn.Sequential and not has_hooks(module))

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _AugmentedAssignProxy(node, self)


def is_noop(module: nn.Module) -> bool:
    """Modules that return their input in both modes."""
    if has_hooks(module):
        return False
    return type(module) is nn.Identity or (type(module) is nn.Dropout and module.p == 0.0)


def is_relu_node(node: fx.Node, block: nn.Module) -> bool:
    if node.op == "call_module":
        module = block.get_submodule(node.target)
        return type(module) is nn.ReLU and not has_hooks(module)
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS and len(node.args) == 1 and set(node.kwargs) <= {"inplace"}
    return node.op == "call_method" and node.target in ("relu", "relu_") and len(node.args) == 1


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


def _may_mutate(node: fx.Node, block: nn.Module, verdicts: dict) -> bool:
    """Whether ``node`` may write into a tensor it is given: augmented assignments, ``*_``
    methods and functions, mutating aten overloads, ``out=`` and ``inplace=True`` calls, item
    assignment, and module calls that are not known to be free of all of these. ``verdicts``
    caches ``_writes_nothing`` by module for one pass."""
    if node.kwargs.get("inplace") or "out" in node.kwargs:
        return True
    if node.op == "call_module":
        return not _writes_nothing(block.get_submodule(node.target), verdicts)
    if node.op == "call_method":
        return node.target.endswith("_")
    if node.op == "call_function":
        target = node.target
        if isinstance(target, torch._ops.OpOverload):
            return target._schema.is_mutable
        return target in (augmented_assign, operator.setitem) or getattr(target, "__name__", "").endswith("_")
    return False


def _writes_nothing(module: nn.Module, verdicts: dict) -> bool:
    """Whether calling ``module`` cannot write into its inputs: the fused modules, torch.nn's own
    modules without an ``inplace=True`` part, and any other module whose forward, traced in both
    modes, has no node that may write (hooks, or a forward fx cannot trace, count as writing)."""
    if id(module) in verdicts:
        return verdicts[id(module)]
    verdicts[id(module)] = False  # while deciding: a module that reaches itself writes
    if has_hooks(module) or getattr(module, "inplace", False):
        verdict = False
    elif isinstance(module, (FusedConv2d, FoldedBatchNorm2d, FoldedSyncBatchNorm)):
        verdict = True
    elif type(module).__module__.startswith("torch.nn."):
        verdict = all(_writes_nothing(m, verdicts) for m in module.children())
    else:
        graphs = [trace_in_mode(module, mode) for mode in (False, True)]
        verdict = None not in graphs and not any(
            _may_mutate(node, module, verdicts) for graph in graphs for node in graph.nodes)
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


def single_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _fused_conv_feeding(node: fx.Node, block: nn.Module) -> fx.Node | None:
    """Walk back from an add operand through no-ops and the folded BatchNorm to a FusedConv2d
    call without a ReLU; every node on the way used only by the next."""
    seen_bn = False
    while isinstance(node, fx.Node) and node.op == "call_module" and len(node.users) == 1:
        module = block.get_submodule(node.target)
        if isinstance(module, FusedConv2d):
            ok = seen_bn and not module.relu and len(node.args) == 1 and not node.kwargs
            return node if ok else None
        if isinstance(module, (FoldedBatchNorm2d, FoldedSyncBatchNorm)):
            seen_bn = True
        elif not is_noop(module):
            return None
        if len(node.args) != 1 or node.kwargs:
            return None
        node = node.args[0]
    return None


def _mutation_between(conv_node: fx.Node, operand: fx.Node, add_node: fx.Node, block: nn.Module, verdicts: dict) -> bool:
    """Whether anything between the conv and the add (other than the BN/no-op chain from one to
    the other) may write into a tensor: the fused call runs where the add was, so the conv would
    read its input after such a write where the original read it before."""
    chain, node = set(), operand
    while node is not conv_node:
        chain.add(node)
        node = node.args[0]
    node = conv_node.next
    while node is not add_node:
        if node.op == "root" or (node not in chain and _may_mutate(node, block, verdicts)):
            return True  # (past the graph's end: the add is not after the conv)
        node = node.next
    return False


def candidates(block: nn.Module, graph: fx.Graph):
    """Each ``relu(add(a, b))`` in ``graph`` (a trace of ``block``) where a fused conv (through
    its BN and no-ops) feeds an operand: ``(relu, add, operand, conv, other, in_place, why_not)``,
    ``why_not`` None when the add + ReLU can ride in that conv's epilogue, else the reason."""
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    verdicts: dict[int, bool] = {}
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
            elif _mutation_between(conv_node, operand, add_node, block, verdicts):
                why_not = "something between the conv and the add may write in place"
            yield relu_node, add_node, operand, conv_node, other, in_place, why_not


def rewrite(block: nn.Module, graph: fx.Graph) -> list[str]:
    """Fuse every residual pattern in ``graph`` (a trace of ``block``); the fused conv targets.

    Sets ``relu`` on each fused conv it rewrites, so it only runs where the rewritten graph
    will be the block's forward."""
    fused, in_place = [], set()
    for relu_node, add_node, operand, conv_node, other, adds_in_place, why_not in candidates(block, graph):
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


def traced_through(root: nn.Module) -> list[nn.Module]:
    """The modules whose forward code a trace of ``root`` runs: ``root`` and the plain
    Sequentials under it (reached through Sequentials only); everything else is a leaf."""
    out, stack = [], [root]
    while stack:
        module = stack.pop()
        out.append(module)
        stack.extend(c for c in module.children() if type(c) is nn.Sequential and not has_hooks(c))
    return out


def leaves(root: nn.Module):
    """The leaf modules a trace of ``root`` calls (at most)."""
    for module in traced_through(root):
        yield from (c for c in module.children() if not (type(c) is nn.Sequential and not has_hooks(c)))


def trace_in_mode(root: nn.Module, training: bool) -> fx.Graph | None:
    """fx graph of ``root``'s class forward as it runs in train or eval mode; None if it cannot
    be traced, or if the forward assigns module attributes (``self.last = y``, ``self.calls +=
    1``): generated code would drop those, so the forward is left alone, and what tracing
    assigned (Proxies) is undone. Only the traced-through modules switch mode (leaves do not run
    while tracing)."""
    traced = traced_through(root)
    modes = [m.training for m in traced]
    before = []
    try:
        for m in traced:
            m.training = training
        before = [_attributes(m) for m in traced]
        graph = SequentialsTraced().trace(root)
        return graph if all(_same(_attributes(m), b) for m, b in zip(traced, before)) else None
    except Exception:  # data-dependent control flow and the like: leave it alone
        return None
    finally:
        for m, attributes in zip(traced, before):
            if not _same(_attributes(m), attributes):
                for live, saved in zip((m.__dict__, *(getattr(m, r) for r in _REGISTRIES)), attributes):
                    live.clear()
                    live.update(saved)
        for m, mode in zip(traced, modes):
            m.training = mode


_REGISTRIES = ("_parameters", "_buffers", "_modules")


def _attributes(module: nn.Module) -> list[dict]:
    """Copies of what a forward could assign: the instance's attributes and its registries."""
    return [dict(module.__dict__), *(dict(getattr(module, r)) for r in _REGISTRIES)]


def _same(a: list[dict], b: list[dict]) -> bool:
    return all(x.keys() == y.keys() and all(x[k] is y[k] for k in x) for x, y in zip(a, b))


def _plan(block: nn.Module) -> fx.Graph | None:
    """The block's rewritten graph, if its forward is traceable, mode-independent and has a
    residual pattern; ``block``'s fused convs get their ReLU flag set."""
    graphs = [trace_in_mode(block, mode) for mode in (False, True)]
    if None in graphs:
        return None
    codes = [g.python_code("self").src for g in graphs]
    if codes[0] != codes[1]:
        return None
    graph = graphs[0]
    if not rewrite(block, graph):
        return None
    graph.lint()
    return graph


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


def _trace_for_restore(block: nn.Module) -> fx.Graph:
    """Trace the class forward of an already fused block and redo the rewrite with the fused
    convs' ReLU flags temporarily cleared (the pattern matcher requires relu=False)."""
    flagged = [m for m in block.modules() if isinstance(m, FusedConv2d) and m.residual_fused]
    for m in flagged:
        m.relu = False
    graph = trace_in_mode(block, block.training)
    if graph is None or sorted(rewrite(block, graph)) != sorted(n for n, m in block.named_modules() if m in flagged):
        for m in flagged:
            m.relu = True
        raise RuntimeError(f"resnet_fused: cannot restore the fused forward of {type(block).__name__}")
    return graph


def fuse_residuals(block: nn.Module) -> list[str]:
    """Replace ``block``'s forward if it has fusible residual patterns; the fused conv names."""
    if "forward" in block.__dict__:  # already rewritten, or a forward the user set
        return []
    graph = _plan(block)
    if graph is None:
        return []
    fused = [node.target for node in graph.nodes if node.op == "call_module" and "residual" in node.kwargs]
    for target in fused:
        block.get_submodule(target).residual_fused = True
    block.forward = ResidualForward(block, graph)
    return fused
