"""The fused training unit's Triton kernels compile for Hopper (sm_90) on this CPU machine.

- conv_bn_stats: every config its autotuner may choose, for fp16/bf16/TF32 (wgmma) and IEEE
  fp32 (FMA), with the statistics epilogue: no spills, shared memory within H100's limit. The
  mainloop is the inference kernel's (implicit_gemm.py), whose 1x1 and 7x7 variants
  test_conv_bn_act_sm90.py compiles; here the int64 path of the epilogue is compiled too.
- The finalize kernel and the bn_act elementwise/reduction kernels, for fp16, bf16 and fp32
  activations in both layouts the launchers pass (NCHW: unit L stride; channels_last: unit K
  stride): no spills.
"""

from __future__ import annotations

import pytest
import torch

from resnet_fused.ops.triton import bn_act, conv_bn_stats
from resnet_fused.ops.triton import conv_bn_act as inference
from sm90 import (
    BN_ACT_TENSORS, TRITON_TYPE, Job, bn_act_cases, bn_act_job, compile_for_hopper, config_cases, reachable_configs,
    tile_name,
)

DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# --- conv_bn_stats ---------------------------------------------------------------------------
STATS_KERNEL = "resnet_fused.ops.triton.conv_bn_stats:_conv_bn_stats_fwd_kernel"
STATS_INDEX_ARGS = (
    "M", "N", "C", "H", "W", "K", "P", "Q", "tile_c", "tile_k", "stride_h", "stride_w", "pad_h", "pad_w", "dil_h", "dil_w",
    "sx_n", "sx_h", "sx_w", "sw_k", "sw_r", "sw_s", "sy_n", "sy_p", "sy_q",
)
# As at a real launch: channels_last x and y, (K, R, S, C) weight, 16-aligned pointers and
# multiple-of-16 channel counts and strides.
STATS_UNIT_STRIDES = {"sx_c": 1, "sw_c": 1, "sy_k": 1}
STATS_ALIGNED = (
    "x_ptr", "w_ptr", "bias_ptr", "y_ptr", "hi_part_ptr", "lo_part_ptr", "m2_part_ptr", "C", "K", "tile_c", "tile_k",
    "sx_n", "sx_h", "sx_w", "sw_k", "sw_r", "sw_s", "sy_n", "sy_p", "sy_q",
)


def stats_job(dtype, config, input_precision, use_int64=False, group_tile=1):
    element = "*" + TRITON_TYPE[dtype]
    signature = {name: "i64" if use_int64 else "i32" for name in STATS_INDEX_ARGS}
    signature.update(x_ptr=element, w_ptr=element, y_ptr=element, bias_ptr="*fp32",
                     hi_part_ptr="*fp32", lo_part_ptr="*fp32", m2_part_ptr="*fp32", tile_rows_ptr="*i32")
    constexprs = dict(STATS_UNIT_STRIDES, R=3, S=3, HAS_BIAS=True, GROUP_TILE=group_tile,
                      INPUT_PRECISION=input_precision, USE_INT64=use_int64, **config.kwargs)
    return Job(STATS_KERNEL, signature, constexprs, config.num_warps, config.num_stages, STATS_ALIGNED)


def stats_cases():
    out = config_cases(stats_job, prefix="stats-")
    for config in conv_bn_stats.gpu_configs(torch.float16, 64, 64):
        out[f"stats-fp16-int64-{tile_name(config)}"] = stats_job(torch.float16, config, "ieee", use_int64=True)
    return out


# --- finalize and bn_act kernels ------------------------------------------------------------


def finalize_job():
    signature = {"hi_part_ptr": "*fp32", "lo_part_ptr": "*fp32", "m2_part_ptr": "*fp32", "tile_rows_ptr": "*i32", "mean_ptr": "*fp32",
                 "var_ptr": "*fp32", "M": "i32", "K": "i32", "T": "i32"}
    constexprs = {"BLOCK_T": conv_bn_stats._FIN_BLOCK_T, "BLOCK_K": conv_bn_stats._FIN_BLOCK_K}
    aligned = ("hi_part_ptr", "lo_part_ptr", "m2_part_ptr", "mean_ptr", "var_ptr", "K")
    return Job("resnet_fused.ops.triton.conv_bn_stats:_conv_bn_stats_finalize_kernel", signature, constexprs, 4, 3, aligned)


def small_kernel_cases():
    out = {"finalize": finalize_job(), **bn_act_cases()}
    for name in BN_ACT_TENSORS:
        out[f"{name}-fp16-int64"] = bn_act_job(name, torch.float16, True, use_int64=True)
    out["_bn_partials_sum_kernel"] = Job(
        "resnet_fused.ops.triton.bn_act:_bn_partials_sum_kernel",
        {"part_g_ptr": "*fp32", "part_gx_ptr": "*fp32", "sum_g_ptr": "*fp32", "sum_gx_ptr": "*fp32", "T": "i32", "K": "i32"},
        {"BLOCK_T": bn_act._SUM_BLOCK_T, "BLOCK_K": bn_act._SUM_BLOCK_K}, bn_act._NUM_WARPS, 3,
        ("part_g_ptr", "part_gx_ptr", "sum_g_ptr", "sum_gx_ptr", "K"),
    )
    for dtype in DTYPES:  # running statistics are usually fp32, fp16/bf16 in half-precision models
        out[f"_bn_running_stats_kernel-{TRITON_TYPE[dtype]}"] = Job(
            "resnet_fused.ops.triton.bn_act:_bn_running_stats_kernel",
            {"running_mean_ptr": "*" + TRITON_TYPE[dtype], "running_var_ptr": "*" + TRITON_TYPE[dtype],
             "mean_ptr": "*fp32", "var_ptr": "*fp32", "K": "i32", "momentum": "fp32", "unbias": "fp32"},
            {"s_rm": 1, "s_rv": 1, "BLOCK_K": 1024}, bn_act._NUM_WARPS, 3,
        )
    return out


STATS_CASES = stats_cases()
SMALL_CASES = small_kernel_cases()


@pytest.fixture(scope="module")
def compiled():
    """All cases in one child process (about a second each on two cores)."""
    cases = {**STATS_CASES, **SMALL_CASES}
    return dict(zip(cases, compile_for_hopper(list(cases.values()))))


def test_stats_autotuner_configs_are_the_tested_ones():
    tested = {inference._config_id(c) for dtype in DTYPES for c in reachable_configs(dtype)}
    assert tested == {inference._config_id(c) for c in conv_bn_stats.GPU_CONFIGS}


@pytest.mark.parametrize("case", STATS_CASES)
def test_stats_conv_compiles_for_hopper_without_spills(case, compiled):
    result = compiled[case]
    assert result.uses_wgmma == ("-fp32-ieee-" not in case)
    assert result.spill_store_bytes == 0 and result.spill_load_bytes == 0, result
    assert result.shared_bytes <= 227 * 1024  # H100's per-block limit


@pytest.mark.parametrize("case", SMALL_CASES)
def test_bn_kernels_compile_for_hopper_without_spills(case, compiled):
    result = compiled[case]
    assert result.spill_store_bytes == 0 and result.spill_load_bytes == 0, result
    assert result.shared_bytes <= 227 * 1024
