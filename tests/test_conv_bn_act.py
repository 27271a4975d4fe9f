"""The Triton conv_bn_act kernel under TRITON_INTERPRET=1, against the unfused reference."""

from __future__ import annotations

import pytest
import torch

from helpers import act_args, assert_low_precision_close, max_rel_error
from resnet_fused.ops import reference
from resnet_fused.functional import conv_bn_act
from resnet_fused.ops.shapes import span
from resnet_fused.ops.triton import conv_bn_act as triton_op

# (N, C, H, W, K, kernel, stride, padding, dilation): odd sizes, C and K not multiples of the
# block sizes, and one case larger than a block in M, K and C so the tile loops wrap.
SHAPES = {
    "1x1": (2, 5, 7, 9, 6, 1, 1, 0, 1),
    "1x1-stride2": (1, 7, 9, 11, 5, 1, 2, 0, 1),
    "3x3": (2, 3, 7, 5, 4, 3, 1, 1, 1),
    "3x3-stride2": (1, 6, 9, 7, 10, 3, 2, 1, 1),
    "7x7-stem": (1, 3, 13, 11, 8, 7, 2, 3, 1),
    "3x3-dilation2": (1, 4, 11, 9, 5, 3, 1, 2, 2),
    "3x3-asymmetric": (1, 4, 8, 9, 3, 3, (2, 1), (1, 0), 1),
    "multi-block": (2, 130, 5, 5, 131, 3, 1, 1, 1),
}


def make_case(shape, dtype, channels_last, with_residual, seed):
    """Random conv + BatchNorm operands; BN stats far from the 0/1 defaults."""
    n, c, h, w, k, ks, stride, padding, dilation = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g)
    weight = torch.randn(k, c, ks, ks, generator=g) / (c * ks * ks) ** 0.5
    bn = {
        "bn_weight": torch.rand(k, generator=g) + 0.5,
        "bn_bias": torch.randn(k, generator=g) * 0.3,
        "running_mean": torch.randn(k, generator=g) * 0.3,
        "running_var": torch.rand(k, generator=g) + 0.5,
    }
    conv_args = {"stride": stride, "padding": padding, "dilation": dilation}
    probe = torch.nn.functional.conv2d(x, weight, **conv_args)
    residual = torch.randn(probe.shape, generator=g) if with_residual else None
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = x.to(dtype).contiguous(memory_format=fmt)
    if residual is not None:
        residual = residual.to(dtype).contiguous(memory_format=fmt)
    return x, weight.to(dtype), bn, residual, conv_args


def fused(x, weight, bn, residual, conv_args, backend, relu=True, **extra):
    """The functional op on a make_case() case."""
    return conv_bn_act(
        x, weight, bn["running_mean"], bn["running_var"], bn_weight=bn["bn_weight"], bn_bias=bn["bn_bias"],
        residual=residual, relu=relu, backend=backend, **conv_args, **extra,
    )


def exact_and_unfused(x, weight, bn, residual, conv_args, relu):
    exact = reference.conv_bn_act(
        x.double(), weight.double(), None, *(t.double() for t in bn.values()),
        residual=None if residual is None else residual.double(), relu=relu, **conv_args,
    )
    unfused = reference.conv_bn_act(x, weight, None, *bn.values(), residual=residual, relu=relu, **conv_args)
    return exact, unfused


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", SHAPES)
def test_matches_reference(name, dtype, channels_last, with_residual, relu):
    seed = list(SHAPES).index(name)
    x, weight, bn, residual, conv_args = make_case(SHAPES[name], dtype, channels_last, with_residual, seed)
    out = fused(x, weight, bn, residual, conv_args, "triton", relu)
    exact, unfused = exact_and_unfused(x, weight, bn, residual, conv_args, relu)

    assert out.dtype == dtype and out.shape == exact.shape
    expected_format = torch.channels_last if channels_last else torch.contiguous_format
    assert out.is_contiguous(memory_format=expected_format)
    if dtype == torch.float32:
        assert max_rel_error(out, exact) < 1e-5
    else:
        assert_low_precision_close(out, unfused, exact)


def test_conv_bias_and_missing_affine():
    """A conv bias rides in the shift; BatchNorm(affine=False) has no weight or bias."""
    x, weight, bn, residual, conv_args = make_case(SHAPES["3x3"], torch.float32, True, True, 11)
    bias = torch.randn(weight.shape[0])
    out = conv_bn_act(x, weight, bn["running_mean"], bn["running_var"], bias=bias, eps=1e-3,
                      residual=residual, backend="triton", **conv_args)
    exact = reference.conv_bn_act(
        x.double(), weight.double(), bias.double(), None, None, bn["running_mean"].double(),
        bn["running_var"].double(), eps=1e-3, residual=residual.double(), **conv_args,
    )
    assert max_rel_error(out, exact) < 1e-5


def test_int64_indexing_path_gives_the_same_result(monkeypatch):
    """Tensors spanning past 2**31 elements switch the kernel to 64-bit offsets; force that
    path on a small case and check it computes the same thing."""
    x, weight, bn, residual, conv_args = make_case(SHAPES["3x3-stride2"], torch.float32, False, True, 12)
    expected = fused(x, weight, bn, residual, conv_args, "triton")
    monkeypatch.setattr(triton_op, "INT32_MAX", 0)
    out = fused(x, weight, bn, residual, conv_args, "triton")
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_int64_decision_uses_the_span_not_numel():
    big = torch.empty_strided((2, 3, 4, 4), (2**31, 16, 4, 1), device="meta")  # 96 elements, huge span
    assert big.numel() < triton_op.INT32_MAX < span(big)


def test_strided_views_and_broadcast_residual():
    """Sliced inputs and a stride-0 (expanded) residual are read through their strides."""
    x, weight, bn, _, conv_args = make_case(SHAPES["3x3"], torch.float32, True, False, 15)
    wide = torch.randn(x.shape[0], x.shape[1] + 3, x.shape[2] + 2, x.shape[3])
    view = wide[:, 2 : 2 + x.shape[1], 1 : 1 + x.shape[2]]
    out_shape = torch.nn.functional.conv2d(view, weight, **conv_args).shape
    residual = torch.randn(1, out_shape[1], 1, 1).expand(out_shape)
    out = fused(view, weight, bn, residual, conv_args, "triton")
    exact, _ = exact_and_unfused(view, weight, bn, residual, conv_args, relu=True)
    assert max_rel_error(out, exact) < 1e-5


# (N, C, H, W, K, kernel, stride, groups): channels per group from 1 (depthwise) to wider
# than a tile; groups the kernel packs several to a tile (4-wide: 4 per tile) or one (odd
# counts that no power of two divides); K/groups ≠ C/groups (a channel multiplier).
GROUPED = {
    "resnext-4wide": (2, 32, 6, 5, 32, 3, 1, 8),
    "resnext-4wide-stride2": (1, 32, 7, 9, 32, 3, 2, 8),
    "8wide-groups2": (1, 16, 5, 5, 16, 3, 1, 2),
    "depthwise": (2, 12, 5, 7, 12, 3, 1, 12),
    "multiplier-3-groups5": (1, 5, 6, 5, 15, 3, 1, 5),
    "odd-groups3-1x1": (2, 21, 5, 4, 9, 1, 1, 3),
    "wide-groups2": (1, 40, 4, 5, 136, 3, 1, 2),
}


def make_grouped_case(shape, dtype, channels_last, with_residual, seed):
    n, c, h, w, k, ks, stride, groups = shape
    x, weight, bn, residual, conv_args = make_case((n, c, h, w, k, ks, stride, ks // 2, 1), dtype,
                                                   channels_last, with_residual, seed)
    g = torch.Generator().manual_seed(seed + 100)
    weight = (torch.randn(k, c // groups, ks, ks, generator=g) / (c // groups * ks * ks) ** 0.5).to(dtype)
    return x, weight, bn, residual, {**conv_args, "groups": groups}


@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", GROUPED)
def test_grouped_convolution_matches_reference(name, dtype, channels_last, with_residual):
    """Grouped convs run in the Triton kernel (a grid axis over groups), not on the reference path."""
    seed = 40 + list(GROUPED).index(name)
    x, weight, bn, residual, conv_args = make_grouped_case(GROUPED[name], dtype, channels_last, with_residual, seed)
    out = fused(x, weight, bn, residual, conv_args, "triton")
    exact, unfused = exact_and_unfused(x, weight, bn, residual, conv_args, relu=True)
    assert out.dtype == dtype and out.shape == exact.shape
    if dtype == torch.float32:
        assert max_rel_error(out, exact) < 1e-5
    else:
        assert_low_precision_close(out, unfused, exact)


def test_grouped_convolution_runs_the_triton_kernel(monkeypatch):
    """No fallback: the grouped call reaches the kernel, with several groups packed per program."""
    launches = []
    real = triton_op._conv_bn_act_fwd_kernel.run

    def spy(*args, grid, **kwargs):
        launches.append((grid, kwargs["GROUP_TILE"]))
        return real(*args, grid=grid, **kwargs)

    monkeypatch.setattr(triton_op._conv_bn_act_fwd_kernel, "run", spy)
    monkeypatch.setattr(reference, "conv_bn_act", None)  # a fallback would crash
    x, weight, bn, residual, conv_args = make_grouped_case(GROUPED["resnext-4wide"], torch.float32, True, True, 7)
    fused(x, weight, bn, residual, conv_args, "triton")
    assert len(launches) == 1 and launches[0][1] == 4  # 8 groups of 4 channels: 4 to a 16-wide tile


def test_group_count_past_cuda_grid_limits(monkeypatch):
    """CUDA caps grid axes 1 and 2 at 65535 (axis 0 at 2**31-1): a depthwise conv with 65537
    groups (odd: one per tile) must put its group tiles on axis 0, in both Triton convs. The
    kernels are stubbed out; only the launch grids are looked at."""
    from resnet_fused.ops.triton import conv_bn_stats

    grids = []

    def record(*args, grid, **meta):
        grids.append(grid(meta) if callable(grid) else grid)

    monkeypatch.setattr(triton_op._conv_bn_act_fwd_kernel, "run", record)
    monkeypatch.setattr(conv_bn_stats._conv_bn_stats_fwd_kernel, "run", record)
    monkeypatch.setattr(conv_bn_stats._conv_bn_stats_finalize_kernel, "run", lambda *a, **k: None)
    channels = 65537
    x, weight = torch.randn(1, channels, 1, 1), torch.randn(channels, 1, 1, 1)
    stats = (torch.zeros(channels), torch.ones(channels))
    conv_bn_act(x, weight, *stats, groups=channels, backend="triton")
    conv_bn_stats.conv_bn_stats_triton(x, weight, None, [1, 1], [0, 0], [1, 1], channels, False)
    assert len(grids) == 2
    for grid in grids:
        assert grid[0] == channels and all(extent <= 65535 for extent in grid[1:]), grid


@pytest.mark.parametrize(("groups", "c_per_group", "k_per_group", "expected"), [
    (1, 64, 64, 1), (32, 4, 4, 4), (32, 8, 8, 2), (64, 1, 1, 16), (12, 1, 1, 4), (5, 1, 3, 1),
    (8, 4, 2, 4), (2, 16, 16, 1), (3, 5, 5, 1),
])
def test_group_tile_packs_whole_groups_into_16_channels(groups, c_per_group, k_per_group, expected):
    from resnet_fused.ops.triton.implicit_gemm import group_tile

    tile = group_tile(groups, c_per_group, k_per_group)
    assert tile == expected
    assert groups % tile == 0 and (tile == 1 or tile * max(c_per_group, k_per_group) <= 16)


def test_grouped_int64_indexing_path_gives_the_same_result(monkeypatch):
    x, weight, bn, residual, conv_args = make_grouped_case(GROUPED["resnext-4wide-stride2"], torch.float32, False, True, 9)
    expected = fused(x, weight, bn, residual, conv_args, "triton")
    monkeypatch.setattr(triton_op, "INT32_MAX", 0)
    torch.testing.assert_close(fused(x, weight, bn, residual, conv_args, "triton"), expected, rtol=0, atol=0)


def test_relu_propagates_nan_like_torch():
    x = torch.ones(1, 2, 3, 3)
    x[0, 0, 1, 1] = float("nan")
    out = conv_bn_act(x, torch.ones(2, 2, 1, 1), torch.zeros(2), torch.ones(2), backend="triton")
    assert torch.isnan(out[0, :, 1, 1]).all() and not torch.isnan(out[0, :, 0, 0]).any()


def test_empty_batch_returns_empty_output():
    out = conv_bn_act(torch.randn(0, 3, 5, 5), torch.randn(4, 3, 3, 3), torch.zeros(4), torch.ones(4), padding=1, backend="triton")
    assert out.shape == (0, 4, 5, 5)


def test_custom_op_contract():
    """torch.library.opcheck: schema, fake (meta) shapes and strides, and dispatch agree."""
    for channels_last in (True, False):
        x, weight, bn, residual, _ = make_case(SHAPES["3x3"], torch.float32, channels_last, True, 14)
        args = (x, weight, None, bn["bn_weight"], bn["bn_bias"], bn["running_mean"], bn["running_var"], 1e-5,
                residual, [1, 1], [1, 1], [1, 1], 1, *act_args(True), False)
        torch.library.opcheck(triton_op.conv_bn_act_triton, args)
    x, weight, bn, residual, _ = make_grouped_case(GROUPED["resnext-4wide"], torch.float32, True, True, 17)
    args = (x, weight, None, bn["bn_weight"], bn["bn_bias"], bn["running_mean"], bn["running_var"], 1e-5,
            residual, [1, 1], [1, 1], [1, 1], 8, *act_args(True), False)
    torch.library.opcheck(triton_op.conv_bn_act_triton, args)


@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_strided_per_channel_tensors(backend):
    """BN tensors that are views with a stride (slices of a larger buffer) are read correctly."""
    x, weight, bn, residual, conv_args = make_case(SHAPES["3x3"], torch.float32, True, True, 16)
    k = weight.shape[0]
    strided = {}
    for name, t in bn.items():
        buffer = torch.randn(2 * k)
        buffer[::2] = t
        strided[name] = buffer[::2]
    bias_buffer = torch.randn(3 * k)
    bias = bias_buffer[::3]
    out = conv_bn_act(x, weight, strided["running_mean"], strided["running_var"], bias=bias,
                      bn_weight=strided["bn_weight"], bn_bias=strided["bn_bias"], residual=residual,
                      backend=backend, **conv_args)
    exact = reference.conv_bn_act(
        x.double(), weight.double(), bias.double(), *(t.double() for t in bn.values()),
        residual=residual.double(), **conv_args,
    )
    assert max_rel_error(out, exact) < 1e-5
