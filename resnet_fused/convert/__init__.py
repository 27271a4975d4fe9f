"""``convert(model)``: swap fused modules into an existing model, keeping its state_dict.

The passes, each in its own module, over one set of traces (``tracing.Traces``: every forward
traced at most once per mode per conversion):
1. torchvision ``BasicBlock``/``Bottleneck`` (exact classes, whose forward we know) become
   ``FusedBasicBlock``/``FusedBottleneck``: the residual add + ReLU ride in the last conv.
2. ``chains``: anywhere else, a Conv2d → BatchNorm2d (→ ReLU) chain that the parent's forward
   shows in eval and train mode alike. A parent that cannot be traced is left as it is — a
   missed fusion, never a wrong answer.
3. ``norm_act``: a BatchNorm2d no conv absorbed, followed by an activation (pre-activation
   networks; timm's BatchNormAct2d after a concat or an add), becomes ``FusedBatchNormAct2d``.
4. ``residual``: in blocks of any class, ``fused conv → add(other) → ReLU`` into the conv.
5. ``linear_norm``: timm LeViT's ``LinearNorm`` (exact class: Linear → BatchNorm1d over the
   tokens) becomes ``FusedLinearNorm``, a 1x1 conv unit on the tokens.
Each pass returns what it left alone and why; ``report`` only formats those decisions.

Only plain modules are fused: exactly nn.Conv2d (zero padding given as numbers) and exactly
nn.BatchNorm2d, without hooks or parametrizations; subclasses (frozen, synchronized or
weight-standardized variants) may compute something else. What tracing cannot see, Python side
effects in a forward (appending an intermediate tensor to a list), is not covered.
"""

from __future__ import annotations

import copy
from collections import Counter

from torch import nn

from .. import backends
from ..nn import FusedBasicBlock, FusedBottleneck, has_hooks, is_plain_batch_norm, is_plain_conv, norm_features
from .chains import fuse_chains
from .linear_norm import fuse_linear_norms
from .norm_act import fuse_norm_acts
from .report import ConversionReport, build_report
from .residual import fuse_residuals, may_hold_residual
from .tracing import Traces

__all__ = ["ConversionReport", "convert"]


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
    conv_reasons: dict[str, str] = {}
    residual_misses: list[tuple[str, str]] = []
    if type(model) in blocks and _block_is_plain(model, shared):
        model = blocks[type(model)](model, backend)
    else:
        _replace_blocks(model, blocks, shared, backend)
        traces = Traces()
        for name, parent in list(model.named_modules()):
            outer = traces.seen_by_ancestors(model, name)
            for target, reason in fuse_chains(parent, shared, backend, traces, outer).items():
                # The outermost forward that calls the conv says why (it traces through the
                # Sequentials below it); a later pass over one of those may still fuse it, if
                # that forward could not be traced.
                conv_reasons.setdefault(_join(name, target), reason)
        for name, parent in list(model.named_modules()):
            fuse_norm_acts(parent, shared, backend, traces, traces.seen_by_ancestors(model, name))
        for name, block in list(model.named_modules()):
            if may_hold_residual(block):
                residual_misses += [(_join(name, target), reason) for target, reason in fuse_residuals(block, traces)]
        fuse_linear_norms(model, shared, backend)
    return (model, build_report(model, backend, conv_reasons, residual_misses)) if report else model


def _join(prefix: str, target: str) -> str:
    return f"{prefix}.{target}" if prefix else target


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
        and all(is_plain_batch_norm(b) and norm_features(b) == c.out_channels for b, c in zip(norms, convs))
        and type(block.relu) is nn.ReLU
        and not has_hooks(block.relu)
    )
