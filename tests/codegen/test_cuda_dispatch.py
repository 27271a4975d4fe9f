"""The cuda backend's host-side kernel choice (csrc/cutlass_plan.h), run on the CPU.

``resnet_fused._C.cuda_conv_plan`` is the function the CUDA op calls before every launch: which
CUTLASS kernel takes a conv (sm90 TMA + wgmma, sm80 mma.sync, which tile), or why it goes to the
exact path (cuDNN + epilogue). It needs no GPU, so every distinct ResNet-50 conv shape and the odd
ones are checked here, for H100, A100 and GPUs without a CUTLASS cubin. In a CUDA build the plan
is also held against CUTLASS's own ``can_implement`` of each kernel, run on the host.
"""

from __future__ import annotations

import pytest

from cases import RESNET50, RESNET50_IDS
from resnet_fused import _extension

pytestmark = pytest.mark.skipif(not _extension.has_cpu_ops(), reason=f"extension not built: {_extension.LOAD_ERROR}")

if _extension.has_cpu_ops():
    from resnet_fused import _C

H100 = dict(capability=(9, 0), sm_count=132)
A100 = dict(capability=(8, 0), sm_count=108)
ALL_BUILT = dict(sm90a=True, sm80_cubins=[80, 90])  # what the default arch list 8.0;9.0+PTX builds
DTYPES = ["float16", "bfloat16"]


def plan(shape: dict, dtype: str = "float16", device: dict = H100, build: dict = ALL_BUILT, **kw) -> dict:
    return _C.cuda_conv_plan(**shape, dtype=dtype, **device, **build, **kw)


def conv(c, k, r=3, h=14, n=2, stride=1, padding=None, dilation=1, groups=1) -> dict:
    padding = r // 2 if padding is None else padding
    return dict(input_shape=[n, c, h, h], weight_shape=[k, c // groups, r, r], stride=[stride, stride],
                padding=[padding, padding], dilation=[dilation, dilation], groups=groups)


def expected_tile_n(shape: dict, sm_count: int) -> int:
    """The documented heuristic, restated: tile N 64 when K is not a multiple of 128, or when
    the 128x128 grid is under one wave of the GPU; else 128."""
    k = shape["weight_shape"][0]
    if k % 128:
        return 64
    _, _, p, q = plan(shape)["output_shape"]
    ctas = -(-shape["input_shape"][0] * p * q // 128) * (k // 128)
    return 64 if ctas < sm_count else 128


def test_resnet50_has_23_distinct_convs():
    assert len(RESNET50) == 23
    assert RESNET50[0]["weight_shape"] == [64, 3, 7, 7]  # the stem comes first


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", RESNET50, ids=RESNET50_IDS)
def test_resnet50_on_h100(shape, dtype):
    p = plan(shape, dtype)
    if shape["input_shape"][1] == 3:  # the stem: C = 3 is no 16-byte vector of channels
        assert p["kernel"] is None and "C=3" in p["reason"]
        return
    tile_n = expected_tile_n(shape, 132)
    short = "f16" if dtype == "float16" else "bf16"
    assert p["kernel"] == f"sm90_{short}_128x{tile_n}x64", p
    assert p["tile"] == (128, tile_n, 64) and not p["convert_layout"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", RESNET50, ids=RESNET50_IDS)
def test_resnet50_on_a100(shape, dtype):
    p = plan(shape, dtype, A100)
    if shape["input_shape"][1] == 3:
        assert p["kernel"] is None
        return
    short = "f16" if dtype == "float16" else "bf16"
    assert p["kernel"] == f"sm80_{short}_128x{expected_tile_n(shape, 108)}x32", p


def test_tile_heuristic_examples():
    # K = 64: a 128-wide tile would idle half its columns.
    assert plan(conv(64, 64, h=56))["tile"][1] == 64
    # Large M and K = 256: 128x128 tiles already fill many waves.
    assert plan(conv(64, 256, r=1, h=56, n=32))["tile"][1] == 128
    # Stage 4 at batch 2: 98 output pixels x 2048 channels is 16 CTAs of 128x128, under a wave.
    assert plan(conv(512, 2048, r=1, h=7))["tile"][1] == 64
    # The same layer at batch 256 is 196 x 16 CTAs: 128.
    assert plan(conv(512, 2048, r=1, h=7, n=256))["tile"][1] == 128


def test_nchw_converts_layout_and_keeps_the_kernel():
    shape = RESNET50[5]
    nhwc, nchw = plan(shape), plan(shape, channels_last=False)
    assert nchw["kernel"] == nhwc["kernel"] is not None
    assert nchw["convert_layout"] and not nhwc["convert_layout"]


@pytest.mark.parametrize(
    ("shape", "dtype", "why"),
    [
        (conv(3, 64, r=7, h=224, stride=2, padding=3), "float16", "C=3"),
        (conv(12, 64), "float16", "C=12"),
        (conv(64, 20), "float16", "K=20"),
        (conv(67, 64), "bfloat16", "C=67"),
        (conv(64, 64, groups=2), "float16", "groups=2"),
        (conv(64, 64, groups=32), "bfloat16", "groups=32"),
        (conv(64, 64), "float32", "float32"),
        (conv(64, 64), "float64", "float64"),
        (conv(64, 64, r=3, h=2, padding=0), "float16", "larger than the padded input"),
        (conv(64, 64, r=1, h=16384, n=64), "float16", "2^30"),
    ],
    ids=["stem-C3", "C12", "K20", "C67-bf16", "groups2", "depthwise-ish", "fp32", "fp64", "empty", "huge"],
)
def test_exact_path_shapes(shape, dtype, why):
    for device in (H100, A100):
        p = plan(shape, dtype, device)
        assert p["kernel"] is None and why in p["reason"], p


@pytest.mark.parametrize("dtype", DTYPES)
def test_odd_but_fused_shapes(dtype):
    # Stride 2, dilation 2, asymmetric stride/padding, a 7x7 filter on 8 channels, C = K = 8:
    # all within both kernel families' limits.
    shapes = [
        conv(64, 128, stride=2),
        conv(64, 64, dilation=2, padding=2),
        dict(input_shape=[1, 16, 9, 8], weight_shape=[24, 16, 3, 3], stride=[2, 1], padding=[1, 0],
             dilation=[1, 1], groups=1),
        conv(8, 64, r=7, h=32, stride=2, padding=3),
        conv(8, 8, r=1, h=5, n=1),
    ]
    for shape in shapes:
        assert plan(shape, dtype)["kernel"].startswith("sm90_"), shape
        assert plan(shape, dtype, A100)["kernel"].startswith("sm80_"), shape


def test_sm90_limits_fall_to_sm80_on_hopper():
    # Padding 130: TMA im2col corners must lie in [-128, 127]; the sm80 kernel (its sm_90
    # cubin) takes it, or the exact path when this build has no sm80 cubin for Hopper.
    shape = conv(64, 64, padding=130)
    p = plan(shape)
    assert p["kernel"] == "sm80_f16_128x64x32" and "sm90 kernel rejected" in p["reason"], p
    p = plan(shape, build=dict(sm90a=True, sm80_cubins=[80]))
    assert p["kernel"] is None and "no CUTLASS kernel built for sm_90" in p["reason"], p
    # A 33x33 filter: past both TMA's filter offsets (dilation) and sm80's 32-bit masks.
    p = plan(conv(64, 64, r=33, h=40, dilation=8, padding=128))
    assert p["kernel"] is None, p


@pytest.mark.parametrize("stride", [[9, 9], [9, 1], [1, 9], [16, 16]], ids=["9x9", "9x1", "1x9", "16x16"])
def test_stride_above_8_never_takes_sm90(stride):
    # The conv stride is the TMA im2col traversal stride, 1..8; CUTLASS's check of it is an
    # assert that -DNDEBUG removes. The sm80 kernel (any stride) takes it, else the exact path.
    shape = dict(input_shape=[2, 64, 40, 40], weight_shape=[64, 64, 3, 3], stride=stride, padding=[1, 1],
                 dilation=[1, 1], groups=1)
    p = plan(shape)
    assert p["kernel"] == "sm80_f16_128x64x32", p
    assert "sm90 kernel rejected" in p["reason"] and "traversal stride" in p["reason"], p
    p = plan(shape, build=dict(sm90a=True, sm80_cubins=[80]))
    assert p["kernel"] is None and "traversal stride" in p["reason"], p
    assert plan(shape, device=A100)["kernel"] == "sm80_f16_128x64x32"


def test_stride_8_still_takes_sm90():
    shape = dict(input_shape=[2, 64, 40, 40], weight_shape=[64, 64, 3, 3], stride=[8, 8], padding=[1, 1],
                 dilation=[1, 1], groups=1)
    assert plan(shape)["kernel"] == "sm90_f16_128x64x64"


def test_plan_follows_the_sm90_switch():
    """cuda_conv_plan takes the run-time switch the op takes (ops/test_conv_bn_act.py's
    cutlass_family fixture flips it): switched off, Hopper plans name the sm80 kernels, for the
    build asked about and for this build alike; switched back on, sm90 again."""
    shape = conv(64, 128)
    previous = _C.cuda_conv_enable_sm90(False)
    try:
        p = plan(shape)
        assert p["kernel"] == "sm80_f16_128x64x32" and "sm90" not in p["reason"], p
        this_build = _C.cuda_conv_plan(**shape)["kernel"]
        assert this_build is None or this_build.startswith("sm80_"), this_build
    finally:
        assert _C.cuda_conv_enable_sm90(previous) is False
    assert plan(shape)["kernel"] == "sm90_f16_128x64x64"
    if _C.cuda_conv_build()["sm90a"]:
        assert _C.cuda_conv_plan(**shape)["kernel"] == "sm90_f16_128x64x64"


@pytest.mark.parametrize(
    ("device", "build", "family"),
    [
        (dict(capability=(9, 0), sm_count=132), dict(sm90a=False, sm80_cubins=[90]), "sm80"),  # arch list 9.0 without 90a
        (dict(capability=(8, 6), sm_count=84), dict(sm90a=True, sm80_cubins=[80, 90]), "sm80"),  # sm_80 cubin on 8.6
        (dict(capability=(8, 9), sm_count=128), dict(sm90a=True, sm80_cubins=[86]), "sm80"),
        (dict(capability=(8, 0), sm_count=108), dict(sm90a=True, sm80_cubins=[86]), None),  # 8.6 cubin is not for 8.0
        (dict(capability=(9, 0), sm_count=132), dict(sm90a=False, sm80_cubins=[80]), None),
        (dict(capability=(10, 0), sm_count=148), dict(sm90a=True, sm80_cubins=[80, 90]), None),  # Blackwell: no cubin
        (dict(capability=(7, 5), sm_count=40), dict(sm90a=True, sm80_cubins=[80, 90]), None),
        (dict(capability=(9, 0), sm_count=132), dict(sm90a=False, sm80_cubins=[]), None),  # e.g. a 7.5-only build
    ],
    ids=["h100-no90a", "a10-sm80cubin", "ada-sm86cubin", "a100-sm86cubin", "h100-sm80cubin", "blackwell", "turing",
         "none-built"],
)
def test_arch_rules(device, build, family):
    p = plan(conv(64, 128), "float16", device, build)
    if family is None:
        major, minor = device["capability"]
        assert p["kernel"] is None and f"no CUTLASS kernel built for sm_{major}{minor}" in p["reason"], p
    else:
        assert p["kernel"].startswith(family + "_"), p


def test_plan_defaults_to_this_build():
    build = _C.cuda_conv_build()
    info = _extension.BUILD_INFO
    if not info["with_cuda"]:
        assert build == {"sm90a": False, "sm80_cubins": []}
        assert plan(conv(64, 64), build={})["kernel"] is None
        return
    archs = info["cuda_archs"].replace(" ", ";").split(";")
    reals = {int(a.split("+")[0].replace(".", "").rstrip("a")) for a in archs if a}
    assert build["sm90a"] == (90 in reals)
    assert build["sm80_cubins"] == sorted(a for a in reals if 80 <= a <= 90)
    kernels = _C.cuda_conv_kernels()
    assert [k["name"] for k in kernels] == [
        "sm90_f16_128x128x64", "sm90_f16_128x64x64", "sm90_bf16_128x128x64", "sm90_bf16_128x64x64",
        "sm80_f16_128x128x32", "sm80_f16_128x64x32", "sm80_bf16_128x128x32", "sm80_bf16_128x64x32",
    ]
    for k in kernels:
        assert k["built"] == (build["sm90a"] if k["arch"] == "sm90" else bool(build["sm80_cubins"]))


def _cutlass_args(shape: dict) -> dict:
    return {k: shape[k] for k in ("input_shape", "weight_shape", "stride", "padding", "dilation")}


CHECK_SHAPES = [s for s in RESNET50] + [
    conv(64, 128, stride=2), conv(64, 64, dilation=2, padding=2), conv(8, 64, r=7, h=32, stride=2, padding=3),
    conv(64, 64, padding=130), conv(12, 64), conv(64, 20), conv(64, 64, r=33, h=40, padding=16),
    conv(64, 64, h=40, stride=9),
]


def _plan_stricter_than_cutlass(family: str, shape: dict) -> bool:
    """Where the plan refuses a kernel that CUTLASS's can_implement accepts, on purpose: sm90 and
    a stride above 8, which only an assert() in CUTLASS (compiled out by -DNDEBUG) catches."""
    return family == "sm90" and max(shape["stride"]) > 8


@pytest.mark.skipif(not _extension.has_cuda_ops(), reason="CPU-only build: no CUTLASS kernels to ask")
def test_plan_agrees_with_cutlass_can_implement():
    """For every kernel of this build, on every shape: the plan's per-family limits say yes
    exactly when CUTLASS's own can_implement() does (run on the host, no GPU), except for the
    limits can_implement misses (_plan_stricter_than_cutlass). Together with the dtype/groups
    rules this means the plan never hands CUTLASS a problem it refuses, and never sends one it
    could take to the exact path for a shape reason of its own making."""
    checked = 0
    for kernel in _C.cuda_conv_kernels():
        if not kernel["built"]:
            continue
        for shape in CHECK_SHAPES:
            cutlass_says = _C.cutlass_can_implement(kernel["name"], **_cutlass_args(shape))
            family = kernel["arch"]
            device = H100 if family == "sm90" else A100
            build = ALL_BUILT if family == "sm90" else dict(sm90a=False, sm80_cubins=[80, 90])
            p = plan(shape, kernel["dtype"], device, build)
            plan_says = p["kernel"] is not None and p["kernel"].startswith(family)
            if _plan_stricter_than_cutlass(family, shape):
                assert cutlass_says and not plan_says, (kernel["name"], shape, p)
            else:
                assert plan_says == cutlass_says, (kernel["name"], shape, p)
            checked += 1
    assert checked >= len(CHECK_SHAPES) * 4


@pytest.mark.skipif(not _extension.has_cuda_ops(), reason="CPU-only build: no dispatch counters")
def test_dispatch_counters_exist():
    counts = _C.cuda_dispatch_counts()
    assert set(counts) == {k["name"] for k in _C.cuda_conv_kernels()} | {"fallback_plan", "fallback_runtime"}
    assert all(v >= 0 for v in counts.values())


def test_bad_arguments_raise():
    with pytest.raises(ValueError):
        _C.cuda_conv_plan([1, 8, 4], [8, 8, 1, 1])
    with pytest.raises(ValueError):
        _C.cuda_conv_plan([1, 8, 4, 4], [8, 8, 1, 1], stride=[1, 1, 1])
