"""Timing primitives shared by the model and per-layer benches: interleaved rounds, the
device's measured peaks."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


Progress = Callable[[int, int, str], None]  # (done, total, what is running now)


@dataclass
class Peaks:
    flops: float  # FLOP/s of a large matmul in the run's dtype
    bytes: float  # bytes/s of a large copy (read + write)
    matmul_n: int
    copy_mb: float


def measure_peaks(device: torch.device, dtype: torch.dtype, tf32: bool = False) -> Peaks:
    """The best of several timings of large square matmuls in ``dtype`` (on a CPU two sizes,
    since the fastest depends on the caches and on AMX) and of a large copy. ``run_bench``
    measures before and after the variants and keeps the best of both."""
    gpu = device.type == "cuda"
    best_flops, best_n = 0.0, 0
    for n in (8192,) if gpu else (1024, 2048):
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        with tf32_matmuls(tf32) if gpu else contextlib.nullcontext():
            flops = 2 * n**3 / _best_time(lambda a=a, b=b: torch.mm(a, b), device, 10)
        if flops > best_flops:
            best_flops, best_n = flops, n
    elements = (1 << 28) if gpu else (1 << 25)  # 1 GiB / 128 MiB of fp32
    src = torch.empty(elements, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    copy_s = _best_time(lambda: dst.copy_(src), device, 5)
    return Peaks(flops=best_flops, bytes=2 * src.numel() * src.element_size() / copy_s, matmul_n=best_n,
                 copy_mb=src.numel() * src.element_size() / 2**20)


def _best_time(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    fn()
    synchronize(device)
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


@contextlib.contextmanager
def tf32_matmuls(enabled: bool):
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_rounds(variants: dict[str, Callable[[], object]], device: torch.device, warmup: int, rounds: int,
                progress: Progress | None = None, done: int = 0, total: int = 0) -> dict[str, list[float]]:
    """Seconds per call of each variant, ``rounds`` interleaved samples each."""
    for name, fn in variants.items():
        for _ in range(warmup):
            fn()
        done += warmup
        if progress:
            progress(done, total, f"warm-up: {name}")
    synchronize(device)
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(rounds):
        for name, fn in variants.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            samples[name].append(time.perf_counter() - start)
            done += 1
            if progress:
                progress(done, total, f"round {r + 1}/{rounds}: {name}")
    return samples


def spread(samples: list[float]) -> float:
    """Half the interquartile range relative to the median (0 for fewer than 2 samples)."""
    if len(samples) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return (q3 - q1) / 2 / statistics.median(samples)
