"""``resnet-fused bench --per-layer``: every distinct fused conv unit of a model, timed alone.

For each distinct (input shape, weight shape, stride, padding, dilation, groups, ReLU, residual)
that ``convert`` fuses in the chosen model, side by side in interleaved rounds:

- ``fused: <backend>``: the fused op (inference: ``conv_bn_act``; train: ``conv_batch_norm_act``
  with batch statistics, forward + backward);
- ``unfused``: ``conv2d`` → ``batch_norm`` → ``+ residual`` → ``relu`` in eager PyTorch;
- ``conv alone``: ``conv2d`` only: how fast the conv core is, the epilogue's cost being the gap;
- ``frozen`` (CPU inference, fp32/bf16): the conv of ``resnet_fused.freeze`` (folded, packed
  oneDNN weight, post-ops).

With each: the FLOP count (2 per multiply-add; training 3x: forward, input and weight
gradients), the minimum bytes (every tensor the unit must read or write, once: input, weight,
output, residual; training adds the output gradient read, the output re-read for the ReLU mask,
input and weight re-read, and the input, weight and residual gradients written), and the floor:
the time the unit would take at the device's measured matmul and copy peaks,
``max(FLOP / peak FLOP/s, bytes / peak bytes/s)``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .. import functional
from ..convert import convert
from ..nn import FusedConv2d, fuse_conv_bn
from ..tuning import fused_candidates
from .timing import Peaks, Progress, synchronize


@dataclass
class LayerResult:
    name: str  # the first module (in forward order) with this shape
    count: int  # how many modules of the model have it
    input: tuple  # N, C, H, W
    weight: tuple  # K, C/groups, R, S
    stride: tuple
    padding: tuple
    dilation: tuple
    groups: int
    relu: bool
    residual: bool
    flops: float
    min_bytes: float
    floor_s: float
    times: dict[str, float] = field(default_factory=dict)  # variant -> median seconds per call
    auto: str | None = None  # what backend="auto" measures fastest for this unit (tuning.py)
    max_abs_diff: float | None = None  # fused vs unfused (inference)


def layer_shapes(model: nn.Module, batch: int, size: int) -> list[LayerResult]:
    """The distinct fused conv units of ``model`` at ``batch``×3×``size``×``size``, in forward
    order (a batch-1 pass through ``convert(model)`` with pre-hooks on each FusedConv2d)."""
    fused = convert(model.eval(), backend="reference")
    names = {id(m): n for n, m in fused.named_modules()}
    found: dict[tuple, LayerResult] = {}

    def record(module, args, kwargs):
        residual = kwargs.get("residual", args[1] if len(args) > 1 else None)
        x = args[0]
        key = (tuple(x.shape[1:]), tuple(module.weight.shape), tuple(module.stride), tuple(module.padding),
               tuple(module.dilation), module.groups, bool(module.relu), residual is not None)
        if key in found:
            found[key].count += 1
            return
        found[key] = LayerResult(
            name=names.get(id(module), "?"), count=1, input=(batch, *x.shape[1:]), weight=key[1], stride=key[2],
            padding=key[3], dilation=key[4], groups=key[5], relu=key[6], residual=key[7], flops=0.0, min_bytes=0.0,
            floor_s=0.0)

    hooks = [m.register_forward_pre_hook(record, with_kwargs=True) for m in fused.modules() if isinstance(m, FusedConv2d)]
    try:
        with torch.inference_mode():
            fused(torch.zeros(1, 3, size, size))
    finally:
        for h in hooks:
            h.remove()
    return list(found.values())


def _output_shape(layer: LayerResult) -> tuple:
    n, _, h, w = layer.input
    k, _, r, s = layer.weight
    out = [(size + 2 * p - d * (kernel - 1) - 1) // st + 1
           for size, kernel, st, p, d in zip((h, w), (r, s), layer.stride, layer.padding, layer.dilation)]
    return (n, k, *out)


def count(layer: LayerResult, element_size: int, train: bool, peaks: Peaks) -> None:
    """Fill in ``flops``, ``min_bytes`` and ``floor_s``."""
    out = _output_shape(layer)
    n_in, n_w, n_out = (torch.Size(s).numel() for s in (layer.input, layer.weight, out))
    macs = n_out * n_w // layer.weight[0]
    per_channel = 4 * 4 * layer.weight[0]  # mean, var, gamma, beta in fp32
    residual = n_out if layer.residual else 0
    forward = element_size * (n_in + n_w + n_out + residual) + per_channel
    backward = element_size * (2 * n_out + n_in + n_w + n_in + n_w + residual) + per_channel if train else 0
    layer.flops = 2.0 * macs * (3 if train else 1)
    layer.min_bytes = float(forward + backward)
    layer.floor_s = max(layer.flops / peaks.flops, layer.min_bytes / peaks.bytes)


def bench_layers(
    model: nn.Module,
    batch: int,
    size: int,
    device: torch.device,
    dtype: torch.dtype,
    channels_last: bool,
    mode: str,
    peaks: Peaks,
    *,
    backends: list[str] | None = None,
    rounds: int = 5,
    tf32: bool = False,
    progress: Progress | None = None,
) -> list[LayerResult]:
    """Time every distinct fused conv unit of ``model`` (see the module docstring)."""
    train = mode == "train"
    layers = layer_shapes(model, batch, size)
    chosen = backends if backends is not None else fused_candidates(device)
    for i, layer in enumerate(layers):
        if progress:
            progress(i, len(layers), f"per layer: {layer.name} {'x'.join(map(str, layer.input))}")
        count(layer, torch.empty((), dtype=dtype).element_size(), train, peaks)
        variants, check = _variants(layer, device, dtype, channels_last, train, chosen)
        layer.times = _time_interleaved(variants, device, rounds)
        layer.auto = _auto_choice(layer, device, dtype, channels_last, train)
        if check is not None:
            layer.max_abs_diff = check()
    if progress:
        progress(len(layers), len(layers), "per layer: done")
    return layers


def _variants(layer: LayerResult, device, dtype, channels_last: bool, train: bool, backends: list[str]):
    """name -> zero-argument callable, and a fused-vs-unfused check (inference)."""
    g = torch.Generator().manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    k = layer.weight[0]
    fan_in = layer.weight[1] * layer.weight[2] * layer.weight[3]
    x = torch.randn(layer.input, generator=g).to(device, dtype).contiguous(memory_format=fmt)
    w = (torch.randn(layer.weight, generator=g) / fan_in**0.5).to(device, dtype).contiguous(memory_format=fmt)
    mean, var = (torch.randn(k, generator=g) * 0.1).to(device), (torch.rand(k, generator=g) + 0.5).to(device)
    gamma, beta = (torch.rand(k, generator=g) + 0.5).to(device), (torch.randn(k, generator=g) * 0.1).to(device)
    out_shape = _output_shape(layer)
    res = torch.randn(out_shape, generator=g).to(device, dtype).contiguous(memory_format=fmt) if layer.residual else None
    conv = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups)

    def unfused_forward(xi, wi, training):
        y = F.batch_norm(F.conv2d(xi, wi, **conv), mean, var, gamma, beta, training, 0.0 if not training else 0.1, 1e-5)
        y = y + res if res is not None else y
        return torch.relu(y) if layer.relu else y

    variants: dict[str, Callable[[], object]] = {}
    if not train:
        for b in backends:
            variants[f"fused: {b}"] = lambda b=b: functional.conv_bn_act(
                x, w, mean, var, bn_weight=gamma, bn_bias=beta, residual=res, relu=layer.relu, backend=b, **conv)
        variants["unfused"] = lambda: unfused_forward(x, w, False)
        variants["conv alone"] = lambda: F.conv2d(x, w, **conv)
        frozen = _frozen_conv(layer, w, mean, var, gamma, beta, dtype, device)
        if frozen is not None:
            x_cl = x.contiguous(memory_format=torch.channels_last)
            res_cl = res.contiguous(memory_format=torch.channels_last) if res is not None else None
            variants["frozen"] = lambda: frozen(x_cl, res_cl)

        def check() -> float | None:
            if not backends:
                return None
            with torch.inference_mode():
                return (variants[f"fused: {backends[0]}"]().float() - variants["unfused"]().float()).abs().max().item()

        return _no_grad(variants), check

    xg, wg = x.detach().requires_grad_(), w.detach().requires_grad_()
    gamma.requires_grad_()
    beta.requires_grad_()
    grad = torch.randn(out_shape, generator=g).to(device, dtype).contiguous(memory_format=fmt)
    for b in backends:
        variants[f"fused: {b}"] = lambda b=b: functional.conv_batch_norm_act(
            xg, wg, mean, var, training=True, bn_weight=gamma, bn_bias=beta, residual=res,
            relu=layer.relu, backend=b, **conv).backward(grad)
    variants["unfused"] = lambda: unfused_forward(xg, wg, True).backward(grad)
    variants["conv alone"] = lambda: F.conv2d(xg, wg, **conv).backward(grad)
    return variants, None


def _auto_choice(layer: LayerResult, device, dtype, channels_last: bool, train: bool) -> str:
    """The backend ``convert(model)``'s default, "auto", runs this unit with: a FusedConv2d of
    its shape asked for its measured choice (timed now, or the one RESNET_FUSED_TUNE_CACHE
    holds)."""
    conv = nn.Conv2d(layer.input[1], layer.weight[0], layer.weight[2:], layer.stride, layer.padding, layer.dilation,
                     layer.groups, bias=False, device=device, dtype=dtype)
    bn = nn.BatchNorm2d(layer.weight[0], device=device).train(train)
    fused, _ = fuse_conv_bn(conv.train(train), bn, relu=layer.relu, backend="auto")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(layer.input, device=device, dtype=dtype).contiguous(memory_format=fmt).requires_grad_(train)
    residual = torch.randn(_output_shape(layer), device=device, dtype=dtype) if layer.residual else None
    with torch.set_grad_enabled(train):
        return fused.measured_backend(x, fused.weight, residual)


def _no_grad(variants: dict[str, Callable[[], object]]) -> dict[str, Callable[[], object]]:
    def wrap(fn):
        def call():
            with torch.inference_mode():
                return fn()
        return call

    return {name: wrap(fn) for name, fn in variants.items()}


def _frozen_conv(layer: LayerResult, w, mean, var, gamma, beta, dtype, device):
    if device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
        return None
    from ..freeze import FrozenConv2d, mkldnn_usable

    if not mkldnn_usable(dtype):
        return None
    scale = gamma.double() / (var.double() + 1e-5).sqrt()
    weight = w.double() * scale.view(-1, 1, 1, 1)
    bias = beta.double() - mean.double() * scale
    return FrozenConv2d(weight.contiguous(), bias, layer.stride, layer.padding, layer.dilation, layer.groups,
                        layer.relu, dtype)


def _time_interleaved(variants: dict[str, Callable[[], object]], device: torch.device, rounds: int) -> dict[str, float]:
    """Median seconds per call; each sample runs enough calls to last ~10 ms (CPU) or ~2 ms (GPU)."""
    target = 2e-3 if device.type == "cuda" else 1e-2
    reps = {}
    for name, fn in variants.items():
        fn()  # warm-up (oneDNN primitive creation, autotuning, packing)
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        reps[name] = max(1, min(100, round(target / max(time.perf_counter() - start, 1e-6))))
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            synchronize(device)
            start = time.perf_counter()
            for _ in range(reps[name]):
                fn()
            synchronize(device)
            samples[name].append((time.perf_counter() - start) / reps[name])
    return {name: statistics.median(s) for name, s in samples.items()}
