"""The C++ CPU op torch.ops.resnet_fused.conv_bn_act (oneDNN conv on BN-folded weights + one
epilogue pass) against the unfused reference, and the weight-fold cache of the module using it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import resnet_fused
from helpers import assert_low_precision_close, max_rel_error, randomize_batch_norms
from resnet_fused import _extension, fold_batch_norm
from test_conv_bn_act import SHAPES, exact_and_unfused, make_case


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
    scale, shift = fold_batch_norm(None, *bn.values(), eps=1e-5)
    out = resnet_fused.conv_bn_act(x, weight, scale, shift, residual, relu=relu, backend="cpu", **conv_args)
    exact, unfused = exact_and_unfused(x, weight, bn, residual, conv_args, relu)
    assert out.dtype == dtype and out.shape == exact.shape
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    if dtype == torch.float32:
        assert max_rel_error(out, exact) < 1e-5
    else:
        assert_low_precision_close(out, unfused, exact)


def test_residual_in_another_layout():
    x, weight, bn, residual, conv_args = make_case(SHAPES["3x3"], torch.float32, True, True, 120)
    residual = residual.contiguous()  # NCHW residual with a channels_last input
    scale, shift = fold_batch_norm(None, *bn.values(), eps=1e-5)
    out = resnet_fused.conv_bn_act(x, weight, scale, shift, residual, backend="cpu", **conv_args)
    exact, _ = exact_and_unfused(x, weight, bn, residual, conv_args, relu=True)
    assert max_rel_error(out, exact) < 1e-5


def test_op_contract():
    """opcheck: schema, the Python-registered fake kernel's shapes/strides, and dispatch agree."""
    for channels_last in (False, True):
        x, weight, bn, residual, _ = make_case(SHAPES["3x3-stride2"], torch.float32, channels_last, True, 121)
        scale, shift = fold_batch_norm(None, *bn.values(), eps=1e-5)
        args = (x, weight, scale, shift, residual, [2, 2], [1, 1], [1, 1], 1, True)
        torch.library.opcheck(torch.ops.resnet_fused.conv_bn_act.default, args)


def _conv_bn(backend: str, dtype=torch.float32):
    g = torch.Generator().manual_seed(122)
    model = nn.Sequential(nn.Conv2d(5, 7, 3, padding=1, bias=True), nn.BatchNorm2d(7), nn.ReLU())
    randomize_batch_norms(model, g).eval().to(dtype)
    return model, resnet_fused.convert(model, backend=backend)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_fold_cache_follows_parameter_and_buffer_changes(backend):
    model, fused = _conv_bn(backend)
    x = torch.randn(2, 5, 9, 7)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x))
        first_fold = fused[0]._fold_cache[1]
        fused(x)
        assert fused[0]._fold_cache[1] is first_fold  # no refold while nothing changed

        # In-place changes to BN buffers and conv parameters, through the converted model's
        # own modules (they share tensors with nothing else: convert deep-copied the model).
        for change in (
            lambda m: m[1].running_var.mul_(3.0),
            lambda m: m[1].running_mean.add_(0.5),
            lambda m: m[1].weight.mul_(-1.0),
            lambda m: m[1].bias.add_(1.0),
            lambda m: m[0].weight.mul_(0.5),
            lambda m: m[0].bias.sub_(0.25),
        ):
            change(model)
            change(fused)
            torch.testing.assert_close(fused(x), model(x))

        # load_state_dict copies into the same tensors: the fold must follow it too.
        state = {k: v + 0.1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
        model.load_state_dict(state)
        fused.load_state_dict(state)
        torch.testing.assert_close(fused(x), model(x))


def test_bf16_model_on_cpu_backend():
    model, fused = _conv_bn("cpu", torch.bfloat16)
    x = torch.randn(2, 5, 9, 7)
    with torch.no_grad():
        exact = model.double()(x.double())
        unfused = model.to(torch.bfloat16)(x.to(torch.bfloat16))
        assert_low_precision_close(fused(x.to(torch.bfloat16)), unfused, exact)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_op_under_inductor(backend):
    x, weight, bn, residual, conv_args = make_case(SHAPES["3x3-stride2"], torch.float32, True, True, 123)
    scale, shift = fold_batch_norm(None, *bn.values(), eps=1e-5)

    def fn(x, residual):
        return resnet_fused.conv_bn_act(x, weight, scale, shift, residual, backend=backend, **conv_args)

    compiled = torch.compile(fn, fullgraph=True)
    torch.testing.assert_close(compiled(x, residual), fn(x, residual), rtol=0, atol=0)
