"""benchmarks/gpu_check.sh's control flow, on the CPU: ``--dry-run`` walks every step (budgets,
logs written as they run, packing into at most 8 files) and only shows what needs the GPU
machine; a step past its budget is stopped and reported; the helpers read junit reports and
match prebuilt extensions. The GPU run itself can only happen on the GPU machine (README)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "benchmarks" / "gpu_check.sh").is_file())
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
LIB = ROOT / "benchmarks" / "gpu_check_lib.py"
STEPS = ["environment", "extension", "gpu-tests", "verify", "timings", "train-timing", "pack"]

pytestmark = pytest.mark.skipif(not all(shutil.which(t) for t in ("bash", "timeout", "tar", "tail")),
                                reason="needs bash, timeout, tar and tail")


def run_script(tmp_path, *args, **env):
    environ = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_WORK": str(tmp_path / "work"), **env}
    for name in ("TRITON_INTERPRET", "RESNET_FUSED_VERIFY", "OUT"):  # the script sets what it needs
        environ.pop(name, None)
    return subprocess.run(["bash", str(SCRIPT), *args, str(tmp_path / "out")], capture_output=True, text=True,
                          env=environ, cwd=tmp_path, timeout=240)


def out_files(tmp_path):
    return [p for p in (tmp_path / "out").rglob("*") if p.is_file()]


def test_dry_run_walks_every_step_and_packs_at_most_8_files(tmp_path):
    # The environment step imports torch: give a loaded CI machine room for that.
    result = run_script(tmp_path, "--dry-run", GPU_CHECK_BUDGET_ENVIRONMENT="90")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    for number, step in enumerate(STEPS, 1):
        assert f"=== [{number}/{len(STEPS)}] {step} (" in out, step
    files = out_files(tmp_path)
    assert len(files) <= 8 and {p.name for p in files} == {"summary.md", "gpu_check.tar.gz", "gpu_check.log"}
    assert "=== [7/7] pack" in (tmp_path / "out" / "gpu_check.log").read_text()

    summary = (tmp_path / "out" / "summary.md").read_text()
    for step in STEPS:
        assert f"| {step} | ok" in summary, summary
    with tarfile.open(tmp_path / "out" / "gpu_check.tar.gz") as archive:
        names = {Path(n).name for n in archive.getnames()}
    assert {"steps.tsv", "versions.env", "meta.env", "environment.log", "extension.log", "gpu_tests.log",
            "gpu_tests_collect.log", "timings.log", "train.log"} <= names
    assert {f"verify-{tag}.log" for tag in ("triton-fp16", "triton-bf16", "cuda-fp16-bf16")} <= names

    work = tmp_path / "work"
    # What the GPU machine would run is shown, with its options.
    tests_log = (work / "gpu_tests.log").read_text()
    assert "RESNET_FUSED_AUTOTUNE=0" in tests_log and "-m gpu --maxfail=50" in tests_log
    assert "--backend triton --dtype fp16" in (work / "verify-triton-fp16.log").read_text()
    # The collection comes in the GPU run's order: whole models first.
    collected = [line for line in (work / "gpu_tests_collect.log").read_text().splitlines() if "::" in line]
    assert collected and "test_converted_resnet50_half_channels_last" in collected[0], collected[:3]


def test_a_step_past_its_budget_is_stopped_and_reported(tmp_path):
    result = run_script(tmp_path, "--dry-run", GPU_CHECK_STEPS="verify", GPU_CHECK_DRY_SLEEP="60",
                        GPU_CHECK_BUDGET_VERIFY="2")
    assert result.returncode == 1, result.stdout[-3000:]
    assert "exit status 124 (time limit)" in result.stdout
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| verify | TIMEOUT |" in summary and "| environment | SKIPPED |" in summary, summary
    # Each log was written as the command ran: the stopped commands' lines are there.
    for tag in ("triton-fp16", "triton-bf16", "cuda-fp16-bf16"):
        assert "[dry run] not run" in (tmp_path / "work" / f"verify-{tag}.log").read_text()
    assert len(out_files(tmp_path)) <= 8


JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" tests="4">
<testcase classname="tests.test_gpu" name="test_ok[fp16]" time="0.1"/>
<testcase classname="tests.test_gpu" name="test_bad[bf16]" time="0.2">
  <failure message="AssertionError: ratio 3.1">Traceback: assert 3.1 &lt;= 1</failure>
  <system-out>kernel log line</system-out></testcase>
<testcase classname="tests.test_gpu" name="test_broken" time="0.3"><error message="RuntimeError: CUDA error">stack</error></testcase>
<testcase classname="tests.test_gpu" name="test_skip" time="0"><skipped message="no GPU"/></testcase>
</testsuite></testsuites>
"""


def test_junit_report_gives_counts_and_every_failing_tests_output(tmp_path):
    (tmp_path / "r.xml").write_text(JUNIT)
    result = subprocess.run([sys.executable, str(LIB), "junit", str(tmp_path / "r.xml"), str(tmp_path / "f.txt")],
                            capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "1 passed, 1 failed, 1 error, 1 skipped"
    failures = (tmp_path / "f.txt").read_text()
    assert "FAILED: tests.test_gpu::test_bad[bf16]" in failures and "assert 3.1 <= 1" in failures
    assert "kernel log line" in failures and "ERROR: tests.test_gpu::test_broken" in failures
    assert "test_ok" not in failures and "test_skip" not in failures


def test_a_prebuilt_extension_is_taken_only_for_this_python_torch_and_source(tmp_path):
    source_hash = subprocess.run([sys.executable, str(LIB), "source-hash"], capture_output=True, text=True,
                                 check=True).stdout.strip()
    prebuilt = tmp_path / "prebuilt"
    prebuilt.mkdir()
    (prebuilt / "_C.cpython-312-x86_64-linux-gnu.so").write_bytes(b"")
    (tmp_path / "versions.env").write_text("python_tag=cp312\ntorch=2.11.0+cu130\n")

    def check(**info):
        fields = {"python_tag": "cp312", "torch": "2.11.0+cu130", "source_hash": source_hash,
                  "so": "_C.cpython-312-x86_64-linux-gnu.so", **info}
        (prebuilt / "BUILD_INFO").write_text("".join(f"{k}={v}\n" for k, v in fields.items()))
        return subprocess.run([sys.executable, str(LIB), "prebuilt", str(prebuilt), str(tmp_path / "versions.env")],
                              capture_output=True, text=True)

    match = check()
    assert match.returncode == 0 and match.stdout.strip().endswith("_C.cpython-312-x86_64-linux-gnu.so")
    for field, value in (("torch", "2.14.1+cu130"), ("python_tag", "cp311"), ("source_hash", "0" * 16)):
        mismatch = check(**{field: value})
        assert mismatch.returncode == 1 and field in mismatch.stdout, mismatch.stdout


def test_gpu_order_ranks_the_informative_tests_first(request):
    conftest = next(p for p in request.config.pluginmanager.get_plugins() if hasattr(p, "gpu_rank"))
    ranks = [conftest.gpu_rank(name) for name in (
        "test_converted_resnet50_half_channels_last[fp16]",
        "test_matches_reference[triton-gpu-stem-fp16-nhwc-res-relu]",
        "test_matches_reference[cuda-gpu-stem-bf16-nchw-res-relu]",
        "test_matches_reference[cuda-gpu-1x1-256-64-fp16-nhwc-nores-linear]",
        "test_unit_matches_fp64[triton-gpu-stem-fp16-True-train]",
        "test_matches_reference[triton-gpu-stem-fp32-nhwc-res-relu]",
        "test_cutlass_op_matches_reference[sm90-x]",
    )]
    assert ranks[0] < ranks[1] == ranks[2] == ranks[3] < ranks[4] < ranks[5] < ranks[6]


@pytest.mark.skipif(sys.version_info[:2] == (3, 12), reason="this Python is a 3.12: the script would build")
def test_the_prebuilt_extension_script_refuses_a_python_other_than_312(tmp_path):
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "build_gpu_extension.sh"), sys.executable, "--check"],
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, "GPU_EXT_VENV": str(tmp_path / "venv")})
    assert result.returncode == 2 and "needs CPython 3.12" in result.stderr and "is not a Python 3.12" in result.stderr
    assert not (tmp_path / "venv").exists()
