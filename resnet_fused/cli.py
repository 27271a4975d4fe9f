"""The ``resnet-fused`` console script: ``info``, ``bench``, ``verify`` and ``zoo``.

``bench`` compares, on this machine's device and in one process, the unfused model (eager NCHW
and channels_last), torch.compile, each fused backend and (CPU inference) the frozen model; see
``resnet_fused/bench/models.py`` for what each variant is and how it is timed. A request that cannot
run here (unknown model, a backend or dtype the device lacks, batch < 1) gets a one-line error
and exit status 2. ``verify`` checks every fused backend here against the reference over the
ResNet-50 conv units (bench/verify.py) and exits with status 1 on any failure. ``zoo`` converts
torchvision and timm architectures and checks each against the original (bench/zoo.py), one CSV
row per model, and exits with status 1 if any disagrees.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import json
import os
import platform
import sys
from pathlib import Path

import torch

CPU_DEFAULTS = {"model": "resnet18", "batch": 8, "size": 224, "dtype": "fp32", "rounds": 10, "warmup": 2}
GPU_DEFAULTS = {"model": "resnet50", "batch": 256, "size": 224, "dtype": "fp16", "rounds": 30, "warmup": 3}


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr and exit status 2 (no usage dump)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


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


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def bench(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from .bench.models import BenchError, run_bench

    console = Console()
    if not console.is_terminal:  # files and pipes: no cropping at 80 columns
        console = Console(width=200)
    err = Console(stderr=True)
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        return _fail(f"unknown --device {args.device!r}; use cpu or cuda")
    defaults = GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS
    opts = {k: defaults[k] if getattr(args, k) is None else getattr(args, k) for k in defaults}
    with_compile = (args.mode == "infer") if args.compile is None else args.compile
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            return _fail("--plot needs matplotlib: pip install matplotlib (or pip install 'resnet_fused[plot]')")
    for flag, path in (("--csv", args.csv), ("--json", args.json), ("--plot", args.plot)):
        if path and not Path(path).resolve().parent.is_dir():
            return _fail(f"{flag} {path}: the folder {Path(path).resolve().parent} does not exist")
    backends = [b for part in args.backend or [] for b in part.split(",") if b] or None
    progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TimeElapsedColumn(), console=err, transient=True)
    with progress:
        task = progress.add_task("starting", total=1)

        def update(done: int, total: int, what: str) -> None:
            progress.update(task, completed=done, total=max(total, 1), description=what)

        try:
            report = run_bench(
                opts["model"], device=device, dtype_name=opts["dtype"], mode=args.mode, batch=opts["batch"],
                size=opts["size"], channels_last=args.channels_last, warmup=opts["warmup"], rounds=opts["rounds"],
                with_compile=with_compile, backends=backends, per_layer=args.per_layer, progress=update)
        except BenchError as error:
            progress.stop()
            return _fail(str(error))
    _print_report(console, report)
    if args.json:
        Path(args.json).write_text(json.dumps(report_dict(report), indent=1) + "\n")
    if args.csv:
        write_csv(report, Path(args.csv))
    if args.plot:
        write_plot(report, Path(args.plot))
        console.print(f"plot written to {args.plot}")
    return 0


def _fail(message: str, command: str = "bench") -> int:
    print(f"resnet-fused {command}: error: {message}", file=sys.stderr)
    return 2


def _print_report(console, report) -> None:
    from rich.table import Table

    with_compile = any(r.speedup_vs_compile is not None for r in report.results)
    s, peaks = report.setting, report.peaks
    console.print(
        f"{s['model']} {'training step' if s['mode'] == 'train' else 'eval'}, batch {s['batch']}, "
        f"{s['size']}x{s['size']}, {s['dtype']}, fused/compiled variants {'channels_last' if s['channels_last'] else 'NCHW'}, "
        f"on {s['device']}, torch {s['torch']}; median of {s['rounds']} interleaved rounds"
    )
    if report.macs_per_image is not None and peaks is not None:
        console.print(
            f"{report.macs_per_image / 1e9:.2f} GMAC per image (Conv2d + Linear); measured peaks: "
            f"{peaks.flops / 1e12:.3f} TFLOP/s ({peaks.matmul_n}^3 matmul, {s['dtype']}), "
            f"{peaks.bytes / 1e9:.1f} GB/s ({peaks.copy_mb:.0f} MiB copy, read + write)"
        )
    gpu = s["device_type"] == "cuda"
    memory = "peak MiB" if gpu else ("saved MiB" if s["mode"] == "train" else None)
    table = Table()
    columns = ["variant", "median ms", "img/s", "± %", "vs eager", *(["vs compile"] if with_compile else []),
               "TFLOP/s", "% peak", "max |diff|", *([memory] if memory else [])]
    for column in columns:
        table.add_column(column, justify="left" if column == "variant" else "right")
    for r in report.results:
        table.add_row(
            r.name, f"{r.median_s * 1e3:.2f}", f"{r.images_per_s:.1f}", f"{100 * r.spread:.1f}", f"{r.speedup:.2f}x",
            *([_fmt(r.speedup_vs_compile, ".2f") + ("x" if r.speedup_vs_compile is not None else "")] if with_compile else []),
            _fmt(r.tflops, ".3f"), _fmt(r.peak_pct, ".1f"), f"{r.max_abs_diff:.1e}",
            *([f"{r.memory_mb:.0f}"] if memory else []),
        )
    console.print(table)
    if report.layers:
        console.print(_layer_table(report.layers))
    for note in report.notes:
        console.print(f"note: {note}")


def _layer_table(layers):
    from rich.table import Table

    variants = list(layers[0].times)
    table = Table(title="per layer: ms per call; floor = max(FLOP / peak FLOP/s, bytes / peak bytes/s)")
    for column in ("layer", "n", "input -> weight", "GFLOP", "MB", "floor", *variants, "fused/floor", "auto runs"):
        table.add_column(column, justify="left" if column in ("layer", "input -> weight") else "right")
    for layer in layers:
        fused = next((t for name, t in layer.times.items() if name.startswith("fused")), None)
        shape = (f"{'x'.join(map(str, layer.input))} -> {'x'.join(map(str, layer.weight))} s{layer.stride[0]}"
                 f"{' +res' if layer.residual else ''}{'' if layer.relu else ' no-relu'}")
        table.add_row(
            layer.name, str(layer.count), shape, f"{layer.flops / 1e9:.2f}", f"{layer.min_bytes / 1e6:.1f}",
            f"{layer.floor_s * 1e3:.3f}", *(f"{layer.times[v] * 1e3:.3f}" for v in variants),
            _fmt(None if fused is None else fused / layer.floor_s, ".1f"),
            "unfused" if layer.auto == "reference" else str(layer.auto),
        )
    return table


def report_dict(report) -> dict:
    return {
        "setting": report.setting,
        "peaks": None if report.peaks is None else dataclasses.asdict(report.peaks),
        "macs_per_image": report.macs_per_image,
        "variants": [dataclasses.asdict(r) for r in report.results],
        "layers": [dataclasses.asdict(layer) for layer in report.layers],
        "notes": report.notes,
    }


def _layer_rows(report) -> list[dict]:
    rows = []
    for layer in report.layers:
        row = dataclasses.asdict(layer)
        times = row.pop("times")
        for key in ("input", "weight", "stride", "padding", "dilation"):
            row[key] = "x".join(map(str, row[key]))
        row.update({f"{name} ms": round(t * 1e3, 4) for name, t in times.items()})
        row["floor ms"] = round(row.pop("floor_s") * 1e3, 4)
        rows.append(row)
    return rows


def write_csv(report, path: Path) -> None:
    """One row per variant (with the setting and peaks); with per-layer results, also
    ``<stem>-layers.csv`` beside it, one row per distinct conv unit."""
    peaks = {} if report.peaks is None else {"peak_tflops": report.peaks.flops / 1e12, "peak_gbps": report.peaks.bytes / 1e9}
    rows = [{**report.setting, **peaks, "gmac_per_image": (report.macs_per_image or 0) / 1e9, **dataclasses.asdict(r)}
            for r in report.results]
    _write_rows(path, rows)
    if report.layers:
        _write_rows(path.with_name(f"{path.stem}-layers{path.suffix or '.csv'}"),
                    [{**report.setting, **row} for row in _layer_rows(report)])


def _write_rows(path: Path, rows: list[dict]) -> None:
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def write_plot(report, path: Path) -> None:
    """Speedup vs eager per variant; with per-layer results, each layer's time against its floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if report.layers else 1
    fig, axes = plt.subplots(panels, 1, figsize=(10, 4 + 4 * (panels - 1)), squeeze=False)
    ax = axes[0][0]
    names = [r.name for r in report.results]
    ax.barh(names, [r.speedup for r in report.results], xerr=[r.speedup * r.spread for r in report.results], color="tab:blue")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.invert_yaxis()
    s = report.setting
    ax.set_xlabel("speedup vs eager (higher is better)")
    ax.set_title(f"{s['model']} {s['mode']}, batch {s['batch']}, {s['size']}px, {s['dtype']}, {s['device']}")
    if report.layers:
        ax = axes[1][0]
        variants = list(report.layers[0].times)
        labels = [f"{layer.name} ({'x'.join(map(str, layer.input[1:]))})" for layer in report.layers]
        width = 0.8 / (len(variants) + 1)
        for i, variant in enumerate(["floor", *variants]):
            values = [layer.floor_s * 1e3 if variant == "floor" else layer.times[variant] * 1e3 for layer in report.layers]
            ax.bar([j + i * width for j in range(len(labels))], values, width, label=variant,
                   color="black" if variant == "floor" else None)
        ax.set_xticks([j + 0.4 for j in range(len(labels))], labels, rotation=60, ha="right", fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("ms per call (log)")
        ax.legend(fontsize=7, ncol=len(variants) + 1, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def verify(args: argparse.Namespace) -> int:
    if args.interpret:
        # Before anything imports Triton: its interpreter is chosen at import.
        os.environ["TRITON_INTERPRET"] = "1"
    from .bench.verify import DTYPES, run_verify

    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        return _fail(f"unknown --device {args.device!r}; use cpu or cuda (cuda:N)", "verify")
    if device.type not in ("cpu", "cuda"):
        return _fail(f"--device {device.type} is not supported; use cpu or cuda (cuda:N)", "verify")
    gpu = device.type == "cuda"
    if gpu and not torch.cuda.is_available():
        return _fail("--device cuda, but PyTorch sees no CUDA device here", "verify")
    if gpu and (device.index or 0) >= torch.cuda.device_count():
        return _fail(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)", "verify")
    dtypes = args.dtype.split(",") if args.dtype else (["fp16", "bf16", "fp32"] if gpu else ["fp32", "bf16"])
    if unknown := [d for d in dtypes if d not in DTYPES]:
        return _fail(f"unknown dtype {unknown[0]!r}; choose from {', '.join(DTYPES)}", "verify")
    if args.reps < 1:
        return _fail("--reps must be >= 1", "verify")
    if args.batch is not None and args.batch < 1:
        return _fail("--batch must be >= 1", "verify")
    if args.size is not None and args.size < 1:
        return _fail("--size must be >= 1", "verify")
    names = [n for item in args.backend for n in item.split(",")] if args.backend else None
    batch, size = args.batch or (8 if gpu else 2), args.size or (224 if gpu else 64)

    # The CSV gets each check as it comes, so a run cut short (a time limit) keeps what it checked.
    try:
        csv_file = open(args.csv, "w", newline="") if args.csv else None
    except OSError as error:
        return _fail(f"cannot write --csv {args.csv}: {error.strerror}", "verify")
    writer = None

    def show(check):
        nonlocal writer
        verdict = "SKIP" if check.skipped else "PASS" if check.ok else "FAIL"
        print(f"{verdict}  {check.backend:<7} {check.dtype:<5} {check.mode:<5} {check.unit:<40} "
              f"ratio {check.ratio:6.2f}  fused {check.fused_ms:8.3f} ms  unfused {check.unfused_ms:8.3f} ms"
              + (f"  {check.detail}" if not check.ok or check.skipped else ""), flush=True)
        if csv_file is not None:
            row = dataclasses.asdict(check)
            if writer is None:
                writer = csv.DictWriter(csv_file, fieldnames=list(row))
                writer.writeheader()
            writer.writerow(row)
            csv_file.flush()

    print(f"resnet-fused verify: {device}, batch {batch}, {size}x{size}, dtypes {', '.join(dtypes)} "
          f"(ratio: fused error / allowed error, pass <= 1)")
    try:
        checks = run_verify(device, dtypes, names, batch, size, reps=args.reps, progress=show)
    except ValueError as error:
        return _fail(str(error), "verify")
    finally:
        if csv_file is not None:
            csv_file.close()
    failed = [c for c in checks if not c.ok]
    skipped = [c for c in checks if c.ok and c.skipped]
    print(f"{len(checks) - len(failed) - len(skipped)} of {len(checks)} checks passed"
          + (f"; {len(skipped)} skipped" if skipped else "") + (f"; {len(failed)} FAILED" if failed else ""))
    if len(skipped) == len(checks):
        return _fail(f"no fused backend runs on {device} here" if not checks else "every check was skipped", "verify")
    return 1 if failed else 0


ZOO_FIELDS = ["model", "equal_eval", "eval_ratio", "eval_note", "rel_error", "size", "equal_second_size", "rel_error_second",
              "state_dict_unchanged", "equal_train", "train_ratio", "train_note", "error", "bn_total", "bn_unfused",
              "fused_fraction", "reasons", "seconds", "cpu_seconds"]


def zoo(args: argparse.Namespace) -> int:
    from .bench import zoo as zoo_check

    if args.threads < 0:
        return _fail("--threads must be >= 0", "zoo")
    if args.threads:
        # Small ops on a few cores: OpenMP threads waiting for each other can cost 10x.
        torch.set_num_threads(args.threads)
    names = args.names or (zoo_check.full_sweep() if args.full else zoo_check.ZOO_SUBSET)
    path = Path(args.csv or f"zoo-{datetime.date.today().isoformat()}.csv")
    done = set()
    if args.resume and path.exists():
        with open(path, newline="") as f:
            done = {row["model"] for row in csv.DictReader(f)}
    try:
        # Rows are appended as they come: the full sweep takes hours, and --resume goes on from here.
        csv_file = open(path, "a" if done else "w", newline="")
    except OSError as error:
        return _fail(f"cannot write --csv {path}: {error.strerror}", "zoo")
    writer = csv.DictWriter(csv_file, fieldnames=ZOO_FIELDS)
    if not done:
        writer.writeheader()
    todo = [n for n in names if n not in done]
    print(f"resnet-fused zoo: {len(todo)} models on the {args.backend} backend"
          + (f" ({len(done)} already in {path})" if done else "") + f"; rows in {path}", flush=True)
    disagree = 0
    with csv_file:
        for i, name in enumerate(todo, 1):
            row = zoo_check.check_model(name, backend=args.backend, train=not args.no_train,
                                        train_backend=args.train_backend)
            found = zoo_check.problems(row)
            disagree += bool(found)
            writer.writerow({**row, "reasons": json.dumps(row["reasons"])})
            csv_file.flush()
            fused = "-" if row["fused_fraction"] is None else f"{row['fused_fraction']:.0%}"
            print(f"[{i}/{len(todo)}] {'FAIL' if found else 'ok  '} {name:<50} fused {fused:>4}  "
                  f"{row['cpu_seconds']:7.1f} cpu-s" + (f"  {'; '.join(found)}" if found else ""), flush=True)
    print(f"{len(todo) - disagree} of {len(todo)} models agree with their conversion")
    return 1 if disagree else 0


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="resnet-fused", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    commands.add_parser("info", help="versions, extension build, backends and GPU")
    b = commands.add_parser(
        "bench", help="eager vs torch.compile vs fused vs frozen throughput on this machine's device",
        description="Time the variants of one model side by side (interleaved rounds, medians). Defaults: on a GPU "
                    "resnet50, batch 256, 224px, fp16; on a CPU resnet18, batch 8, 224px, fp32 (about 1-2 minutes "
                    "on 2 cores, compile included).")
    b.add_argument("--model", help="torchvision resnet*/resnext*/wide_resnet* name, paper:<name> for resnet_fused.models "
                                   "(e.g. paper:resnet56), or a timm name when timm is installed "
                                   "(default resnet50 on GPU, resnet18 on CPU)")
    b.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    b.add_argument("--mode", choices=["infer", "train"], default="infer",
                   help="infer: eval forward; train: forward + backward + SGD step (fp16/bf16 under autocast)")
    b.add_argument("--batch", type=int, help="default 256 on GPU, 8 on CPU")
    b.add_argument("--size", type=int, help="image side (default 224)")
    b.add_argument("--dtype", help="fp32, tf32 (GPU), fp16 or bf16 (default fp16 on GPU, fp32 on CPU)")
    b.add_argument("--channels-last", dest="channels_last", action=argparse.BooleanOptionalAction, default=True,
                   help="layout of the compiled and fused variants (default on; eager runs both layouts)")
    b.add_argument("--backend", action="append", metavar="NAME",
                   help="fused backend(s) to time, e.g. --backend cpu or --backend triton,cuda (default: all here)")
    b.add_argument("--compile", dest="compile", action=argparse.BooleanOptionalAction, default=None,
                   help="time torch.compile of the unfused model (CPU: Inductor freezing for inference; GPU: "
                        "max-autotune). Default: on for --mode infer, off for --mode train (compiling backward "
                        "takes minutes)")
    b.add_argument("--per-layer", action="store_true",
                   help="also time every distinct fused conv unit: fused op vs unfused sequence vs conv alone vs the floor")
    b.add_argument("--warmup", type=int, help="untimed calls per variant (default 3 GPU, 2 CPU)")
    b.add_argument("--rounds", type=int, help="timed rounds per variant (default 30 GPU, 10 CPU)")
    b.add_argument("--csv", metavar="PATH", help="also write the results as CSV (per-layer rows: PATH's stem + '-layers.csv')")
    b.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    b.add_argument("--plot", metavar="PNG", help="also draw speedups (and per-layer times vs floor); needs matplotlib")
    v = commands.add_parser(
        "verify", help="every fused backend here against the reference over ResNet-50's conv units (exit 1 on failure)",
        description="For each fused backend, dtype and distinct ResNet-50 conv unit: the eval op and the training unit "
                    "(forward + backward) against float64, by the rule fused error <= 2x unfused error; with the "
                    "fused and unfused times. Defaults: GPU batch 8, 224px, fp16/bf16/fp32; CPU batch 2, 64px, fp32/bf16.")
    v.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    v.add_argument("--backend", action="append", metavar="NAME", help="backend(s) to check (default: the fused ones here)")
    v.add_argument("--dtype", help="comma-separated: fp32, fp16, bf16")
    v.add_argument("--batch", type=int)
    v.add_argument("--size", type=int, help="image side")
    v.add_argument("--reps", type=int, default=3, help="timed calls per check (median; default 3)")
    v.add_argument("--interpret", action="store_true", help="run Triton under its interpreter (CPU; with --backend triton)")
    v.add_argument("--csv", metavar="PATH", help="also write every check as CSV")
    z = commands.add_parser(
        "zoo", help="convert torchvision/timm architectures and check each against the original (exit 1 on any difference)",
        description="For each model (random weights and BatchNorm statistics): eval outputs at two sizes, state_dict, "
                    "exceptions, one training step against float64, and how many BatchNorm calls still run unfused "
                    "and why. Default: the 25-model subset CI runs; --full: one architecture per family (hours).")
    z.add_argument("names", nargs="*", help="torchvision:<builder> or timm:<architecture> (default: the CI subset)")
    z.add_argument("--full", action="store_true", help="every torchvision/timm family with a BatchNorm")
    z.add_argument("--backend", default="cpu", help="fused backend (default cpu)")
    z.add_argument("--no-train", dest="no_train", action="store_true", help="skip the training step")
    z.add_argument("--train-backend", dest="train_backend",
                   help="backend of the training step (default: --backend; 'reference' judges the rewrite alone)")
    z.add_argument("--threads", type=int, default=1, help="torch threads (default 1; 0: torch's default)")
    z.add_argument("--csv", metavar="PATH", help="the table (default zoo-<date>.csv)")
    z.add_argument("--resume", action="store_true", help="skip the models already in --csv and append")
    args = parser.parse_args(argv)
    if args.command == "info":
        return info()
    if args.command == "verify":
        return verify(args)
    if args.command == "zoo":
        return zoo(args)
    if args.rounds is not None and args.rounds < 1:
        return _fail("--rounds must be >= 1")
    if args.warmup is not None and args.warmup < 0:
        return _fail("--warmup must be >= 0")
    return bench(args)


if __name__ == "__main__":
    sys.exit(main())
