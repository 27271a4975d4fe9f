"""GPU checks: the Triton kernel compiled for the real device and the CUDA op, against the
unfused reference. Marked ``gpu``: skipped without CUDA or under TRITON_INTERPRET=1 (see
conftest). Run by benchmarks/gpu_check.sh as
``TRITON_INTERPRET=0 RESNET_FUSED_AUTOTUNE=0 pytest -m gpu``."""

from __future__ import annotations

import pytest
import torch
from torchvision.models import resnet18, resnet50

import resnet_fused
from helpers import assert_low_precision_close, max_rel_error, randomize_batch_norms
from resnet_fused import reference
from resnet_fused.ops import conv_bn_act as triton_op
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
    for config in triton_op.gpu_configs(dtype, x.shape[1]):
        out = triton_op.launch(
            x, weight, None, bn["bn_weight"], bn["bn_bias"], bn["running_mean"], bn["running_var"], 1e-5, residual,
            [conv_args["stride"]] * 2, [conv_args["padding"]] * 2, [conv_args["dilation"]] * 2, True, False, config=config,
        )
        check(out, exact, unfused, dtype, True)


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
        torch.library.opcheck(torch.ops.resnet_fused.conv_bn_act_triton.default, (*args, True, False))
    else:
        torch.library.opcheck(torch.ops.resnet_fused.conv_bn_act.default, (*args, 1, True))


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
