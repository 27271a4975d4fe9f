"""The training op resnet_fused::conv_bn_act_train (conv + batch-statistics BatchNorm + residual +
ReLU, forward and backward) on every backend: float64 gradcheck, fp32 gradients against fp64,
the op contract, bad input, NaN gradients; on the GPU (marked ``gpu``) one fused unit per backend
against fp64 by the low-precision rule. Whole models trained through convert():
convert/test_training.py."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cases import TRAIN_GPU_SHAPES
from helpers import act_args, assert_grads_close, assert_low_precision_close, max_rel_error, randomize_batch_norms
from resnet_fused import functional
from resnet_fused.nn import fuse_conv_bn
from resnet_fused.training import conv_bn_act_train


def unit_operands(dtype, *, conv_bias, affine, residual, seed, shape=(2, 3, 5, 4), k=4, requires_grad=True, groups=1):
    """Inputs of one conv(3x3, pad 1, ``groups``) + BN unit; BN parameters and running stats far from 0/1."""
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = shape

    def rand(*size, scale=1.0, offset=0.0):
        return (torch.randn(*size, generator=g) * scale + offset).to(dtype).requires_grad_(requires_grad)

    ops = {
        "x": rand(n, c, h, w),
        "weight": rand(k, c // groups, 3, 3, scale=0.3),
        "bias": rand(k, scale=0.3) if conv_bias else None,
        "bn_weight": rand(k, scale=0.2, offset=1.0) if affine else None,
        "bn_bias": rand(k, scale=0.3) if affine else None,
        "residual": rand(n, k, h, w) if residual else None,
    }
    running = (torch.randn(k, generator=g).to(dtype) * 0.3, (torch.rand(k, generator=g) + 0.5).to(dtype))
    return ops, running


def call_op(ops, running, backend, relu, batch_stats, eps=1e-3, groups=1):
    mean, var = (None, None) if batch_stats else running
    return conv_bn_act_train(
        ops["x"], ops["weight"], ops["bias"], ops["bn_weight"], ops["bn_bias"], mean, var, eps, ops["residual"],
        [1, 1], [1, 1], [1, 1], groups, *act_args(relu), backend, False,
    )[0]


@pytest.mark.parametrize("batch_stats", [True, False], ids=["batch-stats", "running-stats"])
@pytest.mark.parametrize("relu,residual", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("conv_bias,affine", [(True, True), (False, False)], ids=["bias-affine", "plain"])
@pytest.mark.backends("reference", "cpu")  # fp64: not a Triton dtype
def test_gradcheck_float64(backend, conv_bias, affine, relu, residual, batch_stats):
    ops, running = unit_operands(torch.float64, conv_bias=conv_bias, affine=affine, residual=residual, seed=1)
    names = [name for name, t in ops.items() if t is not None]

    def fn(*tensors):
        return call_op(dict(ops, **dict(zip(names, tensors))), running, backend, relu, batch_stats)

    assert torch.autograd.gradcheck(fn, [ops[n] for n in names], eps=1e-6, atol=1e-6, rtol=1e-5)


def test_gradcheck_float64_grouped():
    ops, running = unit_operands(torch.float64, conv_bias=True, affine=True, residual=True, seed=1,
                                 shape=(2, 4, 5, 4), k=6, groups=2)
    names = [name for name, t in ops.items() if t is not None]

    def fn(*tensors):
        return call_op(dict(ops, **dict(zip(names, tensors))), running, "cpu", True, True, groups=2)

    assert torch.autograd.gradcheck(fn, [ops[n] for n in names], eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("groups", [1, 5], ids=["dense", "groups5"])
@pytest.mark.parametrize("batch_stats", [True, False], ids=["batch-stats", "running-stats"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_fp32_gradients_match_fp64_reference(backend, channels_last, batch_stats, groups):
    """Every gradient of the fp32 fused unit within fp32 tolerance of the fp64 computation."""
    ops, running = unit_operands(torch.float32, conv_bias=True, affine=True, residual=True, seed=2,
                                 shape=(3, 5, 7, 6), k=10 if groups > 1 else 6, groups=groups)
    if channels_last:
        for name in ("x", "residual"):
            ops[name] = ops[name].detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    exact_ops = {name: t.detach().double().requires_grad_() for name, t in ops.items()}
    out = call_op(ops, running, backend, True, batch_stats, groups=groups)
    exact = call_op(exact_ops, tuple(t.double() for t in running), "reference", True, batch_stats, groups=groups)
    assert max_rel_error(out, exact) < 1e-5
    grad = torch.randn(exact.shape, dtype=torch.float64)
    out.backward(grad.float())
    exact.backward(grad)
    assert_grads_close([t.grad for t in ops.values()], [t.grad for t in exact_ops.values()], 1e-5)


@pytest.mark.backends(reference=True)
def test_op_contract(backend):
    for channels_last in (False, True):
        ops, running = unit_operands(torch.float32, conv_bias=True, affine=True, residual=True, seed=3)
        if channels_last:
            ops = {n: t.detach().contiguous(memory_format=torch.channels_last).requires_grad_() if t.dim() == 4 else t
                   for n, t in ops.items()}
        for mean, var in ((None, None), running):
            args = (ops["x"], ops["weight"], ops["bias"], ops["bn_weight"], ops["bn_bias"], mean, var, 1e-5,
                    ops["residual"], [1, 1], [1, 1], [1, 1], 1, *act_args(True), backend, False)
            torch.library.opcheck(conv_bn_act_train, args)



def test_bad_input_is_named(backend):
    x = torch.randn(2, 3, 6, 6)
    weight, mean, var = torch.randn(4, 3, 3, 3), torch.zeros(4), torch.ones(4)
    with pytest.raises(ValueError, match="bn_weight must be a 1-D float tensor of 4 channels"):
        functional.conv_batch_norm_act(x, weight, mean, var, training=True, bn_weight=torch.ones(3), backend=backend)
    with pytest.raises(ValueError, match="bn_bias must be a 1-D float tensor of 4 channels"):
        functional.conv_batch_norm_act(x, weight, mean, var, training=True, bn_bias=torch.ones(5), backend=backend)
    with pytest.raises(ValueError, match=r"residual shape \(2, 4, 6, 6\) != output shape \(2, 4, 4, 4\)"):
        functional.conv_batch_norm_act(x, weight, mean, var, training=True, residual=torch.randn(2, 4, 6, 6),
                                       backend=backend)
    with pytest.raises(ValueError, match="give both running_mean and running_var"):
        functional.conv_batch_norm_act(x, weight, mean, None, training=True, backend=backend)



def test_nan_output_passes_gradient_like_threshold_backward(backend):
    ops, running = unit_operands(torch.float32, conv_bias=False, affine=True, residual=True, seed=15)
    with torch.no_grad():
        ops["residual"][0, 1, 2, 2] = float("nan")
    exact_ops = {n: t.detach().clone().requires_grad_() for n, t in ops.items() if t is not None}
    out = call_op(ops, running, backend, True, False)
    expected = torch.relu(F.batch_norm(F.conv2d(exact_ops["x"], exact_ops["weight"], padding=1), running[0], running[1],
                                       exact_ops["bn_weight"], exact_ops["bn_bias"], False, 0.0, 1e-3) + exact_ops["residual"])
    out.sum().backward()
    expected.sum().backward()
    assert torch.equal(ops["residual"].grad, exact_ops["residual"].grad)


# --- on the GPU: one fused unit ---------------------------------------------------------------


class Unit(nn.Module):
    """relu(bn(conv(x)) [+ residual]); fused with ``backend``, else the unfused modules."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, backend: str | None = None):
        super().__init__()
        if backend is not None:
            conv, bn = fuse_conv_bn(conv, bn, relu=True, backend=backend)
        self.conv, self.bn, self.fused = conv, bn, backend is not None

    def forward(self, x, residual=None):
        if self.fused:
            return self.conv(x, residual=residual)
        y = self.bn(self.conv(x))
        return torch.relu(y if residual is None else y + residual)


def unit(name, residual: bool, frozen: bool = False):
    """Fresh modules (randomized BN) and operands on the GPU; ``make(backend)`` builds a Unit."""
    n, c, h, w, k, ks, stride, padding = TRAIN_GPU_SHAPES[name]
    torch.manual_seed(3)
    conv = nn.Conv2d(c, k, ks, stride, padding, bias=False).cuda()
    bn = randomize_batch_norms(nn.Sequential(nn.BatchNorm2d(k)), torch.Generator().manual_seed(3))[0].cuda()
    bn.train(not frozen)
    x = torch.randn(n, c, h, w, device="cuda")
    res = torch.randn(conv(x).shape, device="cuda") if residual else None

    def make(backend=None):
        return Unit(copy.deepcopy(conv), copy.deepcopy(bn), backend)

    return make, x, res


def run(model, x, residual, grad):
    x = x.clone().requires_grad_()
    residual = None if residual is None else residual.clone().requires_grad_()
    out = model(x, residual)
    out.backward(grad.to(out.dtype))
    grads = [x.grad, *(p.grad for p in model.parameters()), *([residual.grad] if residual is not None else [])]
    return out, grads, [b.clone() for b in model.buffers()]


@pytest.mark.parametrize("frozen", [False, True], ids=["train", "frozen-bn"])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", TRAIN_GPU_SHAPES)
@pytest.mark.backends(devices=("cuda",))
def test_unit_matches_fp64(backend, device, name, dtype, residual, frozen):
    make, x, res = unit(name, residual, frozen)
    grad = torch.randn(make().conv(x).shape, device="cuda")
    cast = lambda t, d: None if t is None else t.to(d)  # noqa: E731
    results = [run(make(b).to(d), x.to(d), cast(res, d), grad)
               for b, d in ((backend, dtype), (None, dtype), (None, torch.float64))]
    (out_f, grads_f, bufs_f), (out_u, grads_u, bufs_u), (out_e, grads_e, bufs_e) = results
    assert_low_precision_close(out_f, out_u, out_e)
    for gf, gu, ge in zip(grads_f, grads_u, grads_e):
        assert_low_precision_close(gf, gu, ge)
    for bf, bu, be in zip(bufs_f, bufs_u, bufs_e):
        if be.is_floating_point():  # running statistics
            assert (bf.double() - be).abs().max() <= 2 * (bu.double() - be).abs().max() + 1e-3 * be.abs().max()


@pytest.mark.backends(devices=("cuda",))
def test_unit_fp32_ieee(backend, device):
    torch.backends.cudnn.allow_tf32 = False
    try:
        make, x, res = unit("3x3-64", True)
        grad = torch.randn(make().conv(x).shape, device="cuda")
        out_f, grads_f, _ = run(make(backend), x, res, grad)
        out_e, grads_e, _ = run(make().double(), x.double(), res.double(), grad)
        assert max_rel_error(out_f, out_e) < 1e-5
        for gf, ge in zip(grads_f, grads_e):
            assert max_rel_error(gf, ge) < 1e-4
    finally:
        torch.backends.cudnn.allow_tf32 = True
