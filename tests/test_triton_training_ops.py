"""The Triton ops of the fused training unit under TRITON_INTERPRET=1, against reference.py.

fp32 only (bf16 math is broken in the interpreter; fp16/bf16 are covered by the sm_90 compile
tests, test_training_sm90.py), tiny shapes so the sequential interpreter stays fast, and an
fp64 computation of the reference functions as the oracle (≤ 1e-5 relative).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import triton

from helpers import act_args, max_rel_error
from resnet_fused.ops import reference
from resnet_fused.ops.triton import bn_act, conv_bn_stats

CL = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}

# --- conv_bn_stats ---------------------------------------------------------------------------

# (N, C, H, W, K, kernel, stride, padding): C and K not multiples of the blocks, M = N·P·Q over
# several BLOCK_M tiles (32 under the interpreter) with a partial last one.
CONV_SHAPES = {
    "3x3-stride2": (3, 6, 11, 9, 10, 3, 2, 1),  # M = 3·6·5 = 90: 3 tiles
    "1x1": (2, 5, 7, 9, 6, 1, 1, 0),  # M = 126: 4 tiles
    "multi-block": (2, 130, 5, 5, 131, 3, 1, 1),  # C and K past one block (BLOCK_C/BLOCK_N 128)
}


def conv_case(shape, layout, seed, offset=0.0, spread=1.0, with_bias=True, groups=1):
    """``(x, weight, bias, stride, padding, dilation, groups)``: the op's arguments before allow_tf32."""
    n, c, h, w, k, ks, stride, padding = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g).contiguous(memory_format=CL[layout])
    weight = torch.randn(k, c // groups, ks, ks, generator=g) * spread / (c // groups * ks * ks) ** 0.5
    bias = torch.randn(k, generator=g) + offset if with_bias else None
    return x, weight, bias, [stride, stride], [padding, padding], [1, 1], groups


def exact_conv(x, weight, bias, stride, padding, dilation, groups=1):
    return F.conv2d(x.double(), weight.double(), None if bias is None else bias.double(), stride, padding, dilation,
                    groups)


# Every shape in both layouts with and without bias, except one multi-block case only (wide
# tiles are slow in the interpreter).
CONV_CASES = [
    (name, layout, with_bias)
    for name in CONV_SHAPES for layout in CL for with_bias in (True, False)
    if name != "multi-block" or (layout, with_bias) == ("nhwc", True)
]


@pytest.mark.parametrize(("name", "layout", "with_bias"), CONV_CASES,
                         ids=[f"{n}-{lay}-{'bias' if b else 'nobias'}" for n, lay, b in CONV_CASES])
def test_conv_bn_stats_matches_reference(name, layout, with_bias):
    check_conv_bn_stats(conv_case(CONV_SHAPES[name], layout, 1, with_bias=with_bias), layout)


# (N, C, H, W, K, kernel, stride, padding, groups): several 4-wide groups packed to a tile,
# depthwise, and 3 inputs to 2 outputs per group with an odd group count.
GROUPED_CONV_SHAPES = {
    "resnext-4wide": (2, 32, 7, 5, 32, 3, 1, 1, 8),
    "depthwise-stride2": (3, 6, 9, 7, 6, 3, 2, 1, 6),
    "3in-2out-groups3": (2, 9, 6, 5, 6, 1, 1, 0, 3),
}


@pytest.mark.parametrize("layout", CL)
@pytest.mark.parametrize("name", GROUPED_CONV_SHAPES)
def test_grouped_conv_bn_stats_matches_reference(name, layout):
    *shape, groups = GROUPED_CONV_SHAPES[name]
    check_conv_bn_stats(conv_case(tuple(shape), layout, 6, groups=groups), layout)


def check_conv_bn_stats(args, layout):
    x, weight = args[:2]
    y, mean, var = conv_bn_stats.conv_bn_stats_triton(*args, False)
    exact = exact_conv(*args)
    exact_mean, exact_var = reference.bn_stats(exact)
    assert y.dtype == x.dtype and y.shape == exact.shape and y.is_contiguous(memory_format=CL[layout])
    assert mean.dtype == var.dtype == torch.float32 and mean.shape == var.shape == (weight.shape[0],)
    assert max_rel_error(y, exact) < 1e-5
    assert max_rel_error(mean, exact_mean) < 1e-5
    assert max_rel_error(var, exact_var) < 1e-5


def test_conv_bn_stats_variance_is_stable_far_from_zero():
    """Mean ~1000, std ~0.06: E[y²] − E[y]² in fp32 loses every digit here. Chan's merge of
    tile means kept as hi/lo pairs keeps the variance of the values the kernel wrote to ~2e-7
    (with one fp32 per tile mean it was 9e-5: the test's 1e-6 tells the two apart)."""
    y, mean, var = conv_bn_stats.conv_bn_stats_triton(
        *conv_case(CONV_SHAPES["1x1"], "nhwc", 2, offset=1000.0, spread=0.1), False)
    exact_mean, exact_var = reference.bn_stats(y.double())  # y is the fp32 accumulator, unrounded
    assert max_rel_error(mean, exact_mean) < 1e-6
    assert max_rel_error(var, exact_var) < 1e-6
    naive = (y * y).mean(dim=(0, 2, 3)) - y.mean(dim=(0, 2, 3)) ** 2
    assert max_rel_error(naive, exact_var) > 1e-2  # the case is hard for the naive formula


@pytest.mark.parametrize("block_m", [16, 32, 64])
def test_stats_correct_whichever_tile_runs(monkeypatch, block_m):
    """The partials are sized before the autotuner picks BLOCK_M, for the smallest one; rows the
    launch does not write (never written, or stale from a benchmark run with smaller tiles) must
    not be read. Partials filled with NaN and 4x longer than needed prove it."""
    def stale_partials(tiles, k, device):
        return torch.full((3, 4 * tiles + 3, k), float("nan"), device=device)

    monkeypatch.setattr(conv_bn_stats, "_empty_partials", stale_partials)
    args = conv_case(CONV_SHAPES["3x3-stride2"], "nhwc", 3)
    config = triton.Config({"BLOCK_M": block_m, "BLOCK_N": 16, "BLOCK_C": 16}, num_warps=4, num_stages=1)
    y, mean, var = conv_bn_stats.launch(*args, False, config=config)
    exact_mean, exact_var = reference.bn_stats(exact_conv(*args))
    assert max_rel_error(mean, exact_mean) < 1e-5
    assert max_rel_error(var, exact_var) < 1e-5


def test_stats_int64_path_gives_the_same_result(monkeypatch):
    args = conv_case(CONV_SHAPES["3x3-stride2"], "nchw", 4)
    expected = conv_bn_stats.launch(*args, False)
    monkeypatch.setattr(conv_bn_stats, "INT32_MAX", 0)
    for got, want in zip(conv_bn_stats.launch(*args, False), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_stats_empty_batch_gives_nan_statistics():
    y, mean, var = conv_bn_stats.conv_bn_stats_triton(torch.randn(0, 3, 5, 5), torch.randn(4, 3, 3, 3), None,
                                                      [1, 1], [1, 1], [1, 1], 1, False)
    assert y.shape == (0, 4, 5, 5) and mean.isnan().all() and var.isnan().all()


def test_conv_bn_stats_custom_op_contract():
    for layout, with_bias, groups in (("nchw", True, 1), ("nhwc", False, 1), ("nhwc", True, 2)):
        args = conv_case((1, 4, 5, 4, 4, 3, 1, 1), layout, 5, with_bias=with_bias, groups=groups)
        torch.library.opcheck(conv_bn_stats.conv_bn_stats_triton, (*args, False))


# --- bn_act ---------------------------------------------------------------------------------

# (N, K, H, W): K past one 64-channel block, L = H·W not a multiple of any block.
BN_SHAPES = {"small": (3, 5, 7, 9), "wide": (2, 70, 3, 5)}
# Small blocks force several L-tiles per image and, in the reduce, several partial rows each.
SMALL_BLOCKS = (16, 8)


def bn_case(shape, layout, seed):
    n, k, h, w = shape
    g = torch.Generator().manual_seed(seed)
    y = (torch.randn(n, k, h, w, generator=g) * 2 + 0.5).contiguous(memory_format=CL[layout])
    mean, var = reference.bn_stats(y)
    per_channel = {
        "gamma": torch.rand(k, generator=g) + 0.5,
        "beta": torch.randn(k, generator=g) * 0.3,
    }
    residual = torch.randn(n, k, h, w, generator=g).contiguous(memory_format=CL[layout])
    grad_out = torch.randn(n, k, h, w, generator=g).contiguous(memory_format=CL[layout])
    return y, mean, var, per_channel, residual, grad_out


def d(t):
    return None if t is None else t.double()


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "linear"])
@pytest.mark.parametrize("with_residual", [True, False], ids=["res", "nores"])
@pytest.mark.parametrize("layout", CL)
@pytest.mark.parametrize("name", BN_SHAPES)
def test_bn_act_apply_matches_reference(name, layout, with_residual, relu, affine):
    y, mean, var, pc, residual, _ = bn_case(BN_SHAPES[name], layout, 10)
    gamma, beta = (pc["gamma"], pc["beta"]) if affine else (None, None)
    residual = residual if with_residual else None
    out = bn_act.bn_act_apply_triton(y, mean, var, gamma, beta, 1e-3, residual, *act_args(relu))
    exact = reference.bn_act_apply(d(y), d(mean), d(var), d(gamma), d(beta), 1e-3, d(residual), *act_args(relu))
    assert out.dtype == y.dtype and out.is_contiguous(memory_format=CL[layout])
    assert max_rel_error(out, exact) < 1e-5


def test_bn_act_apply_small_tiles_mixed_layouts_and_broadcast():
    """Several L-tiles per image; a residual in the other layout; a stride-0 residual; per-channel
    tensors in float64 and strided."""
    y, mean, var, pc, residual, _ = bn_case(BN_SHAPES["wide"], "nhwc", 11)
    gamma = torch.randn(2 * y.shape[1], dtype=torch.float64)[::2]
    for res in (residual.contiguous(), torch.randn(1, y.shape[1], 1, 1).expand(y.shape)):
        out = bn_act.apply_launch(y, mean.double(), var, gamma, pc["beta"], 1e-5, res, *act_args(True),
                                  blocks=SMALL_BLOCKS)
        exact = reference.bn_act_apply(d(y), d(mean), d(var), d(gamma), d(pc["beta"]), 1e-5, d(res), *act_args(True))
        assert max_rel_error(out, exact) < 1e-5


def test_bn_act_apply_relu_propagates_nan():
    y, mean, var, _, _, _ = bn_case(BN_SHAPES["small"], "nhwc", 12)
    y[0, :, 1, 1] = float("nan")
    out = bn_act.bn_act_apply_triton(y, mean, var, None, None, 1e-5, None, *act_args(True))
    assert out[0, :, 1, 1].isnan().all() and not out[0, :, 0, 0].isnan().any()


@pytest.mark.parametrize("small_blocks", [False, True], ids=["default", "small-blocks"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "linear"])
@pytest.mark.parametrize("layout", CL)
@pytest.mark.parametrize("name", BN_SHAPES)
def test_bn_act_backward_reduce_matches_reference(name, layout, relu, small_blocks):
    y, mean, var, pc, residual, grad_out = bn_case(BN_SHAPES[name], layout, 13)
    out = reference.bn_act_apply(y, mean, var, pc["gamma"], pc["beta"], 1e-5, residual, *act_args(relu))
    act = (None, None, 1e-5, *act_args(relu))  # gamma, beta (unread: no activation needs z here), eps, activation
    if small_blocks:
        sum_g, sum_gx = bn_act.backward_reduce_launch(grad_out, out, y, mean, var, *act, blocks=SMALL_BLOCKS, steps=2)
    else:
        sum_g, sum_gx = bn_act.bn_act_backward_reduce_triton(grad_out, out, y, mean, var, *act)
    exact_g, exact_gx = reference.bn_act_backward_reduce(d(grad_out), d(out), d(y), d(mean), d(var), *act)
    assert sum_g.dtype == sum_gx.dtype == torch.float32 and sum_g.shape == (y.shape[1],)
    assert max_rel_error(sum_g, exact_g) < 1e-5
    assert max_rel_error(sum_gx, exact_gx) < 1e-5


def test_bn_act_backward_reduce_is_deterministic():
    y, mean, var, pc, residual, grad_out = bn_case(BN_SHAPES["wide"], "nchw", 14)
    args = (grad_out, y, y, mean, var, None, None, 1e-5, *act_args(True))
    first = bn_act.backward_reduce_launch(*args, blocks=SMALL_BLOCKS, steps=1)
    second = bn_act.backward_reduce_launch(*args, blocks=SMALL_BLOCKS, steps=1)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("affine", [True, False], ids=["gamma", "nogamma"])
@pytest.mark.parametrize("residual_grad", [True, False], ids=["dres", "nodres"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "linear"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", CL)
def test_bn_act_backward_apply_matches_reference(layout, training, relu, residual_grad, affine):
    y, mean, var, pc, residual, grad_out = bn_case(BN_SHAPES["small"], layout, 15)
    gamma = pc["gamma"] if affine else None
    out = reference.bn_act_apply(y, mean, var, gamma, pc["beta"], 1e-5, residual, *act_args(relu))
    sum_g, sum_gx = reference.bn_act_backward_reduce(grad_out, out, y, mean, var, None, None, 1e-5, *act_args(relu))
    count = y.numel() // y.shape[1]
    args = (grad_out, out, y, mean, var, gamma, None, 1e-5, sum_g, sum_gx, count, training, *act_args(relu),
            residual_grad)
    dy, d_res = bn_act.bn_act_backward_apply_triton(*args)
    exact_dy, exact_res = reference.bn_act_backward_apply(*(d(a) if isinstance(a, torch.Tensor) else a for a in args))
    assert dy.dtype == y.dtype and dy.is_contiguous(memory_format=CL[layout])
    assert max_rel_error(dy, exact_dy) < 1e-5
    if residual_grad:
        assert d_res.is_contiguous(memory_format=CL[layout])
        torch.testing.assert_close(d_res, exact_res.float(), rtol=0, atol=0)
    else:
        assert d_res.shape == (0,)


def test_bn_act_backward_apply_small_tiles_mixed_layouts():
    """grad_out in NCHW (as autograd often hands it) against a channels_last y."""
    y, mean, var, pc, residual, grad_out = bn_case(BN_SHAPES["wide"], "nhwc", 16)
    out = reference.bn_act_apply(y, mean, var, pc["gamma"], pc["beta"], 1e-5, residual, *act_args(True))
    sum_g, sum_gx = reference.bn_act_backward_reduce(grad_out, out, y, mean, var, None, None, 1e-5, *act_args(True))
    count = y.numel() // y.shape[1]
    args = (grad_out.contiguous(), out, y, mean, var, pc["gamma"], None, 1e-5, sum_g, sum_gx, count, True,
            *act_args(True), True)
    dy, d_res = bn_act.backward_apply_launch(*args, blocks=SMALL_BLOCKS)
    exact_dy, exact_res = reference.bn_act_backward_apply(*(d(a) if isinstance(a, torch.Tensor) else a for a in args))
    assert dy.is_contiguous(memory_format=torch.channels_last)
    assert max_rel_error(dy, exact_dy) < 1e-5
    torch.testing.assert_close(d_res, exact_res.float(), rtol=0, atol=0)


@pytest.mark.parametrize("momentum", [0.1, 0.7])  # torch.lerp's two formulas
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_update_running_stats_matches_reference(dtype, momentum):
    k = 70
    mean, var = torch.randn(k), torch.rand(k) + 0.5
    running_mean = torch.randn(2 * k).to(dtype)[::2]  # a strided view, updated through its stride
    running_var = (torch.rand(k) + 0.5).to(dtype)
    expected_mean, expected_var = running_mean.clone(), running_var.clone()
    reference.update_running_stats(expected_mean, expected_var, mean, var, 37, momentum)
    bn_act.bn_update_running_stats_triton_(running_mean, running_var, mean, var, 37, momentum)
    torch.testing.assert_close(running_mean, expected_mean, rtol=1e-6 if dtype == torch.float32 else 1e-3, atol=0)
    torch.testing.assert_close(running_var, expected_var, rtol=1e-6 if dtype == torch.float32 else 1e-3, atol=0)


def test_empty_inputs():
    y = torch.randn(0, 4, 3, 3)
    zeros, ones = torch.zeros(4), torch.ones(4)
    assert bn_act.bn_act_apply_triton(y, zeros, ones, None, None, 1e-5, None, *act_args(True)).shape == y.shape
    sum_g, sum_gx = bn_act.bn_act_backward_reduce_triton(y, y, y, zeros, ones, None, None, 1e-5, *act_args(True))
    assert torch.equal(sum_g, zeros) and torch.equal(sum_gx, zeros)
    dy, d_res = bn_act.bn_act_backward_apply_triton(y, y, y, zeros, ones, None, None, 1e-5, zeros, zeros, 1, False,
                                                    *act_args(True), True)
    assert dy.shape == d_res.shape == y.shape


def test_bn_act_custom_op_contracts():
    """torch.library.opcheck: schema, fake (meta) kernels, mutation and dispatch agree."""
    for layout in CL:
        y, mean, var, pc, residual, grad_out = bn_case((2, 3, 4, 5), layout, 17)
        out = bn_act.bn_act_apply_triton(y, mean, var, pc["gamma"], pc["beta"], 1e-5, residual, *act_args(True))
        torch.library.opcheck(bn_act.bn_act_apply_triton,
                              (y, mean, var, pc["gamma"], pc["beta"], 1e-5, residual, *act_args(True)))
        torch.library.opcheck(bn_act.bn_act_apply_triton, (y, mean, var, None, None, 1e-5, None, *act_args(False)))
        reduce_args = (grad_out, out, y, mean, var, None, None, 1e-5, *act_args(True))
        torch.library.opcheck(bn_act.bn_act_backward_reduce_triton, reduce_args)
        sum_g, sum_gx = bn_act.bn_act_backward_reduce_triton(*reduce_args)
        for residual_grad in (True, False):
            torch.library.opcheck(
                bn_act.bn_act_backward_apply_triton,
                (grad_out, out, y, mean, var, pc["gamma"], None, 1e-5, sum_g, sum_gx, 40, True, *act_args(True),
                 residual_grad),
            )
    torch.library.opcheck(bn_act.bn_update_running_stats_triton_, (torch.zeros(3), torch.ones(3), torch.randn(3),
                                                                   torch.rand(3), 40, 0.1))
