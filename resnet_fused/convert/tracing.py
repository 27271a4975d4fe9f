"""What convert sees of a forward: torch.fx traces with plain ``nn.Sequential`` containers
traced through and every other module a leaf, in train or eval mode, taken once per module per
conversion (``Traces``) and shared by the chain, residual and write-freedom passes.
"""

from __future__ import annotations

import inspect
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..nn import has_hooks
from ..ops.activation import IDENTITY, RELU, Activation

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


def activation_of(node: fx.Node, block: nn.Module) -> Activation | None:
    """The activation a node applies to its one input, if a fused conv can apply it: a stock
    activation module (``Activation.from_module``), or a ReLU in any form; None otherwise,
    the identity included (``is_noop`` covers it)."""
    if node.op == "call_module" and len(node.args) == 1 and not node.kwargs:
        module = block.get_submodule(node.target)
        found = None if has_hooks(module) else Activation.from_module(module)
        return found if found != IDENTITY else None
    return RELU if is_relu_node(node, block) else None


def single_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None



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
    """``(target, module)`` of the leaf modules a trace of ``root`` may call, targets dotted
    through the traced-through Sequentials."""
    stack = [("", root)]
    while stack:
        prefix, module = stack.pop()
        for name, child in module.named_children():
            if type(child) is nn.Sequential and not has_hooks(child):
                stack.append((f"{prefix}{name}.", child))
            else:
                yield f"{prefix}{name}", child


def trace_in_mode(root: nn.Module, training: bool) -> fx.Graph | None:
    """fx graph of ``root``'s class forward as it runs in train or eval mode; None if it cannot
    be traced, or if the forward changes module state: assigns attributes (``self.last = y``,
    ``self.calls += 1``) or writes into a dict, list or set a module holds (a cache:
    ``self.cache[key] = ...``, as timm's efficientvit_msra attention does). Generated code would
    drop such writes, and a forward that reads its own state may run other code on later calls
    than the traced one, so it is left alone; what tracing wrote (Proxies, which made the model
    fail to deepcopy or pickle) is undone. Only the traced-through modules switch mode (leaves
    do not run while tracing). Also None for a forward that takes more than one argument: fx traces the
    defaults only (``if shortcut is None: shortcut = x`` becomes the code of every call), so a
    rewrite would compute something else when the caller passes them (timm's DLA blocks)."""
    if not _one_argument(type(root).forward):
        return None
    traced = traced_through(root)
    modes = [m.training for m in traced]
    before = []
    try:
        for m in traced:
            m.training = training
        before = [_state(m) for m in traced]
        graph = SequentialsTraced().trace(root)
        return graph if all(_unchanged(m, saved) for m, saved in zip(traced, before)) else None
    except Exception:  # data-dependent control flow and the like: leave it alone
        return None
    finally:
        for m, saved in zip(traced, before):
            _restore(m, saved)
        for m, mode in zip(traced, modes):
            m.training = mode


def _one_argument(forward) -> bool:
    try:
        parameters = list(inspect.signature(forward).parameters.values())[1:]  # after self
    except (TypeError, ValueError):
        return False
    return len(parameters) == 1 and parameters[0].kind in (inspect.Parameter.POSITIONAL_ONLY,
                                                           inspect.Parameter.POSITIONAL_OR_KEYWORD)


_REGISTRIES = ("_parameters", "_buffers", "_modules")
_CONTAINER_DEPTH = 3  # how deep containers inside containers are watched


def _attributes(module: nn.Module) -> list[dict]:
    """Copies of what a forward could assign: the instance's attributes and its registries."""
    return [dict(module.__dict__), *(dict(getattr(module, r)) for r in _REGISTRIES)]


def _state(module: nn.Module) -> tuple[list[dict], list[tuple]]:
    """What a forward could write: its ``_attributes``, and a copy of every dict, list or set
    reachable from its attributes (through containers only), paired with the live container."""
    containers, seen = [], set()

    def visit(value, depth):
        if depth > _CONTAINER_DEPTH or id(value) in seen or not isinstance(value, (dict, list, set)):
            return
        seen.add(id(value))
        # The base types' copies: a subclass constructor may want other arguments (defaultdict).
        snapshot = dict(value) if isinstance(value, dict) else list(value) if isinstance(value, list) else set(value)
        containers.append((value, snapshot))
        for item in (value.values() if isinstance(value, dict) else value):
            visit(item, depth + 1)

    for value in module.__dict__.values():
        visit(value, 1)
    return _attributes(module), containers


def _unchanged(module: nn.Module, saved: tuple[list[dict], list[tuple]]) -> bool:
    attributes, containers = saved
    return _same(_attributes(module), attributes) and all(_same_contents(*pair) for pair in containers)


def _same(a: list[dict], b: list[dict]) -> bool:
    return all(x.keys() == y.keys() and all(x[k] is y[k] for k in x) for x, y in zip(a, b))


def _same_contents(live, snapshot) -> bool:
    """By identity only: ``==`` on a Proxy left in a container records a node or raises."""
    if isinstance(live, dict):
        return len(live) == len(snapshot) and all(
            k is j and v is w for (k, v), (j, w) in zip(live.items(), snapshot.items()))
    if isinstance(live, list):
        return len(live) == len(snapshot) and all(a is b for a, b in zip(live, snapshot))
    return len(live) == len(snapshot) and {id(x) for x in live} == {id(x) for x in snapshot}


def _restore(module: nn.Module, saved: tuple[list[dict], list[tuple]]) -> None:
    """Undo what tracing wrote: container contents first, then attributes and registries."""
    attributes, containers = saved
    for live, snapshot in containers:
        if not _same_contents(live, snapshot):
            if isinstance(live, list):
                live[:] = snapshot
            else:
                live.clear()
                live.update(snapshot)
    if not _same(_attributes(module), attributes):
        for live, snapshot in zip((module.__dict__, *(getattr(module, r) for r in _REGISTRIES)), attributes):
            live.clear()
            live.update(snapshot)


class Traces:
    """One conversion's traces: ``of(module)`` is ``(eval graph, train graph)``, each None where
    ``trace_in_mode`` gives none, taken on first request. The graphs name modules by their
    slots, so a trace taken before a pass swaps fused modules into those slots still describes
    the forward after it; a pass that rewrites a graph rewrites a copy."""

    def __init__(self):
        self._graphs: dict[int, tuple] = {}
        self._keep: list[nn.Module] = []  # ids stay unique while the conversion runs
        self.verdicts: dict[int, bool] = {}  # residual._writes_nothing, by module id

    def seen_by_ancestors(self, root: nn.Module, name: str) -> set[int]:
        """Ids of the modules inside the module at ``name`` (under ``root``) that the trace of an
        enclosing forward calls: one that reaches inside it, through plain Sequentials only.
        Such a forward may call them itself, not through this module (``for layer in
        self.features: outs.append(x := layer(x))``, ``self.features[0](x)``), and the chain it
        shows, or refused, is the one that runs: a pass over the inner Sequential alone must not
        fuse them. (An enclosing forward that cannot be traced shows nothing.)"""
        parts = name.split(".") if name else []
        seen: set[int] = set()
        for depth in range(len(parts), 0, -1):
            try:
                inner = root.get_submodule(".".join(parts[:depth]))
            except AttributeError:  # inside a module an earlier pass replaced: no longer in the model
                return seen
            if type(inner) is not nn.Sequential or has_hooks(inner):
                break  # a leaf in every enclosing trace
            ancestor = root.get_submodule(".".join(parts[:depth - 1]))
            for graph in self.of(ancestor):
                for node in graph.nodes if graph is not None else ():
                    if node.op == "call_module":
                        seen.add(id(ancestor.get_submodule(node.target)))
        return seen

    def of(self, module: nn.Module) -> tuple[fx.Graph | None, fx.Graph | None]:
        if id(module) not in self._graphs:
            self._graphs[id(module)] = (trace_in_mode(module, False), trace_in_mode(module, True))
            self._keep.append(module)
        return self._graphs[id(module)]
