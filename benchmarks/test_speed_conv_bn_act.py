"""pytest-benchmark suite: one ResNet conv unit per stage, every fused backend against the
reference (the unfused PyTorch ops), inference and training.

Not part of the test suite (it asserts nothing about speed). Run it on the machine of interest:
the GPU (fp16) when there is one, else the CPU (fp32):

    pytest benchmarks --benchmark-only --benchmark-columns=median,ops --benchmark-save=NAME
    pytest benchmarks --benchmark-only --benchmark-compare=NAME      # a later run against it

Each benchmark's group is ``<mode>:<shape>`` (pytest-benchmark groups by it by default), so a
table holds one unit's reference and backends side by side, and test names are stable across
machines for ``--benchmark-compare``: ``test_conv_bn_act_speed[stage1-3x3-cpu]``. Variants are listed
statically and skipped at run time where they cannot run (no GPU query at collection):
``reference``, ``triton``, ``cuda``, ``cpu`` and, for CPU inference, ``frozen`` (the conv of
``resnet_fused.freeze``: BatchNorm folded, oneDNN-packed weight, post-ops).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import resnet_fused
from resnet_fused.bench.models import fused_backends_for

# ResNet-18/50 conv shapes at batch 8: (C, H, W, K, kernel, stride, residual)
SHAPES = {
    "stage1-3x3": (64, 56, 56, 64, 3, 1, True),
    "stage2-3x3-s2": (64, 56, 56, 128, 3, 2, False),
    "stage3-1x1": (256, 14, 14, 1024, 1, 1, True),
    "stage4-3x3": (512, 7, 7, 512, 3, 1, True),
}
VARIANTS = ["reference", "triton", "cuda", "cpu"]


def operands(shape, device, dtype):
    c, h, w, k, ks, stride, with_residual = shape
    g = torch.Generator().manual_seed(0)
    fmt = torch.channels_last
    x = torch.randn(8, c, h, w, generator=g).to(device, dtype).contiguous(memory_format=fmt)
    weight = (torch.randn(k, c, ks, ks, generator=g) / (c * ks * ks) ** 0.5).to(device, dtype).contiguous(memory_format=fmt)
    bn = [t.to(device) for t in (torch.randn(k, generator=g) * 0.1, torch.rand(k, generator=g) + 0.5,
                                  torch.rand(k, generator=g) + 0.5, torch.randn(k, generator=g) * 0.1)]
    conv = {"stride": stride, "padding": ks // 2}
    out_shape = F.conv2d(x, weight, **conv).shape
    residual = torch.randn(out_shape, generator=g).to(device, dtype).contiguous(memory_format=fmt) if with_residual else None
    return x, weight, bn, residual, conv


def device_and_dtype():
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.float16
    return torch.device("cpu"), torch.float32


def _backend_or_skip(variant: str, device: torch.device) -> str:
    if variant != "reference" and variant not in fused_backends_for(device):
        pytest.skip(f"backend {variant!r} does not run on {device.type} here")
    return variant


@pytest.mark.parametrize("variant", [*VARIANTS, "frozen"])
@pytest.mark.parametrize("shape", SHAPES)
def test_conv_bn_act_speed(benchmark, shape, variant):
    """Inference unit: relu(bn(conv(x)) [+ residual]), BatchNorm from running statistics."""
    device, dtype = device_and_dtype()
    x, weight, (mean, var, gamma, beta), residual, conv = operands(SHAPES[shape], device, dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    benchmark.group = f"infer:{shape}"
    if variant == "frozen":
        fn = _frozen_unit(device, dtype, x, weight, (mean, var, gamma, beta), residual, conv)
    else:
        backend = _backend_or_skip(variant, device)

        def fn():
            return resnet_fused.conv_bn_act(x, weight, mean, var, bn_weight=gamma, bn_bias=beta, residual=residual,
                                            backend=backend, **conv)

    def run():
        out = fn()
        sync()
        return out

    benchmark.extra_info.update(variant=variant, device=device.type, dtype=str(dtype).removeprefix("torch."))
    with torch.inference_mode():
        benchmark(run)


def _frozen_unit(device, dtype, x, weight, bn, residual, conv):
    from resnet_fused.freeze import FrozenConv2d, mkldnn_usable

    if device.type != "cpu" or not mkldnn_usable(dtype):
        pytest.skip("frozen: CPU inference with the oneDNN ops only")
    mean, var, gamma, beta = bn
    scale = gamma.double() / (var.double() + 1e-5).sqrt()
    frozen = FrozenConv2d((weight.double() * scale.view(-1, 1, 1, 1)).contiguous(), beta.double() - mean.double() * scale,
                          [conv["stride"]] * 2, [conv["padding"]] * 2, [1, 1], 1, True, dtype)
    return lambda: frozen(x, residual)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_conv_bn_act_train_speed(benchmark, shape, variant):
    """Training unit, forward (batch statistics, running-stat update) and backward."""
    device, dtype = device_and_dtype()
    x, weight, (mean, var, gamma, beta), residual, conv = operands(SHAPES[shape], device, dtype)
    backend = _backend_or_skip(variant, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for t in (x, weight, gamma, beta):
        t.requires_grad_()
    grad = torch.randn_like(F.conv2d(x.detach(), weight.detach(), **conv))

    def run():
        out = resnet_fused.conv_batch_norm_act(
            x, weight, mean, var, training=True, bn_weight=gamma, bn_bias=beta, residual=residual,
            backend=backend, **conv)
        out.backward(grad)
        sync()

    benchmark.group = f"train:{shape}"
    benchmark.extra_info.update(variant=variant, device=device.type, dtype=str(dtype).removeprefix("torch."))
    benchmark(run)
