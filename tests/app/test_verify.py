"""``resnet-fused verify`` on the CPU: every check passes for the cpu backend, a wrong kernel
fails its checks and the exit status, and the guard does not hide it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from resnet_fused import _extension, backends, cli
from resnet_fused.ops import reference

# The cpu backend runs when the extension is built; asked of the build, not of
# available_backends(), which queries the GPU at collection.
pytestmark = pytest.mark.skipif(not _extension.has_cpu_ops(), reason=f"extension not built: {_extension.LOAD_ERROR}")
TINY = ["verify", "--device", "cpu", "--batch", "2", "--size", "16", "--dtype", "fp32", "--reps", "1"]


def test_the_cpu_backend_passes_every_resnet50_unit(capsys, tmp_path):
    status = cli.main([*TINY, "--csv", str(tmp_path / "verify.csv")])
    out = capsys.readouterr().out
    assert status == 0, out
    lines = [line for line in out.splitlines() if line.startswith(("PASS", "FAIL", "SKIP"))]
    # ResNet-50's distinct conv units, each as the eval op and as the training unit; at 16 px
    # the training units of the last stages see fewer than 8 values per channel and are skipped.
    assert len(lines) >= 2 * 20 and all(line.startswith(("PASS", "SKIP")) for line in lines), out
    assert all(" train " in line and "fewer than 8 values" in line for line in lines if line.startswith("SKIP"))
    assert sum(line.startswith("PASS") for line in lines) >= 30
    assert {"eval", "train"} <= {line.split()[3] for line in lines if line.startswith("PASS")}
    assert "checks passed" in out and (tmp_path / "verify.csv").read_text().count("\n") == len(lines) + 1


def test_a_wrong_kernel_fails_the_run_even_with_the_guard_on(monkeypatch, capsys):
    monkeypatch.setenv("RESNET_FUSED_VERIFY", "first")  # verify turns it off: a fallback would hide the bug
    record = backends.REGISTRY["cpu"]
    wrong = dataclasses.replace(record, inference=lambda *args: reference.inference(*args) + 1e-3)
    monkeypatch.setitem(backends.REGISTRY, "cpu", wrong)
    status = cli.main(TINY)
    out = capsys.readouterr().out
    assert status == 1
    fails = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert fails and all(" eval " in line for line in fails), out
    assert "FAILED" in out


def test_bad_requests_are_one_line_errors(capsys):
    assert cli.main(["verify", "--dtype", "fp8"]) == 2
    assert "unknown dtype 'fp8'" in capsys.readouterr().err
    assert cli.main(["verify", "--device", "cpu", "--backend", "cuda"]) == 2
    assert "backend 'cuda' cannot run on cpu" in capsys.readouterr().err
    assert cli.main(["verify", "--device", "tpu0"]) == 2
    assert "unknown --device 'tpu0'" in capsys.readouterr().err
    assert cli.main(["verify", "--device", "cpu", "--batch", "-1"]) == 2
    assert "--batch must be >= 1" in capsys.readouterr().err
    assert cli.main(["verify", "--device", "cpu", "--size", "0"]) == 2
    assert "--size must be >= 1" in capsys.readouterr().err


def test_cuda_without_a_cuda_device_is_an_error(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["verify", "--device", "cuda"]) == 2
    assert "PyTorch sees no CUDA device" in capsys.readouterr().err


def test_skipped_checks_are_not_counted_as_passed(capsys):
    """Batch 1 at 1x1: every training unit sees one value per channel and is skipped."""
    status = cli.main(["verify", "--device", "cpu", "--batch", "1", "--size", "1", "--dtype", "fp32", "--reps", "1"])
    out = capsys.readouterr().out
    assert status == 0, out
    skipped = sum(line.startswith("SKIP") for line in out.splitlines())
    passed = sum(line.startswith("PASS") for line in out.splitlines())
    assert skipped and f"{passed} of {passed + skipped} checks passed; {skipped} skipped" in out, out
