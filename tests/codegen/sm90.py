"""Compile Triton kernels for Hopper (sm_90) on a machine without a GPU, and read ptxas's report.

The one place that knows how ASTSource and the bundled ptxas are called, since both changed
between Triton releases (the GPU machine runs 3.6, CI 3.8).

Compilation runs in a child process without TRITON_INTERPRET: in a process where it is set,
Triton's code generator builds broken IR (seen with Triton 3.8), and the test session must keep
the interpreter on for the other tests. One child compiles a whole batch of kernels.

Also the one list of what to compile: every config the conv kernels' autotuner may choose, per
dtype and input precision (test_conv_bn_act_sm90.py and test_training_sm90.py both use it).
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
