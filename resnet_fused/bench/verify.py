"""``resnet-fused verify``: every fused backend on this device against the reference, over the
distinct conv units of ResNet-50, in each dtype, as the eval op and as the training unit
(forward and backward), with the fused/unfused time of each. The judge is the runtime guard's
rule (guard.compare): the fused error against float64 at most 2x the unfused error in the same
dtype, plus a few ulps. The guard itself is off while this runs, so nothing is hidden by a
fallback.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass

import torch

from .. import backends, functional, guard
from ..ops import reference
from ..ops.shapes import output_size
from ..tuning import fused_candidates
from .timing import synchronize
from .zoo import MIN_BN_VALUES

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Check:
    backend: str
    unit: str  # "<first module name> <K>x<C>x<R>x<S>/s<stride>"
    dtype: str
    mode: str  # "eval" or "train"
    ok: bool
    ratio: float  # fused error / allowed error (ok iff <= 1)
    detail: str
    fused_ms: float
    unfused_ms: float
    skipped: bool = False


def resnet50_units(batch: int, size: int):
    """The distinct fused conv units of torchvision's ResNet-50 (bench/layers.py)."""
    import torchvision

    from .layers import layer_shapes

    return layer_shapes(torchvision.models.resnet50(), batch, size)


def _inputs(unit, dtype: torch.dtype, device: torch.device, channels_last: bool, generator: torch.Generator):
    def rand(*shape, scale=1.0, shift=0.0):
        return (torch.rand(*shape, generator=generator) * scale + shift).to(device)

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    k, c = unit.weight[0], unit.weight[1] * unit.groups
    x = torch.randn(*unit.input, generator=generator).to(device, dtype).contiguous(memory_format=fmt)
    weight = (torch.randn(*unit.weight, generator=generator) / (c * unit.weight[2] * unit.weight[3] / unit.groups) ** 0.5)
    weight = weight.to(device, dtype).contiguous(memory_format=fmt)
    bn = dict(bn_weight=rand(k, shift=0.5), bn_bias=rand(k, scale=0.6, shift=-0.3), running_mean=rand(k, scale=0.6, shift=-0.3),
              running_var=rand(k, scale=1.5, shift=0.5))
    shape = (unit.input[0], k, *(output_size(s, r, st, p, d) for s, r, st, p, d in
                                 zip(unit.input[2:], unit.weight[2:], unit.stride, unit.padding, unit.dilation)))
    residual = torch.randn(*shape, generator=generator).to(device, dtype).contiguous(memory_format=fmt) \
        if unit.residual else None
    grad = torch.randn(*shape, generator=generator).to(device)  # dL/d out of the training checks
    return x, weight, bn, residual, grad


def _eval(fn, x, weight, bn, residual, unit):
    return fn(x, weight, bn["running_mean"], bn["running_var"], bn_weight=bn["bn_weight"], bn_bias=bn["bn_bias"],
              residual=residual, stride=unit.stride, padding=unit.padding, dilation=unit.dilation,
              groups=unit.groups, relu=unit.relu)


def _fused_eval(backend):
    return lambda *a, **k: functional.conv_bn_act(*a, **k, backend=backend)


def _reference_eval(x, weight, mean, var, **k):
    return reference.conv_bn_act(x, weight, None, k.pop("bn_weight"), k.pop("bn_bias"), mean, var, **k)


def _train(backend, x, weight, bn, residual, unit, grad):
    """Forward + backward of the training unit (batch statistics); returns out and the gradients
    of x, weight, γ, β (and the residual). ``backend`` None: the unfused PyTorch ops."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bn["bn_weight"], bn["bn_bias"])]
    res = residual.detach().clone().requires_grad_() if residual is not None else None
    conv = dict(stride=unit.stride, padding=unit.padding, dilation=unit.dilation, groups=unit.groups, relu=unit.relu)
    mean, var = bn["running_mean"].clone(), bn["running_var"].clone()
    if backend is None:
        out = reference.conv_bn_act(leaves[0], leaves[1], None, leaves[2], leaves[3], mean, var, training=True,
                                    residual=res, **conv)
    else:
        out = functional.conv_batch_norm_act(leaves[0], leaves[1], mean, var, training=True, bn_weight=leaves[2],
                                             bn_bias=leaves[3], residual=res, backend=backend, **conv)
    out.backward(grad.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves] + ([res.grad] if res is not None else [])


def _time(fn, device: torch.device, reps: int) -> float:
    fn()
    samples = []
    for _ in range(reps):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


def _float64(t):
    return t.double() if isinstance(t, torch.Tensor) else t


def run_verify(device: torch.device, dtypes: list[str], backend_names: list[str] | None, batch: int, size: int,
               channels_last: bool = True, reps: int = 3, progress=None) -> list[Check]:
    chosen = backend_names if backend_names is not None else fused_candidates(device)
    for name in chosen:
        if not backends.get(name).runs_on(device):
            raise ValueError(f"backend {name!r} cannot run on {device}: {backends.REGISTRY[name].why_not}")
    units = resnet50_units(batch, size)
    saved = os.environ.get("RESNET_FUSED_VERIFY")
    os.environ["RESNET_FUSED_VERIFY"] = "off"  # judge the kernels themselves, not their fallback
    checks = []
    try:
        for name in chosen:
            for dtype_name in dtypes:
                for unit in units:
                    for mode in ("eval", "train"):
                        checks.append(_check(name, unit, dtype_name, mode, device, channels_last, reps))
                        if progress:
                            progress(checks[-1])
    finally:
        if saved is None:
            os.environ.pop("RESNET_FUSED_VERIFY", None)
        else:
            os.environ["RESNET_FUSED_VERIFY"] = saved
    return checks


def _check(backend, unit, dtype_name, mode, device, channels_last, reps) -> Check:
    dtype = DTYPES[dtype_name]
    generator = torch.Generator().manual_seed(0)
    x, weight, bn, residual, grad = _inputs(unit, dtype, device, channels_last, generator)
    label = f"{unit.name} {'x'.join(map(str, unit.weight))}/s{unit.stride[0]}"
    exact_bn = {k: v.double() for k, v in bn.items()}
    if mode == "train" and grad[0, 0].numel() * grad.shape[0] < MIN_BN_VALUES:
        # With one value per channel there are no batch statistics; with a few, x - mean is
        # rounding noise of the conv, which normalization scales up (zoo.py measured it).
        return Check(backend, label, dtype_name, mode, True, 0.0,
                     f"fewer than {MIN_BN_VALUES} values per channel: batch statistics too ill-conditioned to judge",
                     float("nan"), float("nan"), skipped=True)
    try:
        if mode == "eval":
            with torch.inference_mode():
                fused = lambda: _eval(_fused_eval(backend), x, weight, bn, residual, unit)  # noqa: E731
                unfused = lambda: _eval(_reference_eval, x, weight, bn, residual, unit)  # noqa: E731
                ok, ratio, detail = guard.compare(
                    fused(), unfused(), _eval(_reference_eval, x.double(), weight.double(), exact_bn,
                                              _float64(residual), unit))
                times = _time(fused, device, reps), _time(unfused, device, reps)
        else:
            fused = lambda: _train(backend, x, weight, bn, residual, unit, grad)  # noqa: E731
            unfused = lambda: _train(None, x, weight, bn, residual, unit, grad)  # noqa: E731
            exact = _train(None, x.double(), weight.double(), exact_bn, _float64(residual), unit, grad.double())
            ok, ratio, detail = guard.compare(fused(), unfused(), exact)
            times = _time(fused, device, reps), _time(unfused, device, reps)
    except Exception as error:  # noqa: BLE001  (a kernel that raises is a failed check, reported as such)
        return Check(backend, label, dtype_name, mode, False, float("inf"), f"{type(error).__name__}: {error}",
                     float("nan"), float("nan"))
    return Check(backend, label, dtype_name, mode, ok, ratio, detail, *times)
