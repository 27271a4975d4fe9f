"""Compile Triton kernels for Hopper (sm_90) on a machine without a GPU, and read ptxas's report.

The one place that knows how ASTSource and the bundled ptxas are called, since both changed
between Triton releases (the GPU machine runs 3.6, CI 3.8).

Compilation runs in a child process without TRITON_INTERPRET: in a process where it is set,
Triton's code generator builds broken IR (seen with Triton 3.8), and the test session must keep
the interpreter on for the other tests. One child compiles a whole batch of kernels.

Also the one list of what to compile: every config the conv kernels' autotuner may choose, per
dtype and input precision (test_conv_bn_act_sm90.py and test_training_sm90.py both use it), and
the jobs of the inference kernel and the bn_act kernels as a launch specializes them (with ReLU;
test_activations_sm90.py compiles the same jobs with the other activations).
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Job:
    """One compilation: ``kernel`` is "module:attribute" of a @triton.jit function;
    ``signature`` maps every non-constexpr argument to a Triton type ("*fp16", "i32", ...);
    ``divisible_by_16`` names the pointers (16-byte aligned) and integers (multiples of 16) the
    JIT would specialize as such at launch — alignment decides vector width and whether loads
    become asynchronous copies, so leaving it out compiles a slower kernel than a GPU runs."""

    kernel: str
    signature: dict
    constexprs: dict
    num_warps: int
    num_stages: int
    divisible_by_16: tuple = ()


@dataclass(frozen=True)
class Compiled:
    uses_wgmma: bool
    shared_bytes: int
    registers: int
    spill_store_bytes: int
    spill_load_bytes: int
    stack_bytes: int


TRITON_TYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
PRECISIONS = ((torch.float16, "ieee"), (torch.bfloat16, "ieee"), (torch.float32, "tf32"), (torch.float32, "ieee"))


def tile_name(config):
    return "x".join(str(v) for v in (*config.kwargs.values(), config.num_warps, config.num_stages))


def reachable_configs(dtype):
    """Every config gpu_configs may return for ``dtype``, once each."""
    from resnet_fused.ops.triton import conv_bn_act as triton_op

    return list({triton_op._config_id(config): config for tile_c, tile_k in triton_op.CONFIG_REACHING_TILES
                 for config in triton_op.gpu_configs(dtype, tile_c, tile_k)}.values())


def packs_groups(config):
    """Only a 16x16 tile ever holds more than one group (implicit_gemm.group_tile keeps both of a
    packed tile's channel counts within 16)."""
    return config.kwargs["BLOCK_N"] == 16 and config.kwargs["BLOCK_C"] == 16


def config_cases(make_job, prefix=""):
    """Each reachable config per (dtype, input precision), plus the packed-groups variant of the
    16x16 ones: ``make_job(dtype, config, precision, group_tile=1)`` per case name."""
    out = {}
    for dtype, precision in PRECISIONS:
        for config in reachable_configs(dtype):
            name = f"{prefix}{TRITON_TYPE[dtype]}-{precision}-{tile_name(config)}"
            out[name] = make_job(dtype, config, precision)
            if packs_groups(config):
                out[f"{name}-4groups"] = make_job(dtype, config, precision, group_tile=4)
    return out


# --- the inference kernel conv_bn_act -------------------------------------------------------
CONV_BN_ACT_KERNEL = "resnet_fused.ops.triton.conv_bn_act:_conv_bn_act_fwd_kernel"
CONV_INDEX_ARGS = (
    "M", "N", "C", "H", "W", "K", "P", "Q", "tile_c", "tile_k", "stride_h", "stride_w", "pad_h", "pad_w", "dil_h", "dil_w",
    "sx_n", "sx_h", "sx_w", "sw_k", "sw_r", "sw_s", "sr_n", "sr_p", "sr_q", "so_n", "so_p", "so_q",
)
# What the JIT specializes at a real launch (the launcher always passes channels_last input,
# residual and output and a (K, R, S, C) weight): unit channel strides become constants; 16-aligned pointers and
# multiple-of-16 sizes and strides get divisibility hints (ResNet channel counts are such, and
# so are ResNeXt's channels per tile: 4-wide groups pack 4 to a 16-channel tile).
CONV_UNIT_STRIDES = {"sx_c": 1, "sw_c": 1, "sr_k": 1, "so_k": 1}
CONV_PER_CHANNEL = ("bias_ptr", "gamma_ptr", "beta_ptr", "mean_ptr", "var_ptr")
CONV_ALIGNED = (
    "x_ptr", "w_ptr", *CONV_PER_CHANNEL, "res_ptr", "out_ptr", "C", "K", "tile_c", "tile_k",
    "sx_n", "sx_h", "sx_w", "sw_k", "sw_r", "sw_s", "sr_n", "sr_p", "sr_q", "so_n", "so_p", "so_q",
)


def conv_bn_act_job(dtype, config, input_precision, use_int64=False, kernel_size=3, group_tile=1):
    element = "*" + TRITON_TYPE[dtype]
    signature = {name: "i64" if use_int64 else "i32" for name in CONV_INDEX_ARGS}
    signature.update(x_ptr=element, w_ptr=element, res_ptr=element, out_ptr=element, eps="fp32", act_a="fp32",
                     act_b="fp32")
    signature.update({name: "*fp32" for name in CONV_PER_CHANNEL})
    constexprs = dict(
        CONV_UNIT_STRIDES, R=kernel_size, S=kernel_size, HAS_BIAS=True, HAS_BN_WEIGHT=True, HAS_BN_BIAS=True,
        HAS_RESIDUAL=True, ACT=1, GROUP_TILE=group_tile, INPUT_PRECISION=input_precision,
        USE_INT64=use_int64, **config.kwargs,
    )
    return Job(CONV_BN_ACT_KERNEL, signature, constexprs, config.num_warps, config.num_stages, CONV_ALIGNED)


# --- the training unit's bn_act kernels -----------------------------------------------------
# Per kernel: its activation-sized tensors and their (n, k, l) stride names. NCHW: l unit,
# channels_last: k unit.
BN_ACT_TENSORS = {
    "_bn_act_fwd_kernel": {"y_ptr": "sy", "res_ptr": "sr", "out_ptr": "so"},
    "_bn_act_bwd_reduce_kernel": {"grad_ptr": "sg", "out_ptr": "so", "y_ptr": "sy"},
    "_bn_act_bwd_kernel": {"grad_ptr": "sg", "out_ptr": "so", "y_ptr": "sy", "dy_ptr": "sd", "dres_ptr": "sr"},
}
BN_PER_CHANNEL = ("mean_ptr", "var_ptr", "gamma_ptr", "beta_ptr", "sum_g_ptr", "sum_gx_ptr", "part_g_ptr",
                  "part_gx_ptr")
BN_ACT_FLAGS = {
    "_bn_act_fwd_kernel": dict(HAS_GAMMA=True, HAS_BETA=True, HAS_RESIDUAL=True, ACT=1),
    "_bn_act_bwd_reduce_kernel": dict(HAS_GAMMA=True, HAS_BETA=True, ACT=1),
    "_bn_act_bwd_kernel": dict(HAS_GAMMA=True, HAS_BETA=True, TRAINING=True, ACT=1, RESIDUAL_GRAD=True),
}
BN_SCALARS = {"eps": "fp32", "count": "fp32", "act_a": "fp32", "act_b": "fp32", "K": "i32", "L": "i32", "LB": "i32",
              "LS": "i32"}


def bn_act_job(name, dtype, channels_last, use_int64=False):
    """``name`` with every optional input on, as the launcher calls it for a ResNet activation
    (K and L multiples of 16, 16-aligned pointers), GPU block sizes."""
    from resnet_fused.ops.triton import bn_act

    fn = getattr(bn_act, name)
    element = "*" + TRITON_TYPE[dtype]
    index = "i64" if use_int64 else "i32"
    signature, constexprs, aligned = {}, dict(BN_ACT_FLAGS[name]), ["K", "L"]
    if name == "_bn_act_bwd_reduce_kernel":  # not in BN_ACT_FLAGS: bn_act is imported only here, as jobs are built
        constexprs["STEPS"] = bn_act._REDUCE_STEPS
    for arg in fn.arg_names:
        if arg in BN_ACT_TENSORS[name]:
            signature[arg] = element
            aligned.append(arg)
            prefix = BN_ACT_TENSORS[name][arg]
            unit, others = ("_k", ("_n", "_l")) if channels_last else ("_l", ("_n", "_k"))
            constexprs[prefix + unit] = 1
            for suffix in others:
                signature[prefix + suffix] = index
                aligned.append(prefix + suffix)
        elif arg in BN_PER_CHANNEL:
            signature[arg] = "*fp32"
            aligned.append(arg)
        elif arg in BN_SCALARS:
            signature[arg] = BN_SCALARS[arg]
    block_l, block_k = bn_act._blocks(256, 56 * 56)
    constexprs.update(USE_INT64=use_int64, BLOCK_L=block_l, BLOCK_K=block_k)
    return Job(f"resnet_fused.ops.triton.bn_act:{name}", signature, constexprs, bn_act._NUM_WARPS, 3, tuple(aligned))


def bn_act_cases():
    """Each bn_act kernel for fp16, bf16 and fp32 activations in both layouts the launchers pass."""
    return {f"{name}-{TRITON_TYPE[dtype]}-{layout}": bn_act_job(name, dtype, layout == "nhwc")
            for name in BN_ACT_TENSORS for dtype in TRITON_TYPE for layout in ("nchw", "nhwc")}


def compile_for_hopper(jobs: list[Job]) -> list[Compiled]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    payload = json.dumps([job.__dict__ for job in jobs])
    proc = subprocess.run(
        [sys.executable, __file__], input=payload, capture_output=True, text=True, env=env, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"sm_90 compilation failed:\n{proc.stderr[-6000:]}")
    return [Compiled(**result) for result in json.loads(proc.stdout)]


def _ptxas_path() -> str:
    from triton.backends.nvidia import compiler

    try:
        tool = compiler.get_ptxas(90)  # Triton >= 3.7 takes the arch
    except TypeError:
        tool = compiler.get_ptxas()
    return tool.path if hasattr(tool, "path") else tool[0]


def _ptxas_report(ptx: str) -> dict[str, int]:
    """Registers, spill bytes and stack of the kernel in ``ptx``, as ``ptxas -v`` prints them."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        proc = subprocess.run(
            [_ptxas_path(), "-v", "--gpu-name=sm_90a", str(src), "-o", str(Path(tmp) / "kernel.cubin")],
            capture_output=True,
            text=True,
            check=True,
        )
    text = proc.stderr + proc.stdout

    def grab(pattern: str) -> int:
        match = re.search(pattern, text)
        if match is None:
            raise AssertionError(f"ptxas -v output lacks {pattern!r}:\n{text}")
        return int(match.group(1))

    return {
        "registers": grab(r"Used (\d+) registers"),
        "spill_store_bytes": grab(r"(\d+) bytes spill stores"),
        "spill_load_bytes": grab(r"(\d+) bytes spill loads"),
        "stack_bytes": grab(r"(\d+) bytes stack frame"),
    }


def _compile(job: Job) -> Compiled:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module, name = job.kernel.split(":")
    fn = getattr(importlib.import_module(module), name)
    signature = {arg: job.signature.get(arg, "constexpr") for arg in fn.arg_names}
    missing = [arg for arg in fn.arg_names if signature[arg] == "constexpr" and arg not in job.constexprs]
    if missing:
        raise ValueError(f"{job.kernel}: no type or constexpr value given for {missing}")
    attrs = {(fn.arg_names.index(arg),): [["tt.divisibility", 16]] for arg in job.divisible_by_16}
    compiled = triton.compile(
        ASTSource(fn, signature, job.constexprs, attrs),
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": job.num_warps, "num_stages": job.num_stages},
    )
    ptx = compiled.asm["ptx"]
    return Compiled(uses_wgmma="wgmma" in ptx, shared_bytes=compiled.metadata.shared, **_ptxas_report(ptx))


if __name__ == "__main__":
    jobs = [Job(**spec) for spec in json.loads(sys.stdin.read())]
    print(json.dumps([_compile(job).__dict__ for job in jobs]))
