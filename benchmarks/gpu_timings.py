"""Fused vs unfused timings for every distinct ResNet-50 conv shape, and ResNet-50 end to end.

Per conv shape (batch 64, fp16, channels_last, eval), side by side in one run:
  - fused ops:  Triton conv_bn_act, and the C++ "cuda" op (cuDNN conv + one BN/residual/ReLU pass)
  - unfused:    eager cuDNN conv → batch_norm → [+ residual] → relu
  - conv alone: eager cuDNN conv2d, the floor any fusion is measured against
End to end: ResNet-50 eval (batch 256, fp16, channels_last), eager vs each fused backend, with
its BatchNorm layers in fp32 as in the per-shape timings: Triton's autotune key holds every
tensor's dtype, so fp16 BN buffers would re-tune every conv already tuned above. The tuning
itself is bounded by RESNET_FUSED_AUTOTUNE=N (the first N configs per tile class), recorded in
the header.

Writes timings.csv and timings.md (with GPU name, date, commit, torch/triton versions) to --out.
Timing: CUDA events around `reps` back-to-back calls, variants interleaved round by round, median
of the rounds; inputs rotate among several buffers so no call hits a cache left by the last one.
On a machine without a GPU, ``--device cpu`` with small sizes dry-runs the same code.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
import triton

import resnet_fused
from resnet_fused import FusedConv2d
from resnet_fused.bench.models import bench_model, fused_backends_for
from resnet_fused.ops.triton import conv_bn_act as triton_op

HERE = Path(__file__).resolve().parent


def conv_shapes(batch: int, size: int) -> list[dict]:
    """Distinct (input, weight, stride, padding, residual, relu) of ResNet-50's fused convs,
    with how many times each occurs in one forward pass."""
    model = resnet_fused.convert(torchvision.models.resnet50().eval(), backend="reference")
    seen: dict[tuple, dict] = {}

    def record(module, args, kwargs):
        x = args[0]
        residual = kwargs.get("residual")
        key = (tuple(x.shape), tuple(module.weight.shape), module.stride, module.padding, residual is not None, module.relu)
        entry = seen.setdefault(key, {"x": key[0], "w": key[1], "stride": key[2], "padding": key[3],
                                      "residual": key[4], "relu": key[5], "count": 0})
        entry["count"] += 1

    hooks = [m.register_forward_pre_hook(record, with_kwargs=True) for m in model.modules() if isinstance(m, FusedConv2d)]
    with torch.inference_mode():
        model(torch.zeros(batch, 3, size, size))
    for h in hooks:
        h.remove()
    return list(seen.values())


def timer(device: torch.device):
    if device.type == "cuda":
        def run(fn, reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for i in range(reps):
                fn(i)
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / reps
    else:
        def run(fn, reps):
            t = time.perf_counter()
            for i in range(reps):
                fn(i)
            return (time.perf_counter() - t) / reps
    return run


def time_shape(shape: dict, device, dtype, rounds: int, reps: int, buffers: int) -> dict[str, float]:
    g = torch.Generator(device="cpu").manual_seed(0)
    fmt = torch.channels_last
    n, c, h, w = shape["x"]
    k = shape["w"][0]
    xs = [torch.randn(shape["x"], generator=g).to(device, dtype).contiguous(memory_format=fmt) for _ in range(buffers)]
    weight = (torch.randn(shape["w"], generator=g) / (c * shape["w"][2] * shape["w"][3]) ** 0.5).to(device, dtype)
    weight = weight.contiguous(memory_format=fmt)
    mean, var = torch.randn(k, generator=g).to(device) * 0.1, (torch.rand(k, generator=g) + 0.5).to(device)
    gamma, beta = (torch.rand(k, generator=g) + 0.5).to(device), torch.randn(k, generator=g).to(device) * 0.1
    conv = dict(stride=shape["stride"], padding=shape["padding"])
    out_shape = F.conv2d(xs[0], weight, **conv).shape
    residuals = [torch.randn(out_shape, generator=g).to(device, dtype).contiguous(memory_format=fmt) for _ in range(buffers)] if shape["residual"] else [None] * buffers

    def eager(i):
        y = F.conv2d(xs[i % buffers], weight, **conv)
        y = F.batch_norm(y, mean, var, gamma, beta, False, 0.0, 1e-5)
        if residuals[i % buffers] is not None:
            y = y + residuals[i % buffers]
        return torch.relu(y) if shape["relu"] else y

    variants = {
        "eager conv+bn+act": eager,
        "conv alone": lambda i: F.conv2d(xs[i % buffers], weight, **conv),
    }
    for name in fused_backends_for(device):
        variants[f"fused {name}"] = lambda i, name=name: resnet_fused.conv_bn_act(
            xs[i % buffers], weight, mean, var, bn_weight=gamma, bn_bias=beta, residual=residuals[i % buffers],
            relu=shape["relu"], backend=name, **conv)

    run = timer(device)
    with torch.inference_mode():
        reference_out = eager(0).float()
        errors = {name: (fn(0).float() - reference_out).abs().max().item() for name, fn in variants.items() if name.startswith("fused")}
        for fn in variants.values():  # warm-up, and Triton's autotuning for this shape
            run(fn, 2)
        samples = {name: [] for name in variants}
        for _ in range(rounds):
            for name, fn in variants.items():
                samples[name].append(run(fn, reps))
    times = {name: statistics.median(s) for name, s in samples.items()}
    flops = 2 * out_shape.numel() * c * shape["w"][2] * shape["w"][3]
    return {"times": times, "errors": errors, "flops": flops}


def environment(device) -> dict[str, str]:
    commit = os.environ.get("GIT_COMMIT", "")  # the device machine's copy may have no .git
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, cwd=HERE).stdout.strip()
            commit += " (with uncommitted changes)" if commit and dirty else ""
        except OSError:
            commit = ""
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit or "unknown",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": str(torch.version.cuda),
        "python": platform.python_version(),
        "autotune": {None: "all configs", 0: "off (first config)", 1: "off (first config)"}.get(
            triton_op.autotune_limit(), f"first {triton_op.autotune_limit()} configs per tile class"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", HERE / "results" / "latest")))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--e2e-batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--buffers", type=int, default=3, help="rotating input buffers")
    parser.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    args.out.mkdir(parents=True, exist_ok=True)
    env = environment(device)
    header = [f"- {k}: {v}" for k, v in env.items()]
    print("\n".join(header), flush=True)

    rows = []
    shapes = conv_shapes(args.batch, args.size)
    # Rows are appended as they are measured, so a run cut short still leaves what it timed.
    partial = open(args.out / "conv_shapes.partial.csv", "w", newline="")
    for i, shape in enumerate(shapes):
        result = time_shape(shape, device, dtype, args.rounds, args.reps, args.buffers)
        t = result["times"]
        row = {
            "input NCHW": "x".join(map(str, shape["x"])),
            "weight KCRS": "x".join(map(str, shape["w"])),
            "stride": shape["stride"][0],
            "residual": shape["residual"],
            "relu": shape["relu"],
            "count": shape["count"],
            **{f"{name} us": round(v * 1e6, 1) for name, v in t.items()},
            **{f"{name} TFLOP/s": round(result["flops"] / v / 1e12, 1) for name, v in t.items() if name.startswith("fused")},
            **{f"speedup {name} vs eager": round(t["eager conv+bn+act"] / v, 3) for name, v in t.items() if name.startswith("fused")},
            **{f"{name} vs conv alone": round(t["conv alone"] / v, 3) for name, v in t.items() if name.startswith("fused")},
            **{f"{name} max abs err": f"{e:.2e}" for name, e in result["errors"].items()},
        }
        rows.append(row)
        print(f"[{i + 1}/{len(shapes)}] " + ", ".join(f"{k}={v}" for k, v in row.items()), flush=True)
        partial.write(("" if i else ",".join(row) + "\n") + ",".join(str(v) for v in row.values()) + "\n")
        partial.flush()
    partial.close()
    (args.out / "conv_shapes.partial.csv").unlink()

    with open(args.out / "conv_shapes.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    # Whole-network time weights each shape by its count; the sum is over fused convs only.
    totals = {name.removesuffix(" us"): sum(r[name] * r["count"] for r in rows) for name in rows[0] if name.endswith(" us")}

    e2e = bench_model(torchvision.models.resnet50(), args.e2e_batch, args.size, device, dtype, True, warmup=3,
                      rounds=args.rounds, bn_dtype=torch.float32,
                      progress=lambda done, total, what: print(f"end to end: {done}/{total} {what}", flush=True))
    with open(args.out / "resnet50_e2e.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["variant", "median ms", "img/s", "speedup", "max abs diff vs eager"])
        for r in e2e:
            writer.writerow([r.name, f"{r.median_s * 1e3:.2f}", f"{r.images_per_s:.1f}", f"{r.speedup:.3f}", f"{r.max_abs_diff:.2e}"])

    md = ["# resnet_fused timings", "", *header, "",
          f"## ResNet-50 conv shapes: batch {args.batch}, {args.size}x{args.size}, {args.dtype}, channels_last, eval", "",
          "Times are medians of interleaved rounds (CUDA events over back-to-back calls). `speedup` = eager conv+bn+act time / fused time.", ""]
    md.append("| " + " | ".join(rows[0]) + " |")
    md.append("|" + "---|" * len(rows[0]))
    md += ["| " + " | ".join(str(v) for v in r.values()) + " |" for r in rows]
    md += ["", "Sum over one forward pass (each shape times its count), µs: " + ", ".join(f"{k} {v:.0f}" for k, v in totals.items()), ""]
    md += [f"## ResNet-50 end to end: batch {args.e2e_batch}, {args.size}x{args.size}, {args.dtype} (BatchNorm in fp32), "
           "channels_last, eval", "",
           "| variant | median ms | img/s | speedup | max abs diff vs eager |", "|---|---|---|---|---|"]
    md += [f"| {r.name} | {r.median_s * 1e3:.2f} | {r.images_per_s:.1f} | {r.speedup:.3f} | {r.max_abs_diff:.2e} |" for r in e2e]
    (args.out / "timings.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
