"""examples/train.py: fused and unfused training under torchrun agree step by step, --resume
continues a run exactly, and user mistakes get one line and exit status 2.

The model is the paper's ResNet-20 at 16 px: its last stage still has a 4x4 map, so BatchNorm
sees 16 values per channel and image. (torchvision's resnet18 at 32 px ends in a 1x1 map, where
one ReLU input rounding to the other side of zero visibly moves the next steps: measured there
with 2 processes of 8 images, an unfused run whose initial weights were one ulp off parted from
the unfused run by 5e-3 at step 3, as far as the fused run did.)
"""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import resnet_fused

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "train.py"
# Loaded from its file (an example, not part of the package) for the in-process runs.
_SPEC = importlib.util.spec_from_file_location("train_example", SCRIPT)
train_example = importlib.util.module_from_spec(_SPEC)
sys.modules["train_example"] = train_example  # dataclasses look their module up there
_SPEC.loader.exec_module(train_example)

TINY = ["--model", "paper:resnet20", "--image-size", "16", "--batch-size", "8", "--seed", "3"]


def losses(out: Path) -> list[float]:
    with (out / "metrics.csv").open(newline="") as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]


def rows(out: Path) -> list[dict]:
    with (out / "metrics.csv").open(newline="") as f:
        return [{k: row[k] for k in ("step", "epoch", "loss", "lr")} for row in csv.DictReader(f)]


def torchrun(out: Path, *extra: str) -> None:
    # The workers must import the resnet_fused this test imported (a checkout or the installed one).
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(resnet_fused.__file__).parents[1]),
                                                      env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT),
           *TINY, "--device", "cpu", "--no-sync-bn", "--max-steps", "3", "--out", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture
def one_process(monkeypatch):
    """In this process, as without torchrun, whatever launched pytest; on one thread, as
    torchrun's workers run: on a loaded 2-core machine two OpenMP threads wait for each other
    (measured: these steps 50x slower, fused or not)."""
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_fused_and_unfused_ddp_runs_agree(tmp_path):
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    torchrun(tmp_path / "fused", "--fused", "--backend", "cpu")
    torchrun(tmp_path / "unfused")
    fused, unfused = losses(tmp_path / "fused"), losses(tmp_path / "unfused")
    assert len(fused) == len(unfused) == 3
    # Step 1 is one forward of the same weights on the same batches: fp32 rounding only (the cpu
    # backend sums in another order). Measured 5e-8.
    assert fused[0] == pytest.approx(unfused[0], rel=1e-5)
    # Later steps carry that rounding through backward and SGD, where a ReLU input near zero
    # may round to the other side and move the next step by more than rounding. Measured 5e-8
    # here; at 32 px 2e-7 and 8e-5 (and 3e-3 at step 4). 1e-3 is the tolerance of
    # tests/convert/test_training.py for resnet18's SGD steps; a wrong gradient parts further.
    assert fused[1:] == pytest.approx(unfused[1:], rel=1e-3)


def test_resume_continues_exactly(tmp_path, one_process):
    common = [*TINY, "--device", "cpu", "--fused", "--backend", "cpu"]
    assert train_example.main([*common, "--max-steps", "4", "--out", str(tmp_path / "straight")]) == 0
    assert train_example.main([*common, "--max-steps", "2", "--out", str(tmp_path / "resumed")]) == 0
    assert train_example.main([*common, "--max-steps", "4", "--out", str(tmp_path / "resumed"), "--resume"]) == 0
    # Bit for bit: the same batches (the epoch's order, skipping those done), schedule, momentum.
    assert rows(tmp_path / "resumed") == rows(tmp_path / "straight")
    straight, resumed = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=True) for d in ("straight", "resumed"))
    assert resumed["step"] == straight["step"] == 4
    for key, value in straight["model"].items():
        assert torch.equal(resumed["model"][key], value), key


@pytest.mark.parametrize("argv, message", [
    (["--model", "resnet18"], "use torchvision:<name>"),
    (["--model", "timm:no_such_net"], "unknown model 'timm:no_such_net'"),
    (["--batch-size", "1"], "--batch-size must be >= 2"),
    (["--backend", "cpu"], "add --fused"),
    (["--device", "cpu", "--amp", "fp16"], "--amp fp16 needs a GPU"),
    (["--resume"], "no checkpoint at"),
])
def test_mistakes_get_one_line_and_status_2(argv, message, tmp_path, one_process, capsys):
    assert train_example.main([*argv, "--out", str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in out + err


def test_cpu_processes_need_no_sync_bn(tmp_path, monkeypatch, capsys):
    # DistributedDataParallel refuses SyncBatchNorm in a CPU module, fused ones included:
    # refused before any process group is joined.
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert train_example.main(["--device", "cpu", "--fused", "--out", str(tmp_path)]) == 2
    assert "add --no-sync-bn" in capsys.readouterr().err


def test_cuda_without_a_gpu_says_so(tmp_path, one_process, capsys):
    if torch.cuda.is_available():
        pytest.skip("checks what a machine without a GPU refuses")
    assert train_example.main(["--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "no CUDA device is visible" in capsys.readouterr().err
