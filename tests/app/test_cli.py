"""The ``resnet-fused`` command: argument handling, output files, one-line errors with exit
status 2. No timing is asserted: the bench runs here only at toy sizes."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from resnet_fused import available_backends, cli
from resnet_fused.bench.models import bench_model
from helpers import textbook_resnet

TINY = ["bench", "--model", "resnet18", "--batch", "1", "--size", "32", "--rounds", "1", "--warmup", "0", "--no-compile"]


def run_cli(argv, capsys):
    """(exit status, stdout, stderr) of ``resnet-fused argv``."""
    try:
        status = cli.main(argv)
    except SystemExit as exit_:  # argparse's own errors
        status = exit_.code
    out, err = capsys.readouterr()
    return status, out, err


@pytest.mark.parametrize("argv, message", [
    (["bench", "--batch", "0"], "--batch must be >= 1"),
    (["bench", "--model", "resnet7"], "unknown model 'resnet7'"),
    (["bench", "--model", "not_a_net"], "unknown model 'not_a_net'"),
    (["bench", "--dtype", "fp8"], "unknown --dtype 'fp8'"),
    (["bench", "--backend", "magic"], "unknown backend 'magic'"),
    (["bench", "--rounds", "0"], "--rounds must be >= 1"),
    (["bench", "--size", "8"], "--size must be >= 32"),
    (["bench", "--mode", "predict"], "invalid choice: 'predict'"),
    (["bench", "--batch", "two"], "invalid int value: 'two'"),
    (["bench", "--mode", "train", "--batch", "1"], "needs --batch >= 2"),
    (["bench", "--device", "tpu"], "--device"),
])
def test_impossible_requests_get_one_line_and_status_2(argv, message, capsys):
    status, out, err = run_cli(argv, capsys)
    assert status == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err + out


def test_device_specific_refusals(capsys):
    if torch.cuda.is_available():
        pytest.skip("checks what a CPU-only machine refuses")
    for argv, message in [
        (["bench", "--device", "cuda"], "no CUDA device"),
        (["bench", "--dtype", "tf32"], "tf32 needs a CUDA GPU"),
        (["bench", "--backend", "triton"], "backend 'triton' is not available for cpu"),
        (["bench", "--backend", "cuda,cpu"], "backend 'cuda' is not available for cpu"),
    ]:
        status, _, err = run_cli(argv, capsys)
        assert status == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_plot_without_matplotlib_is_refused_up_front(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    status, _, err = run_cli([*TINY, "--plot", str(tmp_path / "p.png")], capsys)
    assert status == 2 and "--plot needs matplotlib" in err


def test_output_folder_must_exist(capsys, tmp_path):
    status, _, err = run_cli([*TINY, "--csv", str(tmp_path / "missing" / "r.csv")], capsys)
    assert status == 2 and "does not exist" in err and len(err.strip().splitlines()) == 1


def test_a_failing_torch_compile_is_skipped_with_a_note(capsys, monkeypatch):
    def broken_compile(model, **kwargs):
        def run(*args):
            raise RuntimeError("no C++ compiler here\nmore detail")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    argv = [a for a in TINY if a != "--no-compile"] + ["--compile", "--backend", "cpu"] if "cpu" in available_backends() \
        else [a for a in TINY if a != "--no-compile"] + ["--compile"]
    status, out, err = run_cli(argv, capsys)
    assert status == 0, err
    assert "torch.compile +freezing failed and was skipped: RuntimeError: no C++ compiler here" in out
    assert "vs compile" not in out


def test_module_entry_point_exits_2_without_traceback():
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-m", "resnet_fused", "bench", "--batch", "-3"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "resnet-fused bench: error: --batch must be >= 1, got -3"


def test_help_lists_the_options(capsys):
    status, out, _ = run_cli(["bench", "--help"], capsys)
    assert status == 0
    for option in ("--model", "--no-compile", "--per-layer", "--plot", "--csv", "--json", "--backend", "--dtype"):
        assert option in out


def test_tiny_run_writes_csv_and_json(tmp_path, capsys):
    csv_path, json_path, png = tmp_path / "r.csv", tmp_path / "r.json", tmp_path / "r.png"
    plot = ["--plot", str(png)] if importlib.util.find_spec("matplotlib") else []
    status, out, err = run_cli([*TINY, "--per-layer", "--csv", str(csv_path), "--json", str(json_path), *plot], capsys)
    assert status == 0, err
    if plot:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    expected = ["eager", "eager channels_last"]
    if "cpu" in available_backends():
        expected += ["fused: cpu", "fused: auto"]
    expected.append("frozen")
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    names = [r["name"] for r in rows]
    assert names[: len(expected) - 1] == expected[:-1] and names[-1].startswith("frozen")
    for row in rows:
        assert row["model"] == "resnet18" and row["batch"] == "1" and row["size"] == "32" and row["dtype"] == "fp32"
        assert float(row["images_per_s"]) > 0 and float(row["tflops"]) > 0 and float(row["peak_pct"]) > 0
        assert float(row["max_abs_diff"]) < 1e-3
        assert row["speedup_vs_compile"] == ""  # --no-compile
    assert float(rows[0]["speedup"]) == 1.0
    assert 0.02 < float(rows[0]["gmac_per_image"]) < 0.05  # resnet18 at 32x32: 37 MMAC

    report = json.loads(json_path.read_text())
    assert report["setting"]["model"] == "resnet18" and report["setting"]["mode"] == "infer"
    assert report["peaks"]["flops"] > 0 and report["peaks"]["bytes"] > 0
    assert [v["name"] for v in report["variants"]] == names
    layers = report["layers"]
    assert len(layers) == 15  # the distinct fused conv units of resnet18
    assert sum(layer["count"] for layer in layers) == 20
    assert all(layer["floor_s"] > 0 and layer["flops"] > 0 and layer["min_bytes"] > 0 for layer in layers)
    assert {"unfused", "conv alone"} <= set(layers[0]["times"])
    assert all(layer["auto"] in ("cpu", "reference") for layer in layers)  # what backend="auto" runs per unit

    with open(tmp_path / "r-layers.csv") as f:
        layer_rows = list(csv.DictReader(f))
    assert len(layer_rows) == 15 and "floor ms" in layer_rows[0] and "unfused ms" in layer_rows[0]
    assert "per layer" in out and "GMAC per image" in out and "auto runs" in out


def test_tiny_training_run(capsys):
    status, out, err = run_cli(["bench", "--mode", "train", "--model", "resnet18", "--batch", "2", "--size", "32",
                                "--rounds", "1", "--warmup", "0"], capsys)
    assert status == 0, err
    assert "training step" in out and "saved MiB" in out and "frozen" not in out


def test_bench_model_keeps_its_positional_signature():
    """benchmarks/gpu_timings.py calls bench_model(model, batch, size, device, dtype,
    channels_last, warmup=, rounds=): eager first, speedups relative to it."""
    results = bench_model(textbook_resnet(), 2, 32, torch.device("cpu"), torch.float32, True, warmup=0, rounds=1)
    assert results[0].name == "eager" and results[0].speedup == 1.0
    assert {"eager channels_last"} <= {r.name for r in results}
    assert all(r.median_s > 0 and r.max_abs_diff < 1e-3 for r in results)
