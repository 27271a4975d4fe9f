"""Every config the GPU autotuner may choose for conv_bn_act compiles for Hopper (sm_90) on
this CPU machine: fp16/bf16 (and TF32) dots lower to wgmma, and ptxas reports no spills. The
narrow configs (grouped convs) are also compiled with several groups packed to a tile, whose
block-diagonal filter mask is extra code in the mainloop."""

from __future__ import annotations

import pytest
import torch

from resnet_fused.ops.triton import conv_bn_act as triton_op
from sm90 import PRECISIONS, compile_for_hopper, config_cases, conv_bn_act_job, reachable_configs, tile_name


def inference_cases():
    # Then 1x1 and 7x7 kernels and int64 indexing for the fp16 configs (ResNet's 1x1 convs, its
    # stem, huge batches).
    out = config_cases(conv_bn_act_job)
    for config in triton_op.gpu_configs(torch.float16, 64, 64):
        out[f"fp16-1x1-{tile_name(config)}"] = conv_bn_act_job(torch.float16, config, "ieee", kernel_size=1)
        out[f"fp16-int64-{tile_name(config)}"] = conv_bn_act_job(torch.float16, config, "ieee", use_int64=True)
    for config in triton_op.gpu_configs(torch.float16, 3, 64):
        out[f"fp16-7x7-{tile_name(config)}"] = conv_bn_act_job(torch.float16, config, "ieee", kernel_size=7)
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
