"""The runtime guard: a fused kernel is trusted for a new kind of call only after it has matched
the unfused reference once, on the very inputs of that call.

The kind of call (the key) is the kernel, its backend, the shapes, dtypes and layouts of its
tensor arguments, its other arguments, and the device (with its compute capability). The first
call of each key also runs the reference twice on the same inputs, in the call's dtype (the
unfused PyTorch ops) and in float64 (the exact answer), and applies the project's rule: the fused
error against float64 at most 2x the unfused error, plus a few units in the last place (NaN where
the exact answer has none fails). On a mismatch, or an exception from the kernel, that key runs
the reference for the rest of the process, and one warning names the kernel, the key and the
error. The caller gets the reference's result on that first call too: never a wrong answer.

``RESNET_FUSED_VERIFY``: ``first`` (each key once), ``always`` (every call: a debugging mode),
``off``. Unset: ``first`` for the backends whose registry record asks for it (the GPU ones,
which run on chips this project may never have seen), ``off`` for ``cpu`` and ``reference``.
Verification is skipped while torch.compile traces (its comparisons would break the graph).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import warnings
from collections.abc import Callable, Sequence

import torch

MODES = ("first", "always", "off")
ULPS = 4  # the floor of the rule, in units of the output dtype's eps times the largest exact value

# key -> True (verified) or False (failed: the reference runs); one process-wide table.
_verdicts: dict[tuple, bool] = {}


class FusedKernelMismatch(UserWarning):
    """A fused kernel disagreed with the reference (or raised); its key now runs the reference."""


def mode(verify_by_default: bool) -> str:
    value = os.environ.get("RESNET_FUSED_VERIFY")
    if value is None or value == "":
        return "first" if verify_by_default else "off"
    if value not in MODES:
        raise ValueError(f"RESNET_FUSED_VERIFY={value!r}: choose one of {', '.join(MODES)}")
    return value


def reset() -> None:
    """Forget every verdict (tests; or after replacing a kernel)."""
    _verdicts.clear()


def _layout(t: torch.Tensor) -> str:
    if t.is_contiguous():
        return "contiguous"
    return "channels_last" if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) else "strided"


@functools.cache
def _capability(device: torch.device) -> tuple[int, int] | None:
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


def _describe(value):
    if isinstance(value, torch.Tensor):
        capability = _capability(value.device)
        return ("tensor", tuple(value.shape), str(value.dtype), _layout(value), value.device.type, capability)
    if isinstance(value, (list, tuple)):
        return tuple(_describe(v) for v in value)
    return value


def _outputs(result) -> list:
    return list(result) if isinstance(result, (tuple, list)) else [result]


def compare(fused, unfused, exact) -> tuple[bool, float, str]:
    """``(ok, ratio, detail)`` of one call's outputs under the rule: ``ratio`` is the largest
    fused error over what the rule allows (ok iff ≤ 1)."""
    worst, detail = 0.0, ""
    for i, (f, u, e) in enumerate(zip(_outputs(fused), _outputs(unfused), _outputs(exact))):
        if not isinstance(e, torch.Tensor):
            continue
        if not isinstance(f, torch.Tensor) or tuple(f.shape) != tuple(e.shape):
            return False, float("inf"), f"output {i}: shape {getattr(f, 'shape', f)} where {tuple(e.shape)} is expected"
        f, u, e = f.double(), u.double(), e.double()
        nan = torch.isnan(e)
        if not torch.equal(torch.isnan(f), nan):
            return False, float("inf"), f"output {i}: NaN where the exact result has none (or the reverse)"
        if e.numel() == 0 or bool(nan.all()):
            continue
        f, u, e = f[~nan], u[~nan], e[~nan]
        scale = e.abs().max().item()
        fused_err, unfused_err = (f - e).abs().max().item(), (u - e).abs().max().item()
        allowed = 2 * unfused_err + ULPS * torch.finfo(_outputs(fused)[i].dtype).eps * scale
        ratio = fused_err / allowed if allowed > 0 else (0.0 if fused_err == 0 else float("inf"))
        if ratio > worst:
            worst = ratio
            detail = (f"output {i}: error {fused_err:.3g} against float64 where the unfused ops err by "
                      f"{unfused_err:.3g} (allowed {allowed:.3g})")
    return worst <= 1.0, worst, detail


def _float64(value):
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.detach().to(torch.float64, copy=True)
    if isinstance(value, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in value):
        return type(value)(_float64(v) for v in value)
    return value


def guarded(kernel: str, backend: str, verify_by_default: bool, fused: Callable, reference: Callable,
            mutated: Sequence[int] = ()) -> Callable:
    """``fused`` under the guard. ``reference`` takes the same arguments (the reference backend's
    piece); ``mutated``: indices of the arguments the op writes in place (its outputs then)."""

    def call(*args):
        if torch.compiler.is_compiling():
            return fused(*args)
        policy = mode(verify_by_default)
        if policy == "off":
            return fused(*args)
        key = (kernel, backend, _describe(args))
        verdict = _verdicts.get(key)
        if verdict is False:
            return reference(*args)
        if verdict is True and policy == "first":
            return fused(*args)
        return _verify(key, kernel, backend, fused, reference, mutated, args)

    return call


def _verify(key, kernel, backend, fused, reference, mutated, args):
    with torch.no_grad():
        own = [a.detach().clone() if i in mutated else a for i, a in enumerate(args)]
        exact_args = [_float64(a) for a in args]
        unfused = reference(*own)
        exact = reference(*exact_args)
        try:
            result = fused(*args)
        except Exception as error:  # noqa: BLE001  (any failure of the kernel means: use the reference)
            return _fall_back(key, kernel, backend, args, own, mutated, unfused, f"{type(error).__name__}: {error}")
        if mutated:
            result_outputs = [args[i] for i in mutated]
            ok, _, detail = compare(result_outputs, [own[i] for i in mutated], [exact_args[i] for i in mutated])
        else:
            ok, _, detail = compare(result, unfused, exact)
        if not ok:
            return _fall_back(key, kernel, backend, args, own, mutated, unfused, detail)
    _verdicts[key] = True
    return result


def _fall_back(key, kernel, backend, args, own, mutated, unfused, detail):
    _verdicts[key] = False
    for i in mutated:  # the caller's tensors get the reference's update, not the kernel's
        args[i].copy_(own[i])
    shapes = ", ".join(f"{tuple(a.shape)} {str(a.dtype).removeprefix('torch.')}" for a in args
                       if isinstance(a, torch.Tensor))
    device = next((a.device for a in args if isinstance(a, torch.Tensor)), "?")
    warnings.warn(
        f"resnet_fused: the {backend} kernel {kernel} disagreed with the reference on {device} for "
        f"({shapes}): {detail}. Calls of this shape run the unfused PyTorch ops for the rest of the "
        "process (RESNET_FUSED_VERIFY, README 'Runtime guard').",
        FusedKernelMismatch, stacklevel=3,
    )
    return unfused


def guard_backend(record, reference_record):
    """``record`` with its inference op and training kernels under the guard."""
    default = record.verify_by_default
    inference = guarded("conv_bn_act", record.name, default, record.inference, reference_record.inference)

    def kernels():
        fused, exact = record.kernels(), reference_record.kernels()
        mutated = {"update_running_stats": (0, 1)}
        return dataclasses.replace(fused, **{
            field.name: guarded(field.name, record.name, default, getattr(fused, field.name),
                                getattr(exact, field.name), mutated.get(field.name, ()))
            for field in dataclasses.fields(fused)
        })

    return dataclasses.replace(record, inference=inference, kernels=kernels)
