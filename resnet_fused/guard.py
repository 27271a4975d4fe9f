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
_rejected: set[tuple[str, str]] = set()  # (kernel, backend) with any failed key: torch.compile avoids them


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
    _rejected.clear()


_ATOMS = frozenset((int, bool, str, type(None)))  # described as themselves, the common case first


@functools.cache
def _capability(device_index: int) -> tuple[int, int] | None:
    return torch.cuda.get_device_capability(device_index) if device_index >= 0 else None


def _describe(value):
    """A tensor by shape, dtype, strides, 16-byte alignment and device (what kernels specialize
    on); a float by its kind only (eps, momentum and momentum=None's 1/step change no code, and
    1/step would make a new key every step); anything else as it is. Paid on every guarded call,
    so kept to cheap attribute reads (torch.Size hashes as it is; ``get_device()`` is an int, -1
    on the CPU; a CUDA device's capability is added once per key, by ``_key``)."""
    kind = type(value)
    if kind in _ATOMS:
        return value
    if kind is float:
        return float
    if isinstance(value, torch.Tensor):
        return value.shape, value.dtype, value.stride(), value.data_ptr() % 16 == 0, value.get_device()
    if isinstance(value, (list, tuple)):
        return tuple(_describe(v) for v in value)
    return float if isinstance(value, float) else value


def _key(kernel: str, backend: str, args: tuple) -> tuple:
    """The kind of call: kernel, backend, the arguments described, and the compute capability of
    the first tensor's device (the GPU model a kernel was checked on)."""
    device = next((a.get_device() for a in args if isinstance(a, torch.Tensor)), -1)
    return kernel, backend, _describe(args), _capability(device)


def _outputs(result) -> list:
    return list(result) if isinstance(result, (tuple, list)) else [result]


def compare(fused, unfused, exact) -> tuple[bool, float, str]:
    """``(ok, ratio, detail)`` of one call's outputs under the rule: ``ratio`` is the largest
    fused error over what the rule allows (ok iff ≤ 1). The outputs must agree in number, shape
    and dtype; non-finite exact values (inf, NaN) must be matched exactly; the errors are taken
    over the finite ones, and where the unfused computation itself overflowed (an infinite error)
    it bounds nothing: the fused result must then be within a few ulps."""
    fused_list, unfused_list, exact_list = _outputs(fused), _outputs(unfused), _outputs(exact)
    if len(fused_list) != len(exact_list):
        return False, float("inf"), f"{len(fused_list)} outputs where {len(exact_list)} are expected"
    worst, detail = 0.0, ""
    for i, (f, u, e) in enumerate(zip(fused_list, unfused_list, exact_list)):
        if not isinstance(e, torch.Tensor):
            continue
        if not isinstance(f, torch.Tensor) or tuple(f.shape) != tuple(e.shape) or f.dtype != u.dtype:
            return False, float("inf"), (f"output {i}: {getattr(f, 'dtype', type(f).__name__)} "
                                         f"{tuple(getattr(f, 'shape', ()))} where {u.dtype} {tuple(e.shape)} is expected")
        dtype = f.dtype
        f, u, e = f.double(), u.double(), e.double()
        finite = torch.isfinite(e)
        if not torch.equal(f[~finite].nan_to_num(nan=0.5), e[~finite].nan_to_num(nan=0.5)) or \
                not bool(torch.isfinite(f[finite]).all()):
            return False, float("inf"), f"output {i}: inf or NaN where the exact result has none (or the reverse)"
        if not bool(finite.any()):
            continue
        f, u, e = f[finite], u[finite], e[finite]
        scale = e.abs().max().item()
        fused_err = (f - e).abs().max().item()
        unfused_err = (u - e).abs().max().item()
        if unfused_err != unfused_err or unfused_err == float("inf"):
            unfused_err = 0.0  # the unfused ops overflowed: they bound nothing
        allowed = 2 * unfused_err + ULPS * torch.finfo(dtype).eps * scale
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
            # No comparison inside a graph (it would break it), and no key (fake tensors have
            # no data): a kernel that failed any eager check is not traced in at all.
            return reference(*args) if (kernel, backend) in _rejected else fused(*args)
        policy = mode(verify_by_default)
        if policy == "off":
            return fused(*args)
        key = _key(kernel, backend, args)
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
    # The kernel gets copies of what it may only read: one that writes into an input fails.
    inputs = [(i, a, a.detach().clone()) for i, a in enumerate(args)
              if isinstance(a, torch.Tensor) and i not in mutated]
    try:
        result = fused(*args)  # with autograd as the caller has it
    except Exception as error:  # noqa: BLE001  (any failure of the kernel means: use the reference)
        return _fall_back(key, kernel, backend, args, own, mutated, reference, f"{type(error).__name__}: {error}")
    with torch.no_grad():
        written = [i for i, a, before in inputs if not _unchanged(a.detach(), before)]
        if written:
            for i, a, before in inputs:
                a.detach().copy_(before)
            ok, detail = False, f"the kernel wrote into its input(s) {written}"
        elif mutated:
            ok, _, detail = compare([args[i] for i in mutated], [own[i] for i in mutated],
                                    [exact_args[i] for i in mutated])
        else:
            ok, _, detail = compare(result, unfused, exact)
    if not ok:
        return _fall_back(key, kernel, backend, args, own, mutated, reference, detail)
    _verdicts[key] = True
    return result


def _unchanged(after: torch.Tensor, before: torch.Tensor) -> bool:
    if not after.is_floating_point():
        return torch.equal(after, before)
    return torch.equal(after.isnan(), before.isnan()) and torch.equal(after.nan_to_num(), before.nan_to_num())


def _fall_back(key, kernel, backend, args, own, mutated, reference, detail):
    _verdicts[key] = False
    _rejected.add((kernel, backend))
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
    # The reference once more, with autograd as the caller has it (the answer of the verifying
    # run was computed without); in-place ops are done (their update was restored above).
    return None if mutated else reference(*args)


def guard_backend(record, reference_record):
    """``record`` with its inference op and training kernels under the guard."""
    default = record.verify_by_default
    inference = guarded("conv_bn_act", record.name, default, record.inference, reference_record.inference)

    made = []  # the guarded Kernels, built on first use (the kernel modules load then) and kept

    def kernels():
        if not made:
            fused, exact = record.kernels(), reference_record.kernels()
            mutated = {"update_running_stats": (0, 1)}
            made.append(dataclasses.replace(fused, **{
                field.name: guarded(field.name, record.name, default, getattr(fused, field.name),
                                    getattr(exact, field.name), mutated.get(field.name, ()))
                for field in dataclasses.fields(fused)
            }))
        return made[0]

    return dataclasses.replace(record, inference=inference, kernels=kernels)
