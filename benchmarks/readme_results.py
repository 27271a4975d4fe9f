"""Turn the committed ``resnet-fused bench`` CSVs under benchmarks/results/ into a markdown block
for the README, printed to stdout:

    python benchmarks/readme_results.py [--results benchmarks/results] [--match resnet50]

Each ``<name>.csv`` written by ``resnet-fused bench --csv`` becomes one table (variant, img/s,
spread, speedups, TFLOP/s, % of the measured peak). Its caption says what ran where: model,
mode, batch, size, dtype, the device string the bench recorded, torch, and, from the sidecar
``<name>.md`` when there is one, its ``- commit:`` / ``- date:`` / ``- machine:`` lines (else the
date in the file name). A ``<name>-layers.csv`` beside it (``--per-layer``) adds one summary
line. CSVs of other formats (e.g. gpu_timings.py's) are listed as skipped, never guessed at.
"""

from __future__ import annotations

import argparse
import csv
import math
import re
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent
REQUIRED = {"name", "images_per_s", "speedup", "model", "mode", "batch", "size", "dtype", "device"}


def sidecar(csv_path: Path) -> dict[str, str]:
    """``- key: value`` lines of ``<stem>.md`` (commit, date, machine, command, ...)."""
    md = csv_path.with_suffix(".md")
    meta = {}
    if md.exists():
        for line in md.read_text().splitlines():
            m = re.match(r"^- (\w[\w ]*?): (.+)$", line.strip())
            if m and m.group(1) not in meta:
                meta[m.group(1)] = m.group(2).strip()
    if "date" not in meta:
        m = re.search(r"\d{4}-\d{2}-\d{2}", csv_path.stem)
        if m:
            meta["date"] = m.group(0)
    return meta


def _num(text: str, spec: str, suffix: str = "") -> str:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return "-"
    return format(value, spec) + suffix if math.isfinite(value) else "-"


def table(csv_path: Path, root: Path) -> list[str] | None:
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not REQUIRED <= set(rows[0]):
        return None
    s, meta = rows[0], sidecar(csv_path)
    mode = "training step" if s["mode"] == "train" else "eval"
    where = meta.get("machine", s["device"])
    facts = [f"device: {s['device']}", f"torch {s.get('torch', '?')}"]
    facts += [f"{key} {meta[key]}" for key in ("commit", "date") if key in meta]
    lines = [
        f"**{s['model']} {mode}, batch {s['batch']}, {s['size']}x{s['size']}, {s['dtype']}** on {where} "
        f"({', '.join(facts)}; median of {s.get('rounds', '?')} interleaved rounds; "
        f"`{csv_path.relative_to(root).as_posix()}`)",
        "",
    ]
    if "command" in meta:
        lines += [f"Command: {meta['command']}", ""]
    has_compile = any(r.get("speedup_vs_compile") for r in rows)
    header = ["variant", "img/s", "± %", "vs eager", *(["vs torch.compile"] if has_compile else []), "TFLOP/s", "% of peak"]
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    for r in rows:
        cells = [r["name"], _num(r["images_per_s"], ".1f"), _num(r.get("spread"), ".1%").rstrip("%"),
                 _num(r["speedup"], ".2f", "x")]
        if has_compile:
            cells.append(_num(r.get("speedup_vs_compile"), ".2f", "x"))
        cells += [_num(r.get("tflops"), ".3f"), _num(r.get("peak_pct"), ".1f")]
        lines.append("| " + " | ".join(cells) + " |")
    peak = rows[0].get("peak_tflops")
    if peak:
        lines += ["", f"Peaks measured in the same run: {_num(peak, '.3f')} TFLOP/s (large {s['dtype']} matmul), "
                      f"{_num(rows[0].get('peak_gbps'), '.1f')} GB/s (large copy)."]
    layers = csv_path.with_name(f"{csv_path.stem}-layers.csv")
    if layers.exists():
        lines += ["", layer_summary(layers)]
    return lines


def layer_summary(path: Path) -> str:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    fused = next((k for k in rows[0] if k.startswith("fused") and k.endswith(" ms")), None)
    if fused is None:
        return f"Per layer ({len(rows)} distinct conv units): no fused backend ran."
    ratios = [float(r["unfused ms"]) / float(r[fused]) for r in rows]
    floors = [float(r[fused]) / float(r["floor ms"]) for r in rows]
    return (f"Per layer ({len(rows)} distinct conv units, `{path.name}`): {fused.removesuffix(' ms')} is "
            f"{statistics.geometric_mean(ratios):.2f}x the unfused sequence (geometric mean, range "
            f"{min(ratios):.2f}-{max(ratios):.2f}x) and {statistics.median(floors):.1f}x its floor (median).")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=HERE / "results")
    parser.add_argument("--match", default="", help="only CSVs whose path contains this")
    args = parser.parse_args(argv)
    root = args.results.resolve().parent.parent if args.results.resolve().parent.name == "benchmarks" else args.results.resolve()
    out = ["<!-- generated by benchmarks/readme_results.py from benchmarks/results/*.csv; edit those, not this -->", ""]
    skipped = []
    for path in sorted(args.results.resolve().rglob("*.csv")):
        if path.stem.endswith("-layers") or args.match not in path.as_posix():
            continue
        lines = table(path, root)
        if lines is None:
            skipped.append(path.relative_to(root).as_posix())
            continue
        out += lines + [""]
    if skipped:
        out.append(f"<!-- not bench CSVs, skipped: {', '.join(skipped)} -->")
    print("\n".join(out).rstrip())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
