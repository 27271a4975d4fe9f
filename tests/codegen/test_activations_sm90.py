"""The Triton kernels compile for Hopper (sm_90) with every activation, on this CPU machine.

The ReLU variants are test_conv_bn_act_sm90.py's and test_training_sm90.py's cases. Here the
same jobs (sm90.py builds them) with the other kinds (``ACT``, a constexpr: each kind is its own
kernel):
- conv_bn_act with SiLU, the epilogue that needs the most (an exp and a division), for every
  config its autotuner may choose and every precision; every other kind for the widest tile of
  each precision (the most accumulators per thread next to the epilogue);
- the training unit's apply and backward kernels with every kind, whose backward recomputes
  z = γ·x̂ + β for the kinds that need it, in both layouts.
Each must compile without register spills, within H100's shared memory.
"""

from __future__ import annotations

import dataclasses

import pytest

from resnet_fused.ops.activation import Kind
from sm90 import (
    PRECISIONS, TRITON_TYPE, bn_act_cases, compile_for_hopper, config_cases, conv_bn_act_job, reachable_configs,
    tile_name,
)

OTHER_KINDS = [kind for kind in Kind if kind != Kind.RELU]


def with_act(job, kind):
    return dataclasses.replace(job, constexprs={**job.constexprs, "ACT": int(kind)})


def widest(dtype):
    return max(reachable_configs(dtype), key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])


def cases():
    # config_cases: every config the autotuner may choose (test_conv_bn_act_sm90.py asserts so).
    out = {f"silu-{name}": with_act(job, Kind.SILU) for name, job in config_cases(conv_bn_act_job).items()}
    for kind in OTHER_KINDS:
        if kind == Kind.SILU:
            continue
        for dtype, precision in PRECISIONS:
            config = widest(dtype)
            name = f"{TRITON_TYPE[dtype]}-{precision}-{tile_name(config)}"
            out[f"{kind.name.lower()}-{name}"] = with_act(conv_bn_act_job(dtype, config, precision), kind)
    for name, job in bn_act_cases().items():
        for kind in OTHER_KINDS:
            out[f"{kind.name.lower()}-{name}"] = with_act(job, kind)
    return out


CASES = cases()


@pytest.fixture(scope="module")
def compiled():
    """All cases in one child process."""
    return dict(zip(CASES, compile_for_hopper(list(CASES.values()))))


@pytest.mark.parametrize("case", CASES)
def test_compiles_for_hopper_without_spills(case, compiled):
    result = compiled[case]
    if "BLOCK_M" in CASES[case].constexprs:  # the conv: tensor cores unless IEEE fp32
        assert result.uses_wgmma == ("-fp32-ieee-" not in case)
    assert result.spill_store_bytes == 0 and result.spill_load_bytes == 0, result
    assert result.shared_bytes <= 227 * 1024
