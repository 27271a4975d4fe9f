"""pytest-benchmark suite: one ResNet conv stage, eager unfused vs each fused backend.

Not part of the test suite (it asserts nothing about speed); run it with
    pytest benchmarks --benchmark-group-by=param:shape --benchmark-columns=median,ops
on the machine of interest: the GPU (fp16, the fastest fused backend there) when there is one,
else the CPU (fp32, the C++ op).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import resnet_fused
from resnet_fused.bench import fused_backends_for

# ResNet-18/50 conv shapes at batch 8: (C, H, W, K, kernel, stride, residual)
SHAPES = {
    "stage1-3x3": (64, 56, 56, 64, 3, 1, True),
    "stage2-3x3-s2": (64, 56, 56, 128, 3, 2, False),
    "stage3-1x1": (256, 14, 14, 1024, 1, 1, True),
    "stage4-3x3": (512, 7, 7, 512, 3, 1, True),
}


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


@pytest.mark.parametrize("variant", ["eager", "fused"])
@pytest.mark.parametrize("shape", SHAPES)
def test_conv_bn_act_speed(benchmark, shape, variant):
    device, dtype = device_and_dtype()
    x, weight, (mean, var, gamma, beta), residual, conv = operands(SHAPES[shape], device, dtype)
    backend = next(iter(fused_backends_for(device)), None)  # decided at run time, not collection
    if variant == "fused" and backend is None:
        pytest.skip(f"no fused backend for {device}")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def eager():
        y = F.batch_norm(F.conv2d(x, weight, **conv), mean, var, gamma, beta, False, 0.0, 1e-5)
        y = y + residual if residual is not None else y
        out = torch.relu(y)
        sync()
        return out

    def fused():
        out = resnet_fused.conv_bn_act(x, weight, mean, var, bn_weight=gamma, bn_bias=beta, residual=residual,
                                       backend=backend, **conv)
        sync()
        return out

    with torch.inference_mode():
        benchmark.extra_info["backend"] = backend if variant == "fused" else "eager"
        benchmark(eager if variant == "eager" else fused)


@pytest.mark.parametrize("variant", ["eager", "fused"])
@pytest.mark.parametrize("shape", SHAPES)
def test_conv_bn_act_train_speed(benchmark, shape, variant):
    """Forward (batch statistics, running-stat update) and backward of one training unit."""
    device, dtype = device_and_dtype()
    x, weight, (mean, var, gamma, beta), residual, conv = operands(SHAPES[shape], device, dtype)
    backend = next(iter(fused_backends_for(device)), None)
    if variant == "fused" and backend is None:
        pytest.skip(f"no fused backend for {device}")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for t in (x, weight, gamma, beta):
        t.requires_grad_()
    grad = torch.randn_like(F.conv2d(x.detach(), weight.detach(), **conv))

    def eager():
        y = F.batch_norm(F.conv2d(x, weight, **conv), mean, var, gamma, beta, True, 0.1, 1e-5)
        out = torch.relu(y + residual if residual is not None else y)
        out.backward(grad)
        sync()

    def fused():
        out = resnet_fused.conv_batch_norm_act(
            x, weight, mean, var, training=True, bn_weight=gamma, bn_bias=beta, residual=residual,
            backend=backend, **conv)
        out.backward(grad)
        sync()

    benchmark.extra_info["backend"] = backend if variant == "fused" else "eager"
    benchmark(eager if variant == "eager" else fused)
