"""Helpers of benchmarks/gpu_check.sh and benchmarks/build_gpu_extension.sh (standard library only,
so they run before anything is built and in the CPU dry run).

    python benchmarks/gpu_check_lib.py versions                 key=value lines: Python, torch, GPU, packages
    python benchmarks/gpu_check_lib.py source-hash              hash of what the extension is built from
    python benchmarks/gpu_check_lib.py prebuilt DIR VERSIONS    is DIR's prebuilt _C for this Python, torch and source?
    python benchmarks/gpu_check_lib.py junit XML FAILURES       counts line; every failing test's output to FAILURES
    python benchmarks/gpu_check_lib.py verify-csv OUT CSV...    the per-process CSVs as one; counts line
    python benchmarks/gpu_check_lib.py summary WORK OUT_MD      the summary table (steps, tests, verify, timings)
"""

from __future__ import annotations

import csv
import hashlib
import importlib.metadata
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("torch", "triton", "torchvision", "timm", "numpy", "pytest", "pytest-xdist", "pytest-timeout",
            "nvidia-cutlass", "setuptools", "ninja", "pybind11")


def versions() -> int:
    """Versions as key=value lines. Imports torch (CUDA build, device); the rest from metadata."""
    print(f"python={sys.version.split()[0]}")
    print(f"python_tag=cp{sys.version_info.major}{sys.version_info.minor}")
    try:
        import torch

        print(f"torch={torch.__version__}")
        print(f"torch_cuda={torch.version.cuda}")
        print(f"cuda_available={torch.cuda.is_available()}")
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            print(f"gpu={props.name}")
            print(f"capability={props.major}.{props.minor}")
            print(f"sm_count={props.multi_processor_count}")
            print(f"gpu_memory_gib={props.total_memory / 2**30:.1f}")
    except Exception as error:  # noqa: BLE001  (reported, not fatal: the later steps say the rest)
        print(f"torch=unavailable ({type(error).__name__}: {error})")
    for name in PACKAGES[1:]:
        try:
            print(f"{name}={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            print(f"{name}=missing")
    return 0


def source_hash(root: Path = ROOT) -> str:
    """sha256 (16 hex digits) over setup.py and every file under csrc/: their relative paths and
    contents. A prebuilt extension is used only where this matches the tree it runs in."""
    digest = hashlib.sha256()
    files = [root / "setup.py", *(p for p in (root / "csrc").rglob("*") if p.is_file())]
    for path in sorted(files, key=lambda p: p.relative_to(root).as_posix()):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def read_env(path: Path) -> dict[str, str]:
    pairs = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            key, sep, value = line.partition("=")
            if sep:
                pairs[key.strip()] = value.strip()
    return pairs


def prebuilt(folder: Path, versions_file: Path) -> int:
    """Exit 0 and print the .so's path when ``folder`` holds an extension built for this Python,
    this torch and this source tree; else exit 1 with the reason."""
    info = read_env(folder / "BUILD_INFO")
    if not info:
        print(f"no prebuilt extension ({folder}/BUILD_INFO missing)")
        return 1
    here = read_env(versions_file)
    so = folder / info.get("so", "")
    wanted = {"python_tag": here.get("python_tag"), "torch": here.get("torch"), "source_hash": source_hash()}
    for key, value in wanted.items():
        if info.get(key) != value:
            print(f"prebuilt extension does not match: {key} {info.get(key)} (built) vs {value} (here)")
            return 1
    if not so.is_file() or not info.get("so"):
        print(f"prebuilt extension missing: {so}")
        return 1
    print(so)
    return 0


def junit(xml_path: Path, failures_path: Path) -> int:
    """A counts line for the summary; each failed or erroring test's message, traceback and
    captured output to ``failures_path``."""
    if not xml_path.is_file():
        print("no junit report (the run ended before pytest wrote it)")
        return 0
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError as error:
        print(f"unreadable junit report: {error}")
        return 0
    counts = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    blocks = []
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed" if child.tag == "failure" else "error"
                text = [f"===== {outcome.upper()}: {name} ({case.get('time', '?')} s)", child.get("message", ""),
                        child.text or ""]
                for stream in ("system-out", "system-err"):
                    for captured in case.iter(stream):
                        if captured.text and captured.text.strip():
                            text += [f"----- {stream}", captured.text]
                blocks.append("\n".join(text))
            elif child.tag == "skipped" and outcome == "passed":
                outcome = "skipped"
        counts[outcome] += 1
    failures_path.write_text("\n\n".join(blocks) + "\n" if blocks else "no failing tests\n")
    print(", ".join(f"{v} {k}" for k, v in counts.items()))
    return 0


def verify_csv(out: Path, parts: list[Path]) -> int:
    rows, fields = [], []
    for part in parts:
        if part.is_file() and part.stat().st_size:
            with open(part, newline="") as f:
                reader = csv.DictReader(f)
                fields = fields or list(reader.fieldnames or [])
                rows += list(reader)
    if not rows:
        print("no verify results")
        return 0
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    skipped = sum(r.get("skipped") == "True" for r in rows)
    failed = [r for r in rows if r.get("ok") != "True"]
    print(f"{len(rows) - skipped - len(failed)} PASS, {len(failed)} FAIL, {skipped} SKIP"
          + "".join(f"; FAIL {r['backend']} {r['dtype']} {r['mode']} {r['unit']}" for r in failed[:5]))
    return 0


def summary(work: Path, out_md: Path) -> int:
    """summary.md: where and what ran, one row per step (status, time, budget, what it found),
    the failing tests and the timing tables."""
    env = read_env(work / "versions.env")
    meta = read_env(work / "meta.env")
    lines = [f"# gpu_check: {meta.get('mode', 'run')}", "",
             f"- commit: {meta.get('commit', 'unknown')}; source hash (csrc, setup.py): {meta.get('source_hash', '?')}",
             f"- date: {meta.get('date', '?')}; host: {meta.get('host', '?')}",
             f"- GPU: {env.get('gpu', 'none visible')} (capability {env.get('capability', '-')}, "
             f"{env.get('sm_count', '-')} SMs, {env.get('gpu_memory_gib', '-')} GiB); driver {meta.get('driver', '?')}",
             f"- Python {env.get('python', '?')}, torch {env.get('torch', '?')} (CUDA {env.get('torch_cuda', '?')}), "
             f"triton {env.get('triton', '?')}, torchvision {env.get('torchvision', '?')}, "
             f"nvcc {meta.get('nvcc', '?')}, pytest-xdist {env.get('pytest-xdist', '?')}",
             f"- extension: {meta.get('extension', 'not reached')}",
             "", "| step | status | seconds | budget s | result |", "|---|---|---|---|---|"]
    steps = work / "steps.tsv"
    if steps.is_file():
        for line in steps.read_text().splitlines():
            cells = (line.split("\t") + [""] * 5)[:5]
            lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    failures = work / "failures.txt"
    if failures.is_file() and not failures.read_text().startswith("no failing"):
        names = [line.split(": ", 1)[1] for line in failures.read_text().splitlines() if line.startswith("===== ")]
        lines += ["", f"## Failing tests ({len(names)}; output in failures.txt in the archive)", ""]
        lines += [f"- {name}" for name in names[:60]]
    timings = work / "timings.md"
    if timings.is_file():
        lines += ["", "## Timings (timings.md)", "", timings.read_text().strip().removeprefix("# resnet_fused timings").strip()]
    train = work / "train_resnet50.csv"
    if train.is_file():
        lines += ["", "## Training step, ResNet-50 (train_resnet50.csv)", "", *_markdown_table(train)]
    out_md.write_text("\n".join(lines) + "\n")
    return 0


def _markdown_table(path: Path, columns: int = 8) -> list[str]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return []
    rows = [row[:columns] for row in rows]
    return ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0]), *("| " + " | ".join(r) + " |" for r in rows[1:])]


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    command, args = argv[0], argv[1:]
    if command == "versions":
        return versions()
    if command == "source-hash":
        print(source_hash(Path(args[0]) if args else ROOT))
        return 0
    if command == "prebuilt":
        return prebuilt(Path(args[0]), Path(args[1]))
    if command == "junit":
        return junit(Path(args[0]), Path(args[1]))
    if command == "verify-csv":
        return verify_csv(Path(args[0]), [Path(a) for a in args[1:]])
    if command == "summary":
        return summary(Path(args[0]), Path(args[1]))
    print(f"unknown command {command!r}\n{__doc__}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
