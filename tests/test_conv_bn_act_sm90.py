"""Every config the GPU autotuner may choose for conv_bn_act compiles for Hopper (sm_90) on
this CPU machine: fp16/bf16 (and TF32) dots lower to wgmma, and ptxas reports no spills. The
narrow configs (grouped convs) are also compiled with several groups packed to a tile, whose
block-diagonal filter mask is extra code in the mainloop."""

from __future__ import annotations

import pytest
import torch

from resnet_fused.ops.triton import conv_bn_act as triton_op
from sm90 import Job, compile_for_hopper

TRITON_TYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
KERNEL = "resnet_fused.ops.triton.conv_bn_act:_conv_bn_act_fwd_kernel"
INDEX_ARGS = (
    "M", "N", "C", "H", "W", "K", "P", "Q", "tile_c", "tile_k", "stride_h", "stride_w", "pad_h", "pad_w", "dil_h", "dil_w",
    "sx_n", "sx_h", "sx_w", "sw_k", "sw_r", "sw_s", "sr_n", "sr_p", "sr_q", "so_n", "so_p", "so_q",
)
# What the JIT specializes at a real launch (the launcher always passes channels_last input,
# residual and output and a (K, R, S, C) weight): unit channel strides become constants; 16-aligned pointers and
# multiple-of-16 sizes and strides get divisibility hints (ResNet channel counts are such, and
# so are ResNeXt's channels per tile: 4-wide groups pack 4 to a 16-channel tile).
UNIT_STRIDES = {"sx_c": 1, "sw_c": 1, "sr_k": 1, "so_k": 1}
PER_CHANNEL = ("bias_ptr", "gamma_ptr", "beta_ptr", "mean_ptr", "var_ptr")
ALIGNED = (
    "x_ptr", "w_ptr", *PER_CHANNEL, "res_ptr", "out_ptr", "C", "K", "tile_c", "tile_k",
    "sx_n", "sx_h", "sx_w", "sw_k", "sw_r", "sw_s", "sr_n", "sr_p", "sr_q", "so_n", "so_p", "so_q",
)


def job(dtype, config, input_precision, use_int64=False, kernel_size=3, group_tile=1):
    element = "*" + TRITON_TYPE[dtype]
    signature = {name: "i64" if use_int64 else "i32" for name in INDEX_ARGS}
    signature.update(x_ptr=element, w_ptr=element, res_ptr=element, out_ptr=element, eps="fp32", act_a="fp32",
                     act_b="fp32")
    signature.update({name: "*fp32" for name in PER_CHANNEL})
    constexprs = dict(
        UNIT_STRIDES, R=kernel_size, S=kernel_size, HAS_BIAS=True, HAS_BN_WEIGHT=True, HAS_BN_BIAS=True,
        HAS_RESIDUAL=True, ACT=1, GROUP_TILE=group_tile, INPUT_PRECISION=input_precision,
        USE_INT64=use_int64, **config.kwargs,
    )
    return Job(KERNEL, signature, constexprs, config.num_warps, config.num_stages, ALIGNED)


def tile_name(config):
    return "x".join(str(v) for v in (*config.kwargs.values(), config.num_warps, config.num_stages))


PRECISIONS = ((torch.float16, "ieee"), (torch.bfloat16, "ieee"), (torch.float32, "tf32"), (torch.float32, "ieee"))


def reachable_configs(dtype):
    """Every config gpu_configs may return for ``dtype``, once each."""
    return list({triton_op._config_id(config): config for tile_c, tile_k in triton_op.CONFIG_REACHING_TILES
                 for config in triton_op.gpu_configs(dtype, tile_c, tile_k)}.values())


def packs_groups(config):
    """Only a 16x16 tile ever holds more than one group (implicit_gemm.group_tile keeps both of a
    packed tile's channel counts within 16)."""
    return config.kwargs["BLOCK_N"] == 16 and config.kwargs["BLOCK_C"] == 16


def cases(make_job, prefix=""):
    """Each reachable config per (dtype, input precision), plus the packed-groups variant of the
    16x16 ones."""
    out = {}
    for dtype, precision in PRECISIONS:
        for config in reachable_configs(dtype):
            name = f"{prefix}{TRITON_TYPE[dtype]}-{precision}-{tile_name(config)}"
            out[name] = make_job(dtype, config, precision)
            if packs_groups(config):
                out[f"{name}-4groups"] = make_job(dtype, config, precision, group_tile=4)
    return out


def inference_cases():
    # Then 1x1 and 7x7 kernels and int64 indexing for the fp16 configs (ResNet's 1x1 convs, its
    # stem, huge batches).
    out = cases(job)
    for config in triton_op.gpu_configs(torch.float16, 64, 64):
        out[f"fp16-1x1-{tile_name(config)}"] = job(torch.float16, config, "ieee", kernel_size=1)
        out[f"fp16-int64-{tile_name(config)}"] = job(torch.float16, config, "ieee", use_int64=True)
    for config in triton_op.gpu_configs(torch.float16, 3, 64):
        out[f"fp16-7x7-{tile_name(config)}"] = job(torch.float16, config, "ieee", kernel_size=7)
    return out


CASES = inference_cases()


@pytest.fixture(scope="module")
def compiled():
    """All cases in one child process (a few seconds each on two cores)."""
    return dict(zip(CASES, compile_for_hopper(list(CASES.values()))))


def test_autotuner_configs_are_the_tested_ones():
    """The kernels are built with exactly the configs compiled here, and no channel count
    reaches a config outside them (the reaching tiles are a sample of all the counts)."""
    tested = {triton_op._config_id(c) for dtype, _ in PRECISIONS for c in reachable_configs(dtype)}
    assert tested == {triton_op._config_id(c) for c in triton_op._ALL_GPU_CONFIGS}
    for dtype, _ in PRECISIONS:
        for tile_c in range(1, 300, 7):
            for tile_k in range(1, 300, 5):
                assert {triton_op._config_id(c) for c in triton_op.gpu_configs(dtype, tile_c, tile_k)} <= tested


@pytest.mark.parametrize("case", CASES)
def test_compiles_for_hopper_without_spills(case, compiled):
    result = compiled[case]
    uses_tensor_cores = not case.startswith("fp32-ieee")
    assert result.uses_wgmma == uses_tensor_cores
    assert result.spill_store_bytes == 0 and result.spill_load_bytes == 0, result
    assert result.shared_bytes <= 227 * 1024  # H100's per-block limit
