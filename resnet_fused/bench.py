"""Throughput measurement: the fused model against eager unfused PyTorch, side by side.

Variants are timed in interleaved rounds (A, B, A, B, ...) so that drift in clock speed or
background load hits all of them alike; the figure reported is the median round.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from . import available_backends, convert

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Result:
    name: str
    median_s: float
    images_per_s: float
    speedup: float  # vs the first variant (eager unfused)
    max_abs_diff: float  # vs the first variant's output


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_rounds(
    variants: dict[str, Callable[[], object]], device: torch.device, warmup: int, rounds: int
) -> dict[str, list[float]]:
    """Seconds per call of each variant, ``rounds`` interleaved samples each."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            samples[name].append(time.perf_counter() - start)
    return samples


def fused_backends_for(device: torch.device) -> list[str]:
    """Fused backends that run on ``device`` (interpreted Triton is a test tool, not a path)."""
    usable = {"cuda": ("triton", "cuda"), "cpu": ("cpu",)}.get(device.type, ())
    return [b for b in available_backends() if b in usable]


def bench_model(
    model: nn.Module,
    batch: int,
    size: int,
    device: torch.device,
    dtype: torch.dtype,
    channels_last: bool,
    warmup: int,
    rounds: int,
    with_compile: bool = False,
) -> list[Result]:
    """Eager unfused ``model`` vs ``convert(model, backend=b)`` for each fused backend here,
    and, with ``with_compile``, vs ``torch.compile(model)`` (Inductor's own fusions)."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.eval().to(device=device, dtype=dtype, memory_format=memory_format)
    x = torch.randn(batch, 3, size, size, device=device, dtype=dtype).contiguous(memory_format=memory_format)
    models = {"eager (unfused)": model}
    if with_compile:
        models["torch.compile (unfused)"] = torch.compile(model)
    models.update({f"fused: {b}": convert(model, backend=b) for b in fused_backends_for(device)})
    with torch.inference_mode():
        outputs = {name: m(x) for name, m in models.items()}
        samples = time_rounds({name: (lambda m=m: m(x)) for name, m in models.items()}, device, warmup, rounds)
    baseline_name = next(iter(models))
    baseline = statistics.median(samples[baseline_name])
    return [
        Result(
            name=name,
            median_s=statistics.median(times),
            images_per_s=batch / statistics.median(times),
            speedup=baseline / statistics.median(times),
            max_abs_diff=(outputs[name].float() - outputs[baseline_name].float()).abs().max().item(),
        )
        for name, times in samples.items()
    ]
