"""The inference op conv_bn_act (conv + BatchNorm + residual + ReLU, one pass) on every backend,
against the unfused reference.

On the CPU: the tiny shapes of cases.py, Triton under TRITON_INTERPRET=1, the C++ op (oneDNN
conv + one epilogue pass). On the GPU (marked ``gpu``, run by benchmarks/gpu_check.sh with
``TRITON_INTERPRET=0 RESNET_FUSED_AUTOTUNE=0 pytest -m gpu``): the Triton kernel compiled for the
device and the cuda backend, on ResNet-50 shapes too. Then what one backend alone has: Triton's
int64 indexing, group tiles and autotuner configs; the cuda backend's CUTLASS kernels.
"""

from __future__ import annotations

import pytest
import torch

import resnet_fused
from cases import (
    ALL_CONV_SHAPES, CONV_SHAPES, CUTLASS_SHAPES, GROUPED_GPU_SHAPES, GROUPED_SHAPES, RESNET50_IDS, conv_bn_act_grid,
    exact_and_unfused, fused, grouped_grid, make_case, make_grouped_case, tiny_variance_case,
)
from helpers import act_args, assert_low_precision_close, assert_output_close, max_rel_error
from resnet_fused.functional import conv_bn_act
from resnet_fused.ops import reference
from resnet_fused.ops.shapes import span
from resnet_fused.ops.triton import conv_bn_act as triton_op


def case(name, dtype, channels_last=True, with_residual=True, relu=True, device="cpu"):
    """A cases.py shape as operands on ``device``, with its fp64 and same-dtype references."""
    x, weight, bn, residual, conv_args = make_case(ALL_CONV_SHAPES[name], dtype, channels_last, with_residual,
                                                   list(ALL_CONV_SHAPES).index(name), device)
    exact, unfused = exact_and_unfused(x, weight, bn, residual, conv_args, relu)
    return x, weight, bn, residual, conv_args, exact, unfused


# --- every backend ---------------------------------------------------------------------------


@pytest.mark.grid("name, dtype, layout, with_residual, relu", conv_bn_act_grid)
def test_matches_reference(backend, device, name, dtype, layout, with_residual, relu):
    channels_last = layout == "nhwc"
    x, weight, bn, residual, conv_args, exact, unfused = case(name, dtype, channels_last, with_residual, relu, device)
    out = fused(x, weight, bn, residual, conv_args, backend, relu)
    assert_output_close(out, exact, unfused, dtype, channels_last)


@pytest.mark.grid("name, dtype, layout, with_residual", grouped_grid)
def test_grouped_convolution_matches_reference(backend, name, dtype, layout, with_residual):
    """Grouped convs run in each backend's own kernel (Triton: a grid axis over groups), not on
    the reference path."""
    seed = 40 + list(GROUPED_SHAPES).index(name)
    channels_last = layout == "nhwc"
    x, weight, bn, residual, conv_args = make_grouped_case(GROUPED_SHAPES[name], dtype, channels_last, with_residual, seed)
    out = fused(x, weight, bn, residual, conv_args, backend)
    exact, unfused = exact_and_unfused(x, weight, bn, residual, conv_args, relu=True)
    assert_output_close(out, exact, unfused, dtype, channels_last)


def test_conv_bias_and_missing_affine(backend):
    """A conv bias rides in the shift; BatchNorm(affine=False) has no weight or bias."""
    x, weight, bn, residual, conv_args = make_case(CONV_SHAPES["3x3"], torch.float32, True, True, 11)
    bias = torch.randn(weight.shape[0])
    out = conv_bn_act(x, weight, bn["running_mean"], bn["running_var"], bias=bias, eps=1e-3,
                      residual=residual, backend=backend, **conv_args)
    exact = reference.conv_bn_act(
        x.double(), weight.double(), bias.double(), None, None, bn["running_mean"].double(),
        bn["running_var"].double(), eps=1e-3, residual=residual.double(), **conv_args,
    )
    assert max_rel_error(out, exact) < 1e-5


def test_strided_views_and_broadcast_residual(backend):
    """Sliced inputs and a stride-0 (expanded) residual are read through their strides."""
    x, weight, bn, _, conv_args = make_case(CONV_SHAPES["3x3"], torch.float32, True, False, 15)
    wide = torch.randn(x.shape[0], x.shape[1] + 3, x.shape[2] + 2, x.shape[3])
    view = wide[:, 2 : 2 + x.shape[1], 1 : 1 + x.shape[2]]
    out_shape = torch.nn.functional.conv2d(view, weight, **conv_args).shape
    residual = torch.randn(1, out_shape[1], 1, 1).expand(out_shape)
    out = fused(view, weight, bn, residual, conv_args, backend)
    exact, _ = exact_and_unfused(view, weight, bn, residual, conv_args, relu=True)
    assert max_rel_error(out, exact) < 1e-5


def test_residual_in_another_layout_and_grouped_conv(backend):
    x, weight, bn, residual, conv_args = make_case(CONV_SHAPES["3x3"], torch.float32, True, True, 120)
    residual = residual.contiguous()  # NCHW residual with a channels_last input
    exact, _ = exact_and_unfused(x, weight, bn, residual, conv_args, relu=True)
    assert max_rel_error(fused(x, weight, bn, residual, conv_args, backend), exact) < 1e-5

    x, weight, bn, _, conv_args = make_case((1, 6, 7, 7, 4, 3, 1, 1, 1), torch.float32, False, False, 124)
    weight = weight[:, :3].contiguous()
    expected = reference.conv_bn_act(x, weight, None, *bn.values(), groups=2, **conv_args)
    torch.testing.assert_close(fused(x, weight, bn, None, conv_args, backend, groups=2), expected)


def test_strided_per_channel_tensors(backend):
    """BN tensors that are views with a stride (slices of a larger buffer) are read correctly."""
    x, weight, bn, residual, conv_args = make_case(CONV_SHAPES["3x3"], torch.float32, True, True, 16)
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


def test_relu_propagates_nan_like_torch(backend):
    x = torch.ones(1, 2, 3, 3)
    x[0, 0, 1, 1] = float("nan")
    out = conv_bn_act(x, torch.ones(2, 2, 1, 1), torch.zeros(2), torch.ones(2), backend=backend)
    assert torch.isnan(out[0, :, 1, 1]).all() and not torch.isnan(out[0, :, 0, 0]).any()


def test_empty_batch_returns_empty_output(backend):
    out = conv_bn_act(torch.randn(0, 3, 5, 5), torch.randn(4, 3, 3, 3), torch.zeros(4), torch.ones(4), padding=1,
                      backend=backend)
    assert out.shape == (0, 4, 5, 5)


def _op_and_args(backend, x, weight, bias, bn, residual, stride, groups=1):
    """The backend's custom op (torch.library) and its arguments for one case."""
    args = (x, weight, bias, bn["bn_weight"], bn["bn_bias"], bn["running_mean"], bn["running_var"], 1e-5,
            residual, [stride, stride], [1, 1], [1, 1], groups, *act_args(True))
    if backend == "triton":
        return triton_op.conv_bn_act_triton, (*args, False)
    return torch.ops.resnet_fused.conv_bn_act.default, args


def test_op_contract(backend, device):
    """torch.library.opcheck: schema, fake (meta) shapes and strides, and dispatch agree."""
    if device == "cuda":
        x, weight, bn, residual, *_ = case("3x3-128", torch.float16, device="cuda")
        torch.library.opcheck(*_op_and_args(backend, x, weight, None, bn, residual, 1))
        return
    for channels_last in (True, False):
        x, weight, bn, residual, _ = make_case(CONV_SHAPES["3x3"], torch.float32, channels_last, True, 14)
        torch.library.opcheck(*_op_and_args(backend, x, weight, None, bn, residual, 1))
        x, weight, bn, residual, _ = make_case(CONV_SHAPES["3x3-stride2"], torch.float32, channels_last, True, 121)
        torch.library.opcheck(*_op_and_args(backend, x, weight, torch.randn(weight.shape[0]), bn, residual, 2))
    x, weight, bn, residual, _ = make_grouped_case(GROUPED_SHAPES["resnext-4wide"], torch.float32, True, True, 17)
    torch.library.opcheck(*_op_and_args(backend, x, weight, None, bn, residual, 1, groups=8))


def test_op_under_inductor(backend):
    x, weight, bn, residual, conv_args = make_case(CONV_SHAPES["3x3-stride2"], torch.float32, True, True, 123)

    def fn(x, residual):
        return fused(x, weight, bn, residual, conv_args, backend)

    compiled = torch.compile(fn, fullgraph=True)
    torch.testing.assert_close(compiled(x, residual), fn(x, residual), rtol=0, atol=0)


# --- triton: int64 indexing, group tiles, launch grids, autotuner configs, TF32 --------------


def test_int64_indexing_path_gives_the_same_result(monkeypatch):
    """Tensors spanning past 2**31 elements switch the kernel to 64-bit offsets; force that
    path on a small case and check it computes the same thing."""
    x, weight, bn, residual, conv_args = make_case(CONV_SHAPES["3x3-stride2"], torch.float32, False, True, 12)
    expected = fused(x, weight, bn, residual, conv_args, "triton")
    monkeypatch.setattr(triton_op, "INT32_MAX", 0)
    out = fused(x, weight, bn, residual, conv_args, "triton")
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_int64_decision_uses_the_span_not_numel():
    big = torch.empty_strided((2, 3, 4, 4), (2**31, 16, 4, 1), device="meta")  # 96 elements, huge span
    assert big.numel() < triton_op.INT32_MAX < span(big)


def test_grouped_convolution_runs_the_triton_kernel(monkeypatch):
    """No fallback: the grouped call reaches the kernel, with several groups packed per program."""
    launches = []
    real = triton_op._conv_bn_act_fwd_kernel.run

    def spy(*args, grid, **kwargs):
        launches.append((grid, kwargs["GROUP_TILE"]))
        return real(*args, grid=grid, **kwargs)

    monkeypatch.setattr(triton_op._conv_bn_act_fwd_kernel, "run", spy)
    monkeypatch.setattr(reference, "conv_bn_act", None)  # a fallback would crash
    x, weight, bn, residual, conv_args = make_grouped_case(GROUPED_SHAPES["resnext-4wide"], torch.float32, True, True, 7)
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
    x, weight, bn, residual, conv_args = make_grouped_case(GROUPED_SHAPES["resnext-4wide-stride2"], torch.float32, False,
                                                           True, 9)
    expected = fused(x, weight, bn, residual, conv_args, "triton")
    monkeypatch.setattr(triton_op, "INT32_MAX", 0)
    torch.testing.assert_close(fused(x, weight, bn, residual, conv_args, "triton"), expected, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("name", ["3x3-256-stride2", "stem"])
def test_every_autotuner_config(name, dtype):
    """The autotuner may pick any config; each is run explicitly (the other GPU tests run
    with RESNET_FUSED_AUTOTUNE=0, i.e. the first config only)."""
    x, weight, bn, residual, conv_args, exact, unfused = case(name, dtype, device="cuda")
    for config in triton_op.gpu_configs(dtype, x.shape[1], weight.shape[0]):
        out = triton_op.launch(
            x, weight, None, bn["bn_weight"], bn["bn_bias"], bn["running_mean"], bn["running_var"], 1e-5, residual,
            [conv_args["stride"]] * 2, [conv_args["padding"]] * 2, [conv_args["dilation"]] * 2, 1, *act_args(True),
            False, config=config,
        )
        assert_output_close(out, exact, unfused, dtype, True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("name", GROUPED_GPU_SHAPES)
def test_grouped_conv_every_config_and_statistics(name, dtype):
    """Grouped convs in the Triton kernels: every config the autotuner may choose for the
    shape, the autotuned op, and the training conv's batch statistics."""
    from resnet_fused.ops.triton import conv_bn_stats

    x, weight, bn, residual, conv_args = make_grouped_case(GROUPED_GPU_SHAPES[name], dtype, True, True, 8, "cuda")
    exact, unfused = exact_and_unfused(x, weight, bn, residual, conv_args, relu=True)
    groups = conv_args["groups"]
    tile_c, tile_k, _ = triton_op.group_grid(x.shape[1], weight.shape[0], groups)
    pair = lambda v: [v, v]  # noqa: E731
    conv = (pair(conv_args["stride"]), pair(conv_args["padding"]), pair(conv_args["dilation"]), groups)
    for config in triton_op.gpu_configs(dtype, tile_c, tile_k):
        out = triton_op.launch(x, weight, None, bn["bn_weight"], bn["bn_bias"], bn["running_mean"], bn["running_var"],
                               1e-5, residual, *conv, *act_args(True), False, config=config)
        assert_output_close(out, exact, unfused, dtype, True)
    assert_output_close(fused(x, weight, bn, residual, conv_args, "triton"), exact, unfused, dtype, True)

    y, mean, var = conv_bn_stats.conv_bn_stats_triton(x, weight, None, *conv, False)
    exact_y = torch.nn.functional.conv2d(x.double(), weight.double(), None, *conv)
    exact_mean, exact_var = reference.bn_stats(exact_y)
    unfused_y = torch.nn.functional.conv2d(x, weight, None, *conv)
    if dtype == torch.float32:
        assert max_rel_error(y, exact_y) < 1e-5
    else:
        assert_low_precision_close(y, unfused_y, exact_y)
    # Statistics are reduced in fp32 from the unrounded fp32 accumulator, whatever the dtype
    # (exact_y is the conv of the already-rounded operands).
    tol = 1e-5 if dtype == torch.float32 else 1e-4
    assert max_rel_error(mean, exact_mean) < tol and max_rel_error(var, exact_var) < tol


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["3x3-128", "1x1-512-2048", "stem"])
def test_tf32_follows_the_cudnn_flag(name):
    """IEEE fp32 is within 1e-5 of fp64; with cuDNN's TF32 flag on the kernel uses TF32
    (10-bit mantissa): visibly less exact, yet within TF32's ~1e-3."""
    x, weight, bn, residual, conv_args, exact, _ = case(name, torch.float32, device="cuda")
    ieee = max_rel_error(fused(x, weight, bn, residual, conv_args, "triton"), exact)
    torch.backends.cudnn.allow_tf32 = True
    tf32 = max_rel_error(fused(x, weight, bn, residual, conv_args, "triton"), exact)
    assert ieee < 1e-5 < tf32 < 1e-2, (ieee, tf32)


# --- cuda: the CUTLASS path (csrc/cuda/cutlass/cutlass_*.cu) ----------------------------------
# One fused launch per conv where _C.cuda_conv_plan says so, the exact cuDNN + epilogue path
# elsewhere. Each case also checks, with the op's dispatch counters, that the kernel the plan
# names is the one that ran.


def _cuda_plan(x, weight, conv_args, groups=1):
    pair = lambda v: list(v) if isinstance(v, (tuple, list)) else [v, v]  # noqa: E731
    props = torch.cuda.get_device_properties(x.device)
    return resnet_fused._C.cuda_conv_plan(
        list(x.shape), list(weight.shape), pair(conv_args["stride"]), pair(conv_args["padding"]),
        pair(conv_args["dilation"]), groups, str(x.dtype).removeprefix("torch."),
        x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous(),
        (props.major, props.minor), props.multi_processor_count,
    )


def _run_counted(x, weight, bn, residual, conv_args, relu, groups=1):
    """The cuda op, and which CUTLASS kernel (or None) actually ran it."""
    before = resnet_fused._C.cuda_dispatch_counts()
    out = fused(x, weight, bn, residual, conv_args, "cuda", relu, groups=groups)
    torch.cuda.synchronize()
    after = resnet_fused._C.cuda_dispatch_counts()
    ran = [name for name in after if after[name] != before[name]]
    assert after["fallback_runtime"] == before["fallback_runtime"], "CUTLASS refused a planned problem or failed"
    return out, ran


@pytest.fixture(params=[True, False], ids=["sm90", "sm80"])
def cutlass_family(request):
    """sm90 kernels (the default on Hopper), or with them off the sm80 kernels' sm_90 cubins."""
    if not request.param and torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the sm80-on-Hopper variant needs a 9.0 GPU (elsewhere sm80 is the default)")
    previous = resnet_fused._C.cuda_conv_enable_sm90(request.param)
    yield "sm90" if request.param and torch.cuda.get_device_capability() == (9, 0) else "sm80"
    resnet_fused._C.cuda_conv_enable_sm90(previous)


@pytest.mark.gpu
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "linear"])
@pytest.mark.parametrize("with_residual", [True, False], ids=["res", "nores"])
@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", CUTLASS_SHAPES)
def test_cutlass_op_matches_reference(name, dtype, channels_last, with_residual, relu, cutlass_family):
    # Every residual/ReLU combination in channels_last; NCHW (the same kernel between two layout
    # copies) and the sm80-on-Hopper variant with two of them, to keep the GPU run short.
    if (not channels_last or cutlass_family == "sm80") and (
        (channels_last, with_residual, relu) not in ((True, True, True), (False, False, False))
    ):
        pytest.skip("covered by the other layout/residual/ReLU combinations")
    x, weight, bn, residual, conv_args = make_case(CUTLASS_SHAPES[name], dtype, channels_last, with_residual, 11, "cuda")
    exact, unfused = exact_and_unfused(x, weight, bn, residual, conv_args, relu)

    plan = _cuda_plan(x, weight, conv_args)
    out, ran = _run_counted(x, weight, bn, residual, conv_args, relu)
    assert ran == ([plan["kernel"]] if plan["kernel"] else ["fallback_plan"]), (plan, ran)
    if name in RESNET50_IDS and "stem" not in name and CUTLASS_SHAPES[name][1] != 3:
        assert plan["kernel"] is not None and plan["kernel"].startswith(cutlass_family), plan
    assert_output_close(out, exact, unfused, dtype, channels_last)


@pytest.mark.gpu
@pytest.mark.parametrize("tile_n", [128, 64])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_every_cutlass_tile_runs_and_matches(tile_n, dtype, cutlass_family):
    """Each CUTLASS kernel of the build on this GPU: the test grid's shapes are too small to fill
    a wave of 128x128 tiles on 132 SMs, so the plan gives them all N=64 (codegen/
    test_cuda_dispatch.py's heuristic). A 1x1 conv to 256 channels (resnet50's layer1 conv3)
    whose batch gives the 128x128 grid at least one wave takes the 128 kernel; 192 channels
    (a multiple of 64, not of 128) the 64 one."""
    sm_count = torch.cuda.get_device_properties(0).multi_processor_count
    k, hw = (256, 28) if tile_n == 128 else (192, 14)
    batch = -(-sm_count * 128 // (k // 128 * hw * hw)) if tile_n == 128 else 2  # ceil: one wave of CTAs
    x, weight, bn, residual, conv_args = make_case((batch, 64, hw, hw, k, 1, 1, 0, 1), dtype, True, True, 12, "cuda")
    exact, unfused = exact_and_unfused(x, weight, bn, residual, conv_args, True)
    plan = _cuda_plan(x, weight, conv_args)
    dtype_name = "f16" if dtype == torch.float16 else "bf16"
    assert plan["kernel"] is not None and plan["kernel"].startswith(f"{cutlass_family}_{dtype_name}_128x{tile_n}x"), plan
    out, ran = _run_counted(x, weight, bn, residual, conv_args, True)
    assert ran == [plan["kernel"]], (plan, ran)
    assert_output_close(out, exact, unfused, dtype, True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16-groups2"])
def test_cutlass_exact_path_cases(dtype):
    """fp32 and grouped convs go to cuDNN + epilogue, with the same answer as before."""
    groups = 1 if dtype == torch.float32 else 2
    x, weight, bn, residual, conv_args, exact, unfused = case("3x3-128", dtype, device="cuda")
    if groups == 2:
        weight = weight[:, : weight.shape[1] // 2].contiguous()
        exact = reference.conv_bn_act(
            x.double(), weight.double(), None, *(t.double() for t in bn.values()), residual=residual.double(),
            groups=2, **conv_args,
        )
        unfused = reference.conv_bn_act(x, weight, None, *bn.values(), residual=residual, groups=2, **conv_args)
    out, ran = _run_counted(x, weight, bn, residual, conv_args, True, groups=groups)
    assert ran == ["fallback_plan"]
    assert_output_close(out, exact, unfused, dtype, True)


@pytest.mark.gpu
def test_cutlass_reads_live_batch_norm():
    """No fold cache: a changed BN tensor changes the next call's answer."""
    x, weight, bn, residual, conv_args, _, _ = case("3x3-128", torch.float16, device="cuda")
    first = fused(x, weight, bn, residual, conv_args, "cuda")
    bn["running_var"].mul_(4)
    second = fused(x, weight, bn, residual, conv_args, "cuda")
    expected = reference.conv_bn_act(x, weight, None, *bn.values(), residual=residual, **conv_args)
    torch.cuda.synchronize()
    assert not torch.equal(first, second)
    assert max_rel_error(second, expected) < 2e-2


@pytest.mark.gpu
def test_cutlass_tiny_running_variance(cutlass_family):
    """A channel with running_var 1e-8 over a dead input channel, where the sm80 kernel's scaled
    float16 filter would overflow (codegen/test_cuda_sm80_scaling.py): finite and within the rule."""
    x, weight, bn = tiny_variance_case()
    conv_args = {"stride": 1, "padding": 1, "dilation": 1}
    x = x.cuda().half().contiguous(memory_format=torch.channels_last)
    weight = weight.cuda().half()
    bn = {k: v.cuda() for k, v in bn.items()}
    exact, unfused = exact_and_unfused(x, weight, bn, None, conv_args, relu=True)
    plan = _cuda_plan(x, weight, conv_args)
    out, ran = _run_counted(x, weight, bn, None, conv_args, True)
    assert plan["kernel"] is not None and plan["kernel"].startswith(cutlass_family) and ran == [plan["kernel"]]
    assert torch.isfinite(out).all()
    assert_low_precision_close(out, unfused, exact)
