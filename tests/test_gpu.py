"""GPU checks: the Triton kernel compiled for the real device and the CUDA op, against the
unfused reference. Marked ``gpu``: skipped without CUDA or under TRITON_INTERPRET=1 (see
conftest). Run by benchmarks/gpu_check.sh as
``TRITON_INTERPRET=0 RESNET_FUSED_AUTOTUNE=0 pytest -m gpu``."""

from __future__ import annotations

import pytest
import torch
from torchvision.models import resnet18, resnet50

import resnet_fused
from helpers import act_args, assert_low_precision_close, max_rel_error, randomize_batch_norms
from resnet_fused.ops import reference
from resnet_fused.ops.triton import conv_bn_act as triton_op
from test_conv_bn_act import SHAPES, fused, make_case

pytestmark = pytest.mark.gpu

# ResNet-50 shapes at a small batch (N, C, H, W, K, kernel, stride, padding, dilation), with
# channel counts that are multiples of 16 so the vectorized, wgmma-friendly paths are taken.
RESNET_SHAPES = {
    "stem": (2, 3, 56, 56, 64, 7, 2, 3, 1),
    # More output elements than two waves of the CUDA epilogue, K dividing neither.
    "epilogue-waves": (8, 16, 60, 60, 67, 3, 1, 1, 1),
    "1x1-256-64": (2, 256, 28, 28, 64, 1, 1, 0, 1),
    "3x3-128": (2, 128, 28, 28, 128, 3, 1, 1, 1),
    "3x3-256-stride2": (2, 256, 14, 14, 256, 3, 2, 1, 1),
    "1x1-512-2048": (2, 512, 7, 7, 2048, 1, 1, 0, 1),
}
ALL_SHAPES = {**SHAPES, **RESNET_SHAPES}


@pytest.fixture(autouse=True)
def _ieee_fp32():
    """fp32 references must not silently use TF32; tests that want TF32 turn it on."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def gpu_case(name, dtype, channels_last, with_residual):
    x, weight, bn, residual, conv_args = make_case(ALL_SHAPES[name], torch.float32, channels_last, with_residual, 7)
    to = dict(device="cuda")
    x, weight = x.to(**to), weight.to(**to)
    bn = {k: v.to(**to) for k, v in bn.items()}
    residual = None if residual is None else residual.to(**to)
    exact = reference.conv_bn_act(
        x.double(), weight.double(), None, *(t.double() for t in bn.values()),
        residual=None if residual is None else residual.double(), **conv_args,
    )
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    unfused = reference.conv_bn_act(cast(x), cast(weight), None, *bn.values(), residual=cast(residual), **conv_args)
    return cast(x), cast(weight), bn, cast(residual), conv_args, exact, unfused


def check(out, exact, unfused, dtype, channels_last):
    torch.cuda.synchronize()
    assert out.dtype == dtype and out.shape == exact.shape
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    if dtype == torch.float32:
        assert max_rel_error(out, exact) < 1e-5
    else:
        assert_low_precision_close(out, unfused, exact)


# Every shape in fp16 and fp32 (IEEE) in both layouts; bf16 on the ResNet shapes. The tiny
# shapes' other residual/ReLU combinations are covered under the interpreter on the CPU.
OP_CASES = [
    (name, dtype)
    for name in ALL_SHAPES
    for dtype in (torch.float16, torch.float32, *((torch.bfloat16,) if name in RESNET_SHAPES else ()))
]


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
@pytest.mark.parametrize(("name", "dtype"), OP_CASES, ids=[f"{n}-{str(d)[6:]}" for n, d in OP_CASES])
def test_op_matches_reference(name, dtype, channels_last, backend):
    x, weight, bn, residual, conv_args, exact, unfused = gpu_case(name, dtype, channels_last, True)
    check(fused(x, weight, bn, residual, conv_args, backend), exact, unfused, dtype, channels_last)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("relu", [True, False])
def test_op_without_residual(relu, backend):
    x, weight, bn, _, conv_args, _, _ = gpu_case("1x1-256-64", torch.float16, True, False)
    exact = reference.conv_bn_act(x.double(), weight.double(), None, *(t.double() for t in bn.values()), relu=relu, **conv_args)
    unfused = reference.conv_bn_act(x, weight, None, *bn.values(), relu=relu, **conv_args)
    check(fused(x, weight, bn, None, conv_args, backend, relu), exact, unfused, torch.float16, True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("name", ["3x3-256-stride2", "stem"])
def test_every_autotuner_config(name, dtype):
    """The autotuner may pick any config; each is run explicitly (the other GPU tests run
    with RESNET_FUSED_AUTOTUNE=0, i.e. the first config only)."""
    x, weight, bn, residual, conv_args, exact, unfused = gpu_case(name, dtype, True, True)
    for config in triton_op.gpu_configs(dtype, x.shape[1], weight.shape[0]):
        out = triton_op.launch(
            x, weight, None, bn["bn_weight"], bn["bn_bias"], bn["running_mean"], bn["running_var"], 1e-5, residual,
            [conv_args["stride"]] * 2, [conv_args["padding"]] * 2, [conv_args["dilation"]] * 2, 1, *act_args(True),
            False, config=config,
        )
        check(out, exact, unfused, dtype, True)


# ResNeXt's grouped 3x3 convs (N, C, H, W, K, kernel, stride, groups): resnext50_32x4d's
# 4-, 8- and 32-wide groups (4 and 2 groups packed per tile, then one), resnext101_32x8d's
# 64-wide last stage (the standard tiles), and a depthwise conv (16 groups per tile).
GROUPED_SHAPES = {
    "resnext-4wide": (2, 128, 28, 28, 128, 3, 1, 32),
    "resnext-8wide-stride2": (2, 256, 28, 28, 256, 3, 2, 32),
    "resnext-32wide": (2, 1024, 7, 7, 1024, 3, 1, 32),
    "resnext-64wide": (2, 2048, 7, 7, 2048, 3, 1, 32),
    "depthwise": (2, 64, 14, 14, 64, 3, 1, 64),
}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("name", GROUPED_SHAPES)
def test_grouped_conv_every_config_and_statistics(name, dtype):
    """Grouped convs in the Triton kernels: every config the autotuner may choose for the
    shape, the autotuned op, and the training conv's batch statistics."""
    from resnet_fused.ops.triton import conv_bn_stats
    from test_conv_bn_act import make_grouped_case

    x, weight, bn, residual, conv_args = make_grouped_case(GROUPED_SHAPES[name], torch.float32, True, True, 8)
    x, weight, residual = (t.cuda() for t in (x, weight, residual))
    bn = {k: v.cuda() for k, v in bn.items()}
    exact = reference.conv_bn_act(x.double(), weight.double(), None, *(t.double() for t in bn.values()),
                                  residual=residual.double(), **conv_args)
    x, weight, residual = x.to(dtype), weight.to(dtype), residual.to(dtype)
    unfused = reference.conv_bn_act(x, weight, None, *bn.values(), residual=residual, **conv_args)
    groups = conv_args["groups"]
    tile_c, tile_k, _ = triton_op.group_grid(x.shape[1], weight.shape[0], groups)
    pair = lambda v: [v, v]  # noqa: E731
    conv = (pair(conv_args["stride"]), pair(conv_args["padding"]), pair(conv_args["dilation"]), groups)
    for config in triton_op.gpu_configs(dtype, tile_c, tile_k):
        out = triton_op.launch(x, weight, None, bn["bn_weight"], bn["bn_bias"], bn["running_mean"], bn["running_var"],
                               1e-5, residual, *conv, *act_args(True), False, config=config)
        check(out, exact, unfused, dtype, True)
    check(fused(x, weight, bn, residual, conv_args, "triton"), exact, unfused, dtype, True)

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


@pytest.mark.parametrize("name", ["3x3-128", "1x1-512-2048", "stem"])
def test_tf32_follows_the_cudnn_flag(name):
    """IEEE fp32 is within 1e-5 of fp64; with cuDNN's TF32 flag on the kernel uses TF32
    (10-bit mantissa): visibly less exact, yet within TF32's ~1e-3."""
    x, weight, bn, residual, conv_args, exact, _ = gpu_case(name, torch.float32, True, True)
    ieee = max_rel_error(fused(x, weight, bn, residual, conv_args, "triton"), exact)
    torch.backends.cudnn.allow_tf32 = True
    tf32 = max_rel_error(fused(x, weight, bn, residual, conv_args, "triton"), exact)
    assert ieee < 1e-5 < tf32 < 1e-2, (ieee, tf32)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_op_contracts_on_gpu(backend):
    x, weight, bn, residual, _, _, _ = gpu_case("3x3-128", torch.float16, True, True)
    args = (x, weight, None, bn["bn_weight"], bn["bn_bias"], bn["running_mean"], bn["running_var"], 1e-5,
            residual, [1, 1], [1, 1], [1, 1])
    if backend == "triton":
        torch.library.opcheck(torch.ops.resnet_fused.conv_bn_act_triton.default, (*args, 1, *act_args(True), False))
    else:
        torch.library.opcheck(torch.ops.resnet_fused.conv_bn_act.default, (*args, 1, *act_args(True)))


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("factory", [resnet18, resnet50], ids=["resnet18", "resnet50"])
def test_converted_resnet_fp32(factory, backend):
    torch.manual_seed(1)
    model = randomize_batch_norms(factory(), torch.Generator().manual_seed(1)).eval().cuda()
    converted = resnet_fused.convert(model, backend=backend)
    x = torch.randn(4, 3, 96, 96, device="cuda")
    with torch.inference_mode():
        assert max_rel_error(converted(x), model(x)) < 1e-4


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


# ---------------------------------------------------------------------------
# The cuda backend's CUTLASS path (csrc/cuda/cutlass/cutlass_*.cu): one fused launch per conv where
# _C.cuda_conv_plan says so, the exact cuDNN + epilogue path elsewhere. Each case also checks,
# with the op's dispatch counters, that the kernel the plan names is the one that ran.

from test_cuda_dispatch import RESNET50, RESNET50_IDS  # noqa: E402

# Odd shapes as (N, C, H, W, K, kernel, stride, padding, dilation), fused or not.
CUTLASS_ODD = {
    "stem-C3": (2, 3, 32, 32, 64, 7, 2, 3, 1),  # exact path: C = 3
    "C8-7x7-stride2": (2, 8, 33, 31, 64, 7, 2, 3, 1),
    "C12": (2, 12, 9, 9, 16, 3, 1, 1, 1),  # exact path
    "K20": (2, 16, 9, 9, 20, 3, 1, 1, 1),  # exact path
    "dilation2": (2, 32, 15, 13, 48, 3, 1, 2, 2),
    "asymmetric": (1, 16, 9, 8, 24, 3, (2, 1), (1, 0), 1),
    "tiny-M": (1, 64, 1, 1, 8, 1, 1, 0, 1),
    "pad130": (1, 16, 4, 4, 16, 3, 1, 130, 1),  # past TMA's corner limits: sm80 on Hopper
}


def _resnet_case(shape: dict) -> tuple:
    n, c, h, w = shape["input_shape"]
    k, _, r, _ = shape["weight_shape"]
    return (n, c, h, w, k, r, shape["stride"][0], shape["padding"][0], shape["dilation"][0])


CUTLASS_SHAPES = {**{i: _resnet_case(s) for i, s in zip(RESNET50_IDS, RESNET50)}, **CUTLASS_ODD}


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
    x, weight, bn, residual, conv_args = make_case(CUTLASS_SHAPES[name], torch.float32, channels_last, with_residual, 11)
    to = lambda t: None if t is None else t.cuda()  # noqa: E731
    x, weight, residual = to(x), to(weight), to(residual)
    bn = {k: v.cuda() for k, v in bn.items()}
    exact = reference.conv_bn_act(
        x.double(), weight.double(), None, *(t.double() for t in bn.values()),
        residual=None if residual is None else residual.double(), relu=relu, **conv_args,
    )
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x, weight = cast(x).contiguous(memory_format=fmt), cast(weight)
    residual = None if residual is None else cast(residual).contiguous(memory_format=fmt)
    unfused = reference.conv_bn_act(x, weight, None, *bn.values(), residual=residual, relu=relu, **conv_args)

    plan = _cuda_plan(x, weight, conv_args)
    out, ran = _run_counted(x, weight, bn, residual, conv_args, relu)
    assert ran == ([plan["kernel"]] if plan["kernel"] else ["fallback_plan"]), (plan, ran)
    if name in RESNET50_IDS and "stem" not in name and CUTLASS_SHAPES[name][1] != 3:
        assert plan["kernel"] is not None and plan["kernel"].startswith(cutlass_family), plan
    check(out, exact, unfused, dtype, channels_last)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16-groups2"])
def test_cutlass_exact_path_cases(dtype):
    """fp32 and grouped convs go to cuDNN + epilogue, with the same answer as before."""
    groups = 1 if dtype == torch.float32 else 2
    x, weight, bn, residual, conv_args, exact, unfused = gpu_case("3x3-128", dtype, True, True)
    if groups == 2:
        weight = weight[:, : weight.shape[1] // 2].contiguous()
        exact = reference.conv_bn_act(
            x.double(), weight.double(), None, *(t.double() for t in bn.values()), residual=residual.double(),
            groups=2, **conv_args,
        )
        unfused = reference.conv_bn_act(x, weight, None, *bn.values(), residual=residual, groups=2, **conv_args)
    out, ran = _run_counted(x, weight, bn, residual, conv_args, True, groups=groups)
    assert ran == ["fallback_plan"]
    check(out, exact, unfused, dtype, True)


def test_cutlass_reads_live_batch_norm():
    """No fold cache: a changed BN tensor changes the next call's answer."""
    x, weight, bn, residual, conv_args, _, _ = gpu_case("3x3-128", torch.float16, True, True)
    first = fused(x, weight, bn, residual, conv_args, "cuda")
    bn["running_var"].mul_(4)
    second = fused(x, weight, bn, residual, conv_args, "cuda")
    expected = reference.conv_bn_act(x, weight, None, *bn.values(), residual=residual, **conv_args)
    torch.cuda.synchronize()
    assert not torch.equal(first, second)
    assert max_rel_error(second, expected) < 2e-2


def test_cutlass_tiny_running_variance(cutlass_family):
    """A channel with running_var 1e-8 over a dead input channel, where the sm80 kernel's scaled
    float16 filter would overflow (tests/test_cuda_sm80_scaling.py): finite and within the rule."""
    from test_cuda_sm80_scaling import EPS, tiny_variance_case

    x, weight, bn = tiny_variance_case()
    conv_args = {"stride": 1, "padding": 1, "dilation": 1}
    x = x.cuda().half().contiguous(memory_format=torch.channels_last)
    weight = weight.cuda().half()
    bn = {k: v.cuda() for k, v in bn.items()}
    exact = reference.conv_bn_act(
        x.double(), weight.double(), None, *(t.double() for t in bn.values()), eps=EPS, **conv_args
    )
    unfused = reference.conv_bn_act(x, weight, None, *bn.values(), eps=EPS, **conv_args)
    plan = _cuda_plan(x, weight, conv_args)
    out, ran = _run_counted(x, weight, bn, None, conv_args, True)
    assert plan["kernel"] is not None and plan["kernel"].startswith(cutlass_family) and ran == [plan["kernel"]]
    assert torch.isfinite(out).all()
    assert_low_precision_close(out, unfused, exact)


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
