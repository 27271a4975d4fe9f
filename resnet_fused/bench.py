"""Throughput measurement: the fused model against eager unfused PyTorch, side by side.

Variants are timed in interleaved rounds (A, B, A, B, ...) so that drift in clock speed or
background load hits all of them alike; the figure reported is the median round.

``mode="infer"`` times a forward pass in eval mode under ``inference_mode``; ``mode="train"``
times a whole training step in train mode: forward, cross-entropy, backward, SGD-with-momentum
step (fp16/bf16 train with fp32 parameters under autocast, as AMP does, without a grad scaler).
Memory per variant: on a GPU the peak allocated during one step; on a CPU (no allocator
statistics) the bytes autograd keeps for backward, counted once per storage with
``saved_tensors_hooks`` — the activation memory that fusion changes.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
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
    memory_mb: float  # train: GPU peak allocated / CPU saved activations; infer: GPU peak, CPU 0


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
    mode: str = "infer",
) -> list[Result]:
    """Eager unfused ``model`` vs ``convert(model, backend=b)`` for each fused backend here,
    and, with ``with_compile``, vs ``torch.compile(model)`` (Inductor's own fusions)."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    train = mode == "train"
    # AMP keeps fp32 parameters and autocasts; inference runs the model in the dtype itself.
    param_dtype = torch.float32 if train else dtype
    model = model.train(train).to(device=device, dtype=param_dtype, memory_format=memory_format)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g).to(device, param_dtype).contiguous(memory_format=memory_format)
    models = {"eager (unfused)": model}
    if with_compile:
        models["torch.compile (unfused)"] = torch.compile(copy.deepcopy(model) if train else model)
    models.update({f"fused: {b}": convert(model, backend=b) for b in fused_backends_for(device)})
    if train:
        target = torch.randint(0, 1000, (batch,), generator=g).to(device)
        steps = {name: _train_step(m, x, target, device, dtype) for name, m in models.items()}
        outputs = {name: step() for name, step in steps.items()}  # every copy takes the same first step
        memory = {name: _step_memory_mb(step, device) for name, step in steps.items()}
        samples = time_rounds(steps, device, warmup, rounds)
    else:
        with torch.inference_mode():
            outputs = {name: m(x) for name, m in models.items()}
            memory = {name: _step_memory_mb(lambda m=m: m(x), device, saved=False) for name, m in models.items()}
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
            memory_mb=memory[name],
        )
        for name, times in samples.items()
    ]


def _train_step(model: nn.Module, x, target, device: torch.device, dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    """One training step of ``model`` (its own optimizer); returns the step's logits."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    amp = dtype != torch.float32

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=amp):
            logits = model(x)
            loss = F.cross_entropy(logits, target)
        loss.backward()
        optimizer.step()
        return logits.detach()

    return step


def _step_memory_mb(step: Callable[[], object], device: torch.device, saved: bool = True) -> float:
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    if not saved:
        return 0.0
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(storages.values()) / 2**20
