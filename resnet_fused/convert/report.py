"""What ``convert`` fused, with which backend, and why each place it left alone stayed unfused.

``convert(model, report=True)`` returns ``(model, ConversionReport)``; ``print(report)`` gives a
one-screen summary. The reasons are the ones the passes gave when they decided (chains.py,
residual.py); this module counts and formats, it never re-derives a rule.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from torch import nn

from ..linear_norm import FusedLinearNorm
from ..norm_act import FusedBatchNormAct2d
from ..nn import FOLDED, FusedConv2d, has_hooks, is_plain_batch_norm, norm_act_activation, timm_norm_act_types
from ..ops.activation import Kind
from .chains import is_norm


@dataclass
class ConversionReport:
    backend: str
    convs_fused: int = 0  # conv + BatchNorm pairs now one op
    # activation module class name → how many a fused conv's epilogue applies (not counting the
    # ReLUs after residual adds)
    activations_fused: Counter = field(default_factory=Counter)
    residuals_fused: int = 0  # add + ReLU pairs applied in a fused conv's epilogue
    norm_acts_fused: int = 0  # BatchNorm + activation pairs with no conv, now one op (FusedBatchNormAct2d)
    linear_norms_fused: int = 0  # Linear + BatchNorm1d pairs, now one op (FusedLinearNorm)
    unfused: list[tuple[str, str]] = field(default_factory=list)  # (module name, reason)

    def __str__(self) -> str:
        kinds = ", ".join(f"{count} {name}" for name, count in sorted(self.activations_fused.items()))
        lines = [
            f"resnet_fused.convert (backend={self.backend!r}): {self.convs_fused} conv+BatchNorm fused, "
            f"{sum(self.activations_fused.values())} activations fused{f' ({kinds})' if kinds else ''}, "
            f"{self.residuals_fused} residual add+ReLU fused, {self.norm_acts_fused} BatchNorm+activation fused "
            f"without a conv, {self.linear_norms_fused} Linear+BatchNorm1d fused",
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


def build_report(model: nn.Module, backend: str, conv_reasons: dict[str, str],
                 residual_misses: list[tuple[str, str]]) -> ConversionReport:
    """``conv_reasons``: conv name → why the chain pass left it; ``residual_misses``: (fused
    conv name, why its add + ReLU stays) from the residual pass."""
    report = ConversionReport(backend)
    in_fused = {id(m.bn) for m in model.modules() if isinstance(m, FusedLinearNorm)}
    for name, module in model.named_modules():
        if isinstance(module, FusedConv2d):
            report.convs_fused += 1
            if module.residual_fused:
                report.residuals_fused += 1
            elif module.act.kind != Kind.IDENTITY:
                report.activations_fused[type(module.act.to_module()).__name__] += 1
        elif isinstance(module, FusedBatchNormAct2d):
            report.norm_acts_fused += 1
        elif isinstance(module, FusedLinearNorm):
            report.linear_norms_fused += 1
        elif id(module) in in_fused:
            continue
        elif isinstance(module, nn.Conv2d):
            report.unfused.append((name, conv_reasons.get(name, "not called by any forward convert could trace")))
        elif is_norm(module) and not isinstance(module, FOLDED):
            reason = "not a plain nn.BatchNorm2d (a subclass or another norm may compute something else)"
            if type(module) in timm_norm_act_types().values():
                reason = _norm_act_reason(module)
            elif is_plain_batch_norm(module):
                reason = "has hooks" if has_hooks(module) else _lone_reason(type(module) is nn.BatchNorm2d)
            report.unfused.append((name, f"{type(module).__name__} {reason}"))
    report.unfused += [(name, f"{reason}: add + ReLU stay") for name, reason in residual_misses]
    return report


def _norm_act_reason(module: nn.Module) -> str:
    """Why one of timm's norm + activation modules stays (nn.norm_act_activation's rules, spelled out)."""
    drop, act = getattr(module, "drop", None), getattr(module, "act", None)
    if has_hooks(module) or any(part is not None and has_hooks(part) for part in (drop, act)):
        return "has hooks (on itself, its drop or its act)"
    if drop is not None and type(drop) is not nn.Identity:
        return f"applies {type(drop).__name__} before its activation"
    if norm_act_activation(module) is None:
        return (f"applies {type(act).__name__} (a fused conv applies nn.ReLU, ReLU6, Hardtanh, LeakyReLU, SiLU, "
                "Hardswish, GELU or nothing)")
    return _lone_reason(type(module) is timm_norm_act_types().get("BatchNormAct2d"))


def _lone_reason(pairs_with_activation: bool) -> str:
    """Why a norm that no conv feeds stays: only BatchNorm2d and BatchNormAct2d pair with the
    activation after them (FusedBatchNormAct2d)."""
    if pairs_with_activation:
        return ("no conv feeds it directly and no activation follows it that a fused op applies (in both modes, "
                "its output used only there, as a module it can fold), or its parent's forward cannot be traced "
                "or calls it another way")
    return "no conv feeds it directly (a synchronized or frozen norm is fused only after a conv)"
