"""The ``resnet-fused`` console script: ``info`` and ``bench``."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import platform
import sys
from pathlib import Path

import torch


def info() -> int:
    import triton

    from . import __version__, _extension, available_backends

    rows = [
        ("resnet_fused", __version__),
        ("python", platform.python_version()),
        ("torch", f"{torch.__version__} (CUDA {torch.version.cuda})"),
        ("triton", triton.__version__),
    ]
    if _extension.BUILD_INFO is None:
        rows.append(("extension", f"not loaded: {_extension.LOAD_ERROR}"))
        rows.append(("", "the 'cpu' and 'cuda' backends are unavailable; rebuild with pip install --no-build-isolation -e ."))
    else:
        build = _extension.BUILD_INFO
        cuda = f"with CUDA {build['cuda_version']}, archs {build['cuda_archs']}" if build["with_cuda"] else "CPU only"
        rows.append(("extension", f"built {cuda}, against torch {build['torch_version']}"))
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    rows.append(("GPU", ", ".join(gpus) or "none"))
    rows.append(("backends", ", ".join(available_backends())))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def bench(args: argparse.Namespace) -> int:
    import torchvision.models
    from rich.console import Console
    from rich.table import Table

    from .bench import DTYPES, bench_model

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    batch = args.batch or (64 if gpu else 8)
    dtype = DTYPES[args.dtype or ("fp16" if gpu else "fp32")]
    channels_last = gpu if args.channels_last is None else args.channels_last
    rounds = args.rounds or (50 if gpu else 20)
    torch.manual_seed(0)
    model = getattr(torchvision.models, args.model)()
    console = Console()
    where = torch.cuda.get_device_name(device) if gpu else f"CPU, {torch.get_num_threads()} threads"
    console.print(
        f"{args.model} {'training step' if args.mode == 'train' else 'eval'}, batch {batch}, {args.size}x{args.size}, {args.dtype or str(dtype).removeprefix('torch.')}, "
        f"{'channels_last' if channels_last else 'NCHW'}, on {where}; median of {rounds} interleaved rounds"
    )
    results = bench_model(model, batch, args.size, device, dtype, channels_last, args.warmup, rounds, args.compile,
                          args.mode)
    memory = "peak MiB" if gpu else ("saved MiB" if args.mode == "train" else None)
    table = Table()
    for column in ("variant", "median ms", "img/s", "speedup", "max |diff|", *([memory] if memory else [])):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for r in results:
        table.add_row(r.name, f"{r.median_s * 1e3:.2f}", f"{r.images_per_s:.1f}", f"{r.speedup:.3f}x",
                      f"{r.max_abs_diff:.2e}", *([f"{r.memory_mb:.0f}"] if memory else []))
    console.print(table)
    setting = {"model": args.model, "mode": args.mode, "batch": batch, "size": args.size,
               "dtype": args.dtype or str(dtype).removeprefix("torch."), "channels_last": channels_last, "device": where}
    rows = [{**setting, **dataclasses.asdict(r)} for r in results]
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="resnet-fused", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions, extension build, backends and GPU")
    b = commands.add_parser("bench", help="fused vs eager unfused throughput on this machine's device")
    b.add_argument("--model", default="resnet18", choices=["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"])
    b.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    b.add_argument("--mode", choices=["infer", "train"], default="infer",
                   help="infer: eval forward; train: forward + backward + SGD step (fp16/bf16 under autocast)")
    b.add_argument("--batch", type=int, help="default 64 on GPU, 8 on CPU")
    b.add_argument("--size", type=int, default=224, help="image side (default 224)")
    b.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="default fp16 on GPU, fp32 on CPU")
    b.add_argument("--channels-last", dest="channels_last", action=argparse.BooleanOptionalAction, default=None)
    b.add_argument("--warmup", type=int, default=3)
    b.add_argument("--rounds", type=int, help="timed rounds per variant (default 50 GPU, 20 CPU)")
    b.add_argument("--csv", metavar="PATH", help="also write the results as CSV")
    b.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    b.add_argument("--compile", action="store_true", help="also time torch.compile of the unfused model (compiles first: minutes on a CPU)")
    args = parser.parse_args(argv)
    if args.command == "info":
        return info()
    if args.batch is not None and args.batch < 1 or args.size < 32:
        parser.error("--batch must be >= 1 and --size >= 32")
    return bench(args)


if __name__ == "__main__":
    sys.exit(main())
