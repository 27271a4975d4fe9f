"""What ``convert`` fused, with which backend, and why each place it left alone stayed unfused.

``convert(model, report=True)`` returns ``(model, ConversionReport)``; ``print(report)`` gives a
one-screen summary. The reasons are found by looking at the converted model the way the passes
do (module types, hooks, sharing, fx traces), so they say what a user can change.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import fx, nn

from .nn import FoldedBatchNorm2d, FoldedSyncBatchNorm, FusedConv2d, has_hooks, is_plain_batch_norm
from .residual import add_operands, candidates, is_noop, single_user, trace_in_mode

_FOLDED = (FoldedBatchNorm2d, FoldedSyncBatchNorm)


@dataclass
class ConversionReport:
    backend: str
    convs_fused: int = 0  # conv + BatchNorm pairs now one op
    relus_fused: int = 0  # ReLUs applied in a fused conv's epilogue (not counting residual ones)
    residuals_fused: int = 0  # add + ReLU pairs applied in a fused conv's epilogue
    unfused: list[tuple[str, str]] = field(default_factory=list)  # (module name, reason)

    def __str__(self) -> str:
        lines = [
            f"resnet_fused.convert (backend={self.backend!r}): {self.convs_fused} conv+BatchNorm fused, "
            f"{self.relus_fused} ReLU fused, {self.residuals_fused} residual add+ReLU fused",
        ]
        if self.unfused:
            # One line per reason (a ResNet repeats its blocks), with a few of the places.
            by_reason: dict[str, list[str]] = {}
            for name, reason in self.unfused:
                by_reason.setdefault(reason, []).append(name)
            lines.append(f"left as they were ({len(self.unfused)}):")
            for reason, names in by_reason.items():
                shown = ", ".join(names[:3]) + (f", ... ({len(names)} in all)" if len(names) > 3 else "")
                lines.append(f"  {reason}: {shown}")
        else:
            lines.append("nothing left unfused")
        return "\n".join(lines)


def build_report(model: nn.Module, backend: str, shared: set[int]) -> ConversionReport:
    report = ConversionReport(backend)
    parents = _parents(model)
    for name, module in model.named_modules():
        if isinstance(module, FusedConv2d):
            report.convs_fused += 1
            if module.residual_fused:
                report.residuals_fused += 1
            elif module.relu:
                report.relus_fused += 1
        elif isinstance(module, nn.Conv2d):
            report.unfused.append((name, _conv_reason(model, name, module, parents, shared)))
        elif _is_norm(module) and not isinstance(module, _FOLDED):
            reason = "not a plain nn.BatchNorm2d (a subclass or another norm may compute something else)"
            if is_plain_batch_norm(module):
                reason = "has hooks" if has_hooks(module) else "no conv feeds it directly"
            report.unfused.append((name, f"{type(module).__name__} {reason}"))
    report.unfused += _residual_misses(model)
    return report


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._NormBase) or type(module).__name__ == "FrozenBatchNorm2d"


def _parents(model: nn.Module) -> dict[str, str]:
    """Module name → name of the nearest ancestor that is not a plain Sequential (whose
    forward the passes trace)."""
    out = {}
    for name, module in model.named_modules():
        for child_name, _ in module.named_children():
            full = f"{name}.{child_name}" if name else child_name
            out[full] = name if type(module) is not nn.Sequential or not name else out.get(name, "")
    return out


def _conv_reason(model, name, conv, parents, shared) -> str:
    if type(conv) is not nn.Conv2d:
        return f"{type(conv).__name__} is not a plain nn.Conv2d (it may compute something else)"
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return f"padding {conv.padding!r} / padding_mode={conv.padding_mode!r}: only numeric zero padding is fused"
    if has_hooks(conv):
        return "has hooks, which a fused op would not call"
    if id(conv) in shared:
        return "registered under more than one name"
    parent_name = parents.get(name, "")
    parent = model.get_submodule(parent_name) if parent_name else model
    local = name[len(parent_name) + 1 :] if parent_name else name
    graph = trace_in_mode(parent, parent.training)
    if graph is None:
        return f"the forward of {type(parent).__name__} cannot be traced by torch.fx, or assigns module attributes"
    nodes = [n for n in graph.nodes if n.op == "call_module" and n.target == local]
    if len(nodes) != 1:
        return f"called {len(nodes)} times in the forward of {type(parent).__name__}"
    user = single_user(nodes[0])
    if user is None:
        return "its output is used more than once (or not at all)"
    if user.op == "call_module":
        follower = parent.get_submodule(user.target)
        if _is_norm(follower):
            return f"followed by {type(follower).__name__}, which is not fused (see its own line)"
        return f"followed by {type(follower).__name__}, not a BatchNorm2d"
    return f"followed by {user.target if isinstance(user.target, str) else getattr(user.target, '__name__', user.target)}, not a BatchNorm2d"


def _residual_misses(model: nn.Module) -> list[tuple[str, str]]:
    """Fused convs without a ReLU whose output, after the BatchNorm, meets an add + ReLU that
    could not ride in the epilogue, with what stood in the way."""
    misses = []
    for name, block in model.named_modules():
        if type(block) is nn.Sequential or isinstance(block, FusedConv2d) or "forward" in block.__dict__:
            continue  # (a block with a rewritten forward has its adds fused)
        if not any(isinstance(m, FusedConv2d) and not m.relu for m in block.children()) and not any(
            type(c) is nn.Sequential for c in block.children()
        ):
            continue
        graph = trace_in_mode(block, block.training)
        if graph is None:
            continue
        for node in graph.nodes:
            if node.op != "call_module" or "residual" in node.kwargs:
                continue
            module = block.get_submodule(node.target)
            if not isinstance(module, FusedConv2d) or module.relu:
                continue
            consumer = _past_noops(block, node)
            if consumer is None or consumer.op != "call_module":
                continue
            between = block.get_submodule(consumer.target)
            if isinstance(between, (FusedConv2d, *_FOLDED)) or not _leads_to_add(consumer):
                continue
            key = f"{name}.{node.target}" if name else node.target
            misses.append((key, f"{type(between).__name__} between the BatchNorm and the residual add: add + ReLU stay"))
        for *_, conv_node, _, _, why_not in candidates(block, graph):
            if why_not is not None:
                key = f"{name}.{conv_node.target}" if name else conv_node.target
                misses.append((key, f"{why_not}: add + ReLU stay"))
    return misses


def _past_noops(block: nn.Module, node: fx.Node) -> fx.Node | None:
    node = single_user(node)
    while node is not None and node.op == "call_module" and (
        isinstance(block.get_submodule(node.target), _FOLDED) or is_noop(block.get_submodule(node.target))
    ):
        node = single_user(node)
    return node


def _leads_to_add(node: fx.Node) -> bool:
    user = single_user(node)
    return user is not None and add_operands(user) is not None
