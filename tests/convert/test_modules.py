"""The fused modules convert() builds, at inference: they read the live parameters and buffers,
pickle, keep bf16 and autocast dtypes; on the GPU (marked ``gpu``) whole torchvision ResNets
converted for each GPU backend, against the original model."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models import resnet18, resnet50

import resnet_fused
from helpers import assert_low_precision_close, max_rel_error, pickle_round_trip, randomize_batch_norms


def conv_bn_relu(backend: str, dtype=torch.float32):
    g = torch.Generator().manual_seed(122)
    model = nn.Sequential(nn.Conv2d(5, 7, 3, padding=1, bias=True), nn.BatchNorm2d(7), nn.ReLU())
    randomize_batch_norms(model, g).eval().to(dtype)
    return model, resnet_fused.convert(model, backend=backend)


def test_module_reads_live_parameters_and_buffers(backend):
    """Nothing is folded ahead of time: every kind of change reaches the next call, including
    writes that bypass the version counter (.data) and BN stats updated by a train step."""
    model, converted = conv_bn_relu(backend)
    x = torch.randn(2, 5, 9, 7)

    def check():
        with torch.no_grad():
            torch.testing.assert_close(converted(x), model(x))

    check()
    for change in (
        lambda m: m[1].running_var.mul_(3.0),
        lambda m: m[1].running_mean.data.add_(0.5),
        lambda m: m[1].weight.data.mul_(-1.0),
        lambda m: m[0].weight.data.mul_(0.5),
        lambda m: m[0].bias.data.sub_(0.25),
    ):
        change(model)
        change(converted)
        check()

    for m in (model, converted):  # one train step updates running stats, then back to eval
        m.train()(torch.randn(4, 5, 9, 7, generator=torch.Generator().manual_seed(1)))
        m.eval()
    check()

    state = {k: v + 0.1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    converted.load_state_dict(state)
    check()


def test_whole_converted_model_pickles_after_use():
    _, converted = conv_bn_relu("cpu")
    x = torch.randn(1, 5, 6, 6)
    with torch.no_grad():
        expected = converted(x)
    loaded = pickle_round_trip(converted)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected)


def test_bf16_model_and_autocast():
    model, converted = conv_bn_relu("cpu", torch.bfloat16)
    x = torch.randn(2, 5, 9, 7)
    with torch.no_grad():
        fused_out = converted(x.to(torch.bfloat16))
        unfused = model(x.to(torch.bfloat16))
        exact = model.double()(x.double())
    assert_low_precision_close(fused_out, unfused, exact)

    model, converted = conv_bn_relu("cpu")
    exact = model.double()(x.double())
    model.float()
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        fused_out, unfused = converted(x), model(x)  # conv in bf16, BN with fp32 parameters
    assert fused_out.dtype == unfused.dtype == torch.bfloat16
    assert_low_precision_close(fused_out, unfused, exact)


# --- on the GPU: torchvision ResNets ----------------------------------------------------------


@pytest.mark.backends(devices=("cuda",))
@pytest.mark.parametrize("factory", [resnet18, resnet50], ids=["resnet18", "resnet50"])
def test_converted_resnet_fp32(factory, backend, device):
    torch.manual_seed(1)
    model = randomize_batch_norms(factory(), torch.Generator().manual_seed(1)).eval().to(device)
    converted = resnet_fused.convert(model, backend=backend)
    x = torch.randn(4, 3, 96, 96, device=device)
    with torch.inference_mode():
        assert max_rel_error(converted(x), model(x)) < 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_converted_resnet50_half_channels_last(dtype):
    torch.manual_seed(2)
    model = randomize_batch_norms(resnet50(), torch.Generator().manual_seed(2)).eval().cuda()
    x = torch.randn(8, 3, 128, 128, device="cuda")
    with torch.inference_mode():
        exact = model.double()(x.double())
        model = model.to(dtype).to(memory_format=torch.channels_last)
        x_low = x.to(dtype).contiguous(memory_format=torch.channels_last)
        unfused = model(x_low)
        fused = resnet_fused.convert(model)(x_low)
    assert_low_precision_close(fused, unfused, exact)


@pytest.mark.gpu
@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_converted_resnet50_cuda_backend(dtype, channels_last):
    """convert(resnet50, backend="cuda") end to end: 52 of its 53 convs take a CUTLASS kernel
    (the C = 3 stem takes cuDNN + epilogue), within the low-precision rule."""
    torch.manual_seed(3)
    model = randomize_batch_norms(resnet50(), torch.Generator().manual_seed(3)).eval().cuda()
    x = torch.randn(4, 3, 160, 160, device="cuda")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    with torch.inference_mode():
        exact = model.double()(x.double())
        model = model.to(dtype).to(memory_format=fmt)
        x_low = x.to(dtype).contiguous(memory_format=fmt)
        unfused = model(x_low)
        converted = resnet_fused.convert(model, backend="cuda")
        before = resnet_fused._C.cuda_dispatch_counts()
        out = converted(x_low)
        torch.cuda.synchronize()
        after = resnet_fused._C.cuda_dispatch_counts()
    delta = {k: after[k] - before[k] for k in after}
    assert delta["fallback_plan"] == 1 and delta["fallback_runtime"] == 0, delta
    assert sum(v for k, v in delta.items() if not k.startswith("fallback")) == 52, delta
    assert_low_precision_close(out, unfused, exact)
