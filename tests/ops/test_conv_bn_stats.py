"""The training unit's statistics conv (``Kernels.conv_stats``: the convolution and its output's
per-channel batch mean and variance) on every backend, against an fp64 convolution and
reference.bn_stats: Triton's conv_bn_stats kernel (one implicit-GEMM launch with a statistics
epilogue, then a finalize kernel) under TRITON_INTERPRET=1, the C++ backend's ATen conv + bn_stats;
then the Triton kernel's own tiles, int64 path and op contract.

fp32 only under the interpreter (bf16 math is broken there; fp16/bf16 are covered by the sm_90
compile tests, codegen/test_training_sm90.py), tiny shapes so the sequential interpreter stays
fast, and an fp64 computation as the oracle (<= 1e-5 relative).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import triton

from cases import GROUPED_STATS_SHAPES, LAYOUTS, STATS_SHAPES, conv_stats_grid
from helpers import max_rel_error
from resnet_fused.backends import REGISTRY
from resnet_fused.ops import reference
from resnet_fused.ops.triton import conv_bn_stats


def conv_case(shape, layout, seed, offset=0.0, spread=1.0, with_bias=True, groups=1):
    """``(x, weight, bias, stride, padding, dilation, groups)`` of a CONV_SHAPES-style shape:
    the op's arguments before allow_tf32."""
    n, c, h, w, k, ks, stride, padding, dilation = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g).contiguous(memory_format=LAYOUTS[layout])
    weight = torch.randn(k, c // groups, ks, ks, generator=g) * spread / (c // groups * ks * ks) ** 0.5
    bias = torch.randn(k, generator=g) + offset if with_bias else None
    return x, weight, bias, [stride, stride], [padding, padding], [dilation, dilation], groups


def exact_conv(x, weight, bias, stride, padding, dilation, groups=1):
    return F.conv2d(x.double(), weight.double(), None if bias is None else bias.double(), stride, padding, dilation,
                    groups)


def conv_stats(backend):
    return REGISTRY[backend].kernels().conv_stats


def check_conv_bn_stats(backend, args, layout):
    x, weight = args[:2]
    y, mean, var = conv_stats(backend)(*args, False)
    exact = exact_conv(*args)
    exact_mean, exact_var = reference.bn_stats(exact)
    assert y.dtype == x.dtype and y.shape == exact.shape and y.is_contiguous(memory_format=LAYOUTS[layout])
    assert mean.dtype == var.dtype == torch.float32 and mean.shape == var.shape == (weight.shape[0],)
    assert max_rel_error(y, exact) < 1e-5
    assert max_rel_error(mean, exact_mean) < 1e-5
    assert max_rel_error(var, exact_var) < 1e-5


# --- every backend ---------------------------------------------------------------------------


@pytest.mark.grid("name, layout, with_bias", conv_stats_grid)
def test_conv_bn_stats_matches_reference(backend, name, layout, with_bias):
    check_conv_bn_stats(backend, conv_case(STATS_SHAPES[name], layout, 1, with_bias=with_bias), layout)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", GROUPED_STATS_SHAPES)
def test_grouped_conv_bn_stats_matches_reference(backend, name, layout):
    n, c, h, w, k, ks, stride, groups = GROUPED_STATS_SHAPES[name]
    shape = (n, c, h, w, k, ks, stride, ks // 2, 1)
    check_conv_bn_stats(backend, conv_case(shape, layout, 6, groups=groups), layout)


def test_conv_bn_stats_variance_is_stable_far_from_zero(backend):
    """Mean ~1000, std ~0.06: E[y²] − E[y]² in fp32 loses every digit here. Chan's merge of
    tile means kept as hi/lo pairs keeps the variance of the values the kernel wrote to ~2e-7
    (with one fp32 per tile mean it was 9e-5: the test's 1e-6 tells the two apart)."""
    y, mean, var = conv_stats(backend)(*conv_case(STATS_SHAPES["1x1"], "nhwc", 2, offset=1000.0, spread=0.1), False)
    exact_mean, exact_var = reference.bn_stats(y.double())  # y is the fp32 accumulator, unrounded
    assert max_rel_error(mean, exact_mean) < 1e-6
    assert max_rel_error(var, exact_var) < 1e-6
    naive = (y * y).mean(dim=(0, 2, 3)) - y.mean(dim=(0, 2, 3)) ** 2
    assert max_rel_error(naive, exact_var) > 1e-2  # the case is hard for the naive formula


def test_stats_empty_batch_gives_nan_statistics(backend):
    y, mean, var = conv_stats(backend)(torch.randn(0, 3, 5, 5), torch.randn(4, 3, 3, 3), None,
                                       [1, 1], [1, 1], [1, 1], 1, False)
    assert y.shape == (0, 4, 5, 5) and mean.isnan().all() and var.isnan().all()


# --- triton: tiles, int64 indexing, the custom op --------------------------------------------


@pytest.mark.parametrize("block_m", [16, 32, 64])
def test_stats_correct_whichever_tile_runs(monkeypatch, block_m):
    """The partials are sized before the autotuner picks BLOCK_M, for the smallest one; rows the
    launch does not write (never written, or stale from a benchmark run with smaller tiles) must
    not be read. Partials filled with NaN and 4x longer than needed prove it."""
    def stale_partials(tiles, k, device):
        return torch.full((3, 4 * tiles + 3, k), float("nan"), device=device)

    monkeypatch.setattr(conv_bn_stats, "_empty_partials", stale_partials)
    args = conv_case(STATS_SHAPES["3x3-stride2-3tiles"], "nhwc", 3)
    config = triton.Config({"BLOCK_M": block_m, "BLOCK_N": 16, "BLOCK_C": 16}, num_warps=4, num_stages=1)
    y, mean, var = conv_bn_stats.launch(*args, False, config=config)
    exact_mean, exact_var = reference.bn_stats(exact_conv(*args))
    assert max_rel_error(mean, exact_mean) < 1e-5
    assert max_rel_error(var, exact_var) < 1e-5


def test_stats_int64_path_gives_the_same_result(monkeypatch):
    args = conv_case(STATS_SHAPES["3x3-stride2-3tiles"], "nchw", 4)
    expected = conv_bn_stats.launch(*args, False)
    monkeypatch.setattr(conv_bn_stats, "INT32_MAX", 0)
    for got, want in zip(conv_bn_stats.launch(*args, False), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_conv_bn_stats_custom_op_contract():
    for layout, with_bias, groups in (("nchw", True, 1), ("nhwc", False, 1), ("nhwc", True, 2)):
        args = conv_case((1, 4, 5, 4, 4, 3, 1, 1, 1), layout, 5, with_bias=with_bias, groups=groups)
        torch.library.opcheck(conv_bn_stats.conv_bn_stats_triton, (*args, False))
