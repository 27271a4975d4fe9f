"""The shared test grids, each defined once, and the builders that turn a grid entry into tensors.

A grid here is data (shapes, and per backend and device the dtypes and flags worth running);
the test files under ops/ decide what to check. Nothing here touches the GPU: a ``device`` is
only used when a test builds its tensors.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import resnet50


LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}

# The dtypes each backend computes right on CPU tensors. The Triton interpreter's bf16 math is
# broken (GUIDE 4.1): bf16 Triton is covered by the sm_90 compile tests and the GPU runs.
CPU_DTYPES = {"triton": (torch.float32, torch.float16), "cpu": (torch.float32, torch.bfloat16)}


def cpu_dtypes(backend: str) -> tuple:
    return CPU_DTYPES.get(backend, (torch.float32,))


# --- the inference op conv_bn_act -----------------------------------------------------------

# (N, C, H, W, K, kernel, stride, padding, dilation): odd sizes, C and K not multiples of the
# block sizes, and one case larger than a block in M, K and C so the tile loops wrap.
CONV_SHAPES = {
    "1x1": (2, 5, 7, 9, 6, 1, 1, 0, 1),
    "1x1-stride2": (1, 7, 9, 11, 5, 1, 2, 0, 1),
    "3x3": (2, 3, 7, 5, 4, 3, 1, 1, 1),
    "3x3-stride2": (1, 6, 9, 7, 10, 3, 2, 1, 1),
    "7x7-stem": (1, 3, 13, 11, 8, 7, 2, 3, 1),
    "3x3-dilation2": (1, 4, 11, 9, 5, 3, 1, 2, 2),
    "3x3-asymmetric": (1, 4, 8, 9, 3, 3, (2, 1), (1, 0), 1),
    "multi-block": (2, 130, 5, 5, 131, 3, 1, 1, 1),
}

# GPU only. ResNet-50 shapes at a small batch, with channel counts that are multiples of 16 so
# the vectorized, wgmma-friendly paths are taken.
RESNET_SHAPES = {
    "stem": (2, 3, 56, 56, 64, 7, 2, 3, 1),
    # More output elements than two waves of the CUDA epilogue, K dividing neither.
    "epilogue-waves": (8, 16, 60, 60, 67, 3, 1, 1, 1),
    "1x1-256-64": (2, 256, 28, 28, 64, 1, 1, 0, 1),
    "3x3-128": (2, 128, 28, 28, 128, 3, 1, 1, 1),
    "3x3-256-stride2": (2, 256, 14, 14, 256, 3, 2, 1, 1),
    "1x1-512-2048": (2, 512, 7, 7, 2048, 1, 1, 0, 1),
}
ALL_CONV_SHAPES = {**CONV_SHAPES, **RESNET_SHAPES}


def conv_bn_act_grid(backend: str, device: str) -> list:
    """(name, dtype, layout, with_residual, relu). CPU: every tiny shape in the backend's dtypes,
    both layouts, every residual/ReLU combination. GPU: every shape in fp16 and fp32 (IEEE), bf16
    on the ResNet shapes, both layouts, with residual and ReLU; the other combinations are covered
    on the CPU, and on the GPU by one shape without a residual."""
    rows = []
    if device == "cpu":
        for name in CONV_SHAPES:
            for dtype in cpu_dtypes(backend):
                for layout in LAYOUTS:
                    for with_residual in (True, False):
                        for relu in (True, False):
                            rows.append((name, dtype, layout, with_residual, relu))
    else:
        for name in ALL_CONV_SHAPES:
            for dtype in (torch.float16, torch.float32, *((torch.bfloat16,) if name in RESNET_SHAPES else ())):
                for layout in LAYOUTS:
                    rows.append((name, dtype, layout, True, True))
        for relu in (True, False):
            rows.append(("1x1-256-64", torch.float16, "nhwc", False, relu))
    return [(_flag_id(row), row) for row in rows]


def _flag_id(row) -> str:
    name, dtype, layout, with_residual, *relu = row
    parts = [name, DTYPE_IDS[dtype], layout, "res" if with_residual else "nores"]
    if relu:
        parts.append("relu" if relu[0] else "linear")
    return "-".join(parts)


# (N, C, H, W, K, kernel, stride, groups): channels per group from 1 (depthwise) to wider
# than a tile; groups the kernel packs several to a tile (4-wide: 4 per tile) or one (odd
# counts that no power of two divides); K/groups != C/groups (a channel multiplier).
GROUPED_SHAPES = {
    "resnext-4wide": (2, 32, 6, 5, 32, 3, 1, 8),
    "resnext-4wide-stride2": (1, 32, 7, 9, 32, 3, 2, 8),
    "8wide-groups2": (1, 16, 5, 5, 16, 3, 1, 2),
    "depthwise": (2, 12, 5, 7, 12, 3, 1, 12),
    "multiplier-3-groups5": (1, 5, 6, 5, 15, 3, 1, 5),
    "odd-groups3-1x1": (2, 21, 5, 4, 9, 1, 1, 3),
    "wide-groups2": (1, 40, 4, 5, 136, 3, 1, 2),
}

# GPU only. ResNeXt's grouped 3x3 convs: resnext50_32x4d's 4-, 8- and 32-wide groups (4 and 2
# groups packed per tile, then one), resnext101_32x8d's 64-wide last stage (the standard
# tiles), and a depthwise conv (16 groups per tile).
GROUPED_GPU_SHAPES = {
    "resnext-4wide": (2, 128, 28, 28, 128, 3, 1, 32),
    "resnext-8wide-stride2": (2, 256, 28, 28, 256, 3, 2, 32),
    "resnext-32wide": (2, 1024, 7, 7, 1024, 3, 1, 32),
    "resnext-64wide": (2, 2048, 7, 7, 2048, 3, 1, 32),
    "depthwise": (2, 64, 14, 14, 64, 3, 1, 64),
}


def grouped_grid(backend: str, device: str) -> list:
    """(name, dtype, layout, with_residual) on the CPU: every grouped shape, the backend's dtypes,
    both layouts, with and without residual. (The GPU's grouped shapes run every autotuner config:
    ops/test_conv_bn_act.py.)"""
    rows = [(name, dtype, layout, with_residual) for name in GROUPED_SHAPES for dtype in cpu_dtypes(backend)
            for layout in LAYOUTS for with_residual in (True, False)] if device == "cpu" else []
    return [(_flag_id(row), row) for row in rows]


def make_case(shape, dtype, channels_last, with_residual, seed, device="cpu"):
    """Random conv + BatchNorm operands of a CONV_SHAPES-style shape; BN stats far from the 0/1
    defaults; BN tensors fp32, the rest in ``dtype``, on ``device``."""
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
    x = x.to(dtype).contiguous(memory_format=fmt).to(device)
    if residual is not None:
        residual = residual.to(dtype).contiguous(memory_format=fmt).to(device)
    bn = {name: t.to(device) for name, t in bn.items()}
    return x, weight.to(dtype).to(device), bn, residual, conv_args


def make_grouped_case(shape, dtype, channels_last, with_residual, seed, device="cpu"):
    """make_case() for a GROUPED_SHAPES-style shape: conv_args carries ``groups``."""
    n, c, h, w, k, ks, stride, groups = shape
    x, weight, bn, residual, conv_args = make_case((n, c, h, w, k, ks, stride, ks // 2, 1), dtype,
                                                   channels_last, with_residual, seed, device)
    g = torch.Generator().manual_seed(seed + 100)
    weight = (torch.randn(k, c // groups, ks, ks, generator=g) / (c // groups * ks * ks) ** 0.5).to(dtype).to(device)
    return x, weight, bn, residual, {**conv_args, "groups": groups}


def tiny_variance_case(seed: int = 5):
    """A conv + BN whose output channel 0 has running_var 1e-8 (scale ~316) and large weights on
    input channel 0, which is dead (all zeros, as after a ReLU that never fires): w * scale for
    channel 0 is ~8e4, past float16's range, while its conv output is tiny and eager BN of it is
    finite. The other channels are ordinary. fp32 tensors (N, C, H, W) = (2, 16, 6, 6), 3x3, for
    BatchNorm's default eps 1e-5. The sm80 CUTLASS kernels' scaled filter must survive it
    (codegen/test_cuda_sm80_scaling.py on the host, ops/test_conv_bn_act.py through the op)."""
    g = torch.Generator().manual_seed(seed)
    n, c, k, size = 2, 16, 16, 6
    x = torch.randn(n, c, size, size, generator=g)
    x[:, 0] = 0
    weight = torch.randn(k, c, 3, 3, generator=g) / (c * 9) ** 0.5
    weight[0] = torch.randn(c, 3, 3, generator=g) * 1e-4
    weight[0, 0] = 250.0
    bn = {
        "bn_weight": torch.rand(k, generator=g) + 0.5,
        "bn_bias": torch.randn(k, generator=g) * 0.3,
        "running_mean": torch.randn(k, generator=g) * 0.3,
        "running_var": torch.rand(k, generator=g) + 0.5,
    }
    bn["bn_weight"][0], bn["running_mean"][0], bn["running_var"][0] = 1.0, 0.0, 1e-8
    return x, weight, bn


def fused(x, weight, bn, residual, conv_args, backend, relu=True, **extra):
    """The functional op on a make_case() case."""
    from resnet_fused.functional import conv_bn_act

    return conv_bn_act(
        x, weight, bn["running_mean"], bn["running_var"], bn_weight=bn["bn_weight"], bn_bias=bn["bn_bias"],
        residual=residual, relu=relu, backend=backend, **conv_args, **extra,
    )


def exact_and_unfused(x, weight, bn, residual, conv_args, relu):
    """The reference in float64 from the same (already rounded) operands, and in their dtypes."""
    from resnet_fused.ops import reference

    exact = reference.conv_bn_act(
        x.double(), weight.double(), None, *(t.double() for t in bn.values()),
        residual=None if residual is None else residual.double(), relu=relu, **conv_args,
    )
    unfused = reference.conv_bn_act(x, weight, None, *bn.values(), residual=residual, relu=relu, **conv_args)
    return exact, unfused


# --- ResNet-50's convolutions ----------------------------------------------------------------


def resnet50_conv_shapes(batch: int = 2, size: int = 224) -> list[dict]:
    """Every distinct conv of torchvision's ResNet-50 as the kwargs of cuda_conv_plan, traced on
    the meta device (no memory, no compute), in first-use order."""
    with torch.device("meta"):
        model = resnet50()
    seen: dict[tuple, dict] = {}

    def record(conv, args):
        shape = dict(
            input_shape=list(args[0].shape), weight_shape=list(conv.weight.shape), stride=list(conv.stride),
            padding=list(conv.padding), dilation=list(conv.dilation), groups=conv.groups,
        )
        seen.setdefault(tuple(map(str, shape.values())), shape)

    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            module.register_forward_pre_hook(record)
    model(torch.empty(batch, 3, size, size, device="meta"))
    return list(seen.values())


RESNET50 = resnet50_conv_shapes()
RESNET50_IDS = [
    f"{s['input_shape'][1]}-{s['weight_shape'][0]}-{s['weight_shape'][2]}x{s['weight_shape'][3]}-s{s['stride'][0]}-"
    f"{s['input_shape'][2]}px"
    for s in RESNET50
]


# GPU only, the cuda backend's CUTLASS path: every ResNet-50 conv, and odd shapes as
# (N, C, H, W, K, kernel, stride, padding, dilation), fused or not.
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


# --- the training unit's BatchNorm pieces (ops/test_bn_act.py) -------------------------------

# (N, K, H, W): odd everything; K = 67 leaves a partial vector of channels in channels_last
# (CPU) and runs past one 64-channel block (Triton); L = H·W a multiple of no block.
BN_SHAPES = {"odd": (3, 5, 7, 9), "k67": (2, 67, 5, 3)}

# Activation dtypes each backend's bn_act kernels take on CPU tensors (Triton: fp32 only, the
# interpreter's bf16 being broken and fp64 not a Triton bn_act dtype), and running-stat dtypes.
BN_CPU_DTYPES = {"cpu": (torch.float32, torch.bfloat16, torch.float16, torch.float64), "triton": (torch.float32,)}
RUNNING_CPU_DTYPES = {"cpu": (torch.float32, torch.float16, torch.bfloat16, torch.float64),
                      "triton": (torch.float32, torch.float16)}


def bn_dtypes(backend: str) -> tuple:
    return BN_CPU_DTYPES.get(backend, (torch.float32,))


def bn_apply_grid(backend: str, device: str) -> list:
    """(shape, dtype, layout, with_residual, relu, with_gamma): every combination."""
    rows = []
    for shape in BN_SHAPES:
        for dtype in bn_dtypes(backend):
            for layout in LAYOUTS:
                for res in (True, False):
                    for relu in (True, False):
                        for gamma in (True, False):
                            rows.append((f"{shape}-{DTYPE_IDS[dtype]}-{layout}-{'res' if res else 'nores'}-"
                                         f"{'relu' if relu else 'norelu'}-{'gamma' if gamma else 'nogamma'}",
                                         (shape, dtype, layout, res, relu, gamma)))
    return rows if device == "cpu" else []


def bn_backward_reduce_grid(backend: str, device: str) -> list:
    """(shape, dtype, layout, relu): every combination."""
    rows = [(f"{shape}-{DTYPE_IDS[dtype]}-{layout}-{'relu' if relu else 'norelu'}", (shape, dtype, layout, relu))
            for shape in BN_SHAPES for dtype in bn_dtypes(backend) for layout in LAYOUTS for relu in (True, False)]
    return rows if device == "cpu" else []


def bn_backward_apply_grid(backend: str, device: str) -> list:
    """(dtype, layout, relu, training, residual_grad, with_gamma): every combination (the shape
    follows training and gamma: K = 67 for the full training path)."""
    rows = []
    for dtype in bn_dtypes(backend):
        for layout in LAYOUTS:
            for relu in (True, False):
                for training in (True, False):
                    for residual_grad in (True, False):
                        for gamma in (True, False):
                            rows.append((f"{DTYPE_IDS[dtype]}-{layout}-{'relu' if relu else 'norelu'}-"
                                         f"{'train' if training else 'eval'}-{'dres' if residual_grad else 'nodres'}-"
                                         f"{'gamma' if gamma else 'nogamma'}",
                                         (dtype, layout, relu, training, residual_grad, gamma)))
    return rows if device == "cpu" else []


def running_stats_grid(backend: str, device: str, dtypes: tuple | None = None) -> list:
    """(running_dtype, momentum): momentum 0.1 and 0.7 take torch.lerp's two formulas."""
    dtypes = dtypes or RUNNING_CPU_DTYPES.get(backend, (torch.float32,))
    rows = [(f"{DTYPE_IDS[dtype]}-{momentum}", (dtype, momentum)) for dtype in dtypes for momentum in (0.1, 0.7)]
    return rows if device == "cpu" else []


def running_stats_spec_grid(backend: str, device: str) -> list:
    """running_stats_grid in fp32 and fp16, the running dtypes of fp32 and .half() models."""
    return running_stats_grid(backend, device, (torch.float32, torch.float16))


# --- the statistics conv of the training unit (ops/test_conv_bn_stats.py) --------------------

# CONV_SHAPES-style. M = N·P·Q over several BLOCK_M tiles (32 under the interpreter) with a
# partial last one; C and K not multiples of the blocks, past one block (BLOCK_C/BLOCK_N 128) in
# "multi-block".
STATS_SHAPES = {
    "3x3-stride2-3tiles": (3, 6, 11, 9, 10, 3, 2, 1, 1),  # M = 3·6·5 = 90: 3 tiles
    "1x1": CONV_SHAPES["1x1"],  # M = 126: 4 tiles
    "multi-block": CONV_SHAPES["multi-block"],
}

# GROUPED_SHAPES-style: several 4-wide groups packed to a tile, depthwise, and 3 inputs to 2
# outputs per group with an odd group count.
GROUPED_STATS_SHAPES = {
    "resnext-4wide": (2, 32, 7, 5, 32, 3, 1, 8),
    "depthwise-stride2": (3, 6, 9, 7, 6, 3, 2, 6),
    "3in-2out-groups3": (2, 9, 6, 5, 6, 1, 1, 3),
}


def conv_stats_grid(backend: str, device: str) -> list:
    """(name, layout, with_bias): every shape in both layouts with and without bias, except one
    multi-block case only (wide tiles are slow in the interpreter)."""
    rows = [(name, layout, with_bias) for name in STATS_SHAPES for layout in LAYOUTS for with_bias in (True, False)
            if name != "multi-block" or (layout, with_bias) == ("nhwc", True)]
    return [(f"{n}-{lay}-{'bias' if b else 'nobias'}", (n, lay, b)) for n, lay, b in rows] if device == "cpu" else []


# --- the training op on the GPU (ops/test_conv_bn_act_train.py) ------------------------------

# (N, C, H, W, K, kernel, stride, padding): ResNet-50 shapes at a small batch, plus odd sizes.
TRAIN_GPU_SHAPES = {
    "stem": (2, 3, 40, 40, 64, 7, 2, 3),
    "3x3-64": (4, 64, 20, 20, 64, 3, 1, 1),
    "1x1-256-64": (4, 256, 14, 14, 64, 1, 1, 0),
    "3x3-128-stride2": (2, 128, 15, 15, 128, 3, 2, 1),
    "odd": (3, 5, 9, 7, 67, 3, 1, 1),
}
