"""The C++ CPU op torch.ops.resnet_fused.conv_bn_act (oneDNN conv + one epilogue pass applying
BatchNorm, residual and ReLU) against the unfused reference, and the fused module built on it."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import resnet_fused
from helpers import act_args, assert_low_precision_close, max_rel_error, randomize_batch_norms
from resnet_fused import _extension
from resnet_fused.ops import reference
from test_conv_bn_act import SHAPES, exact_and_unfused, fused, make_case


def test_extension_is_built():
    # The README's install command builds it; a silent build failure must not pass as a skip.
    assert _extension.has_cpu_ops(), _extension.LOAD_ERROR


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", SHAPES)
def test_matches_reference(name, dtype, channels_last, with_residual, relu):
    seed = 100 + list(SHAPES).index(name)
    x, weight, bn, residual, conv_args = make_case(SHAPES[name], dtype, channels_last, with_residual, seed)
    out = fused(x, weight, bn, residual, conv_args, "cpu", relu)
    exact, unfused = exact_and_unfused(x, weight, bn, residual, conv_args, relu)
    assert out.dtype == dtype and out.shape == exact.shape
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    if dtype == torch.float32:
        assert max_rel_error(out, exact) < 1e-5
    else:
        assert_low_precision_close(out, unfused, exact)


def test_residual_in_another_layout_and_grouped_conv():
    x, weight, bn, residual, conv_args = make_case(SHAPES["3x3"], torch.float32, True, True, 120)
    residual = residual.contiguous()  # NCHW residual with a channels_last input
    exact, _ = exact_and_unfused(x, weight, bn, residual, conv_args, relu=True)
    assert max_rel_error(fused(x, weight, bn, residual, conv_args, "cpu"), exact) < 1e-5

    x, weight, bn, _, conv_args = make_case((1, 6, 7, 7, 4, 3, 1, 1, 1), torch.float32, False, False, 124)
    weight = weight[:, :3].contiguous()
    expected = reference.conv_bn_act(x, weight, None, *bn.values(), groups=2, **conv_args)
    torch.testing.assert_close(fused(x, weight, bn, None, conv_args, "cpu", groups=2), expected)


def test_op_contract():
    """opcheck: schema, the Python-registered fake kernel's shapes/strides, and dispatch agree."""
    for channels_last in (False, True):
        x, weight, bn, residual, _ = make_case(SHAPES["3x3-stride2"], torch.float32, channels_last, True, 121)
        args = (x, weight, torch.randn(weight.shape[0]), bn["bn_weight"], bn["bn_bias"], bn["running_mean"],
                bn["running_var"], 1e-5, residual, [2, 2], [1, 1], [1, 1], 1, *act_args(True))
        torch.library.opcheck(torch.ops.resnet_fused.conv_bn_act.default, args)


def conv_bn_relu(backend: str, dtype=torch.float32):
    g = torch.Generator().manual_seed(122)
    model = nn.Sequential(nn.Conv2d(5, 7, 3, padding=1, bias=True), nn.BatchNorm2d(7), nn.ReLU())
    randomize_batch_norms(model, g).eval().to(dtype)
    return model, resnet_fused.convert(model, backend=backend)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
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
    buffer = io.BytesIO()
    torch.save(converted, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
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


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_op_under_inductor(backend):
    x, weight, bn, residual, conv_args = make_case(SHAPES["3x3-stride2"], torch.float32, True, True, 123)

    def fn(x, residual):
        return fused(x, weight, bn, residual, conv_args, backend)

    compiled = torch.compile(fn, fullgraph=True)
    torch.testing.assert_close(compiled(x, residual), fn(x, residual), rtol=0, atol=0)
