"""Throughput measurement: fused models against what users run today, side by side in one process.

Variants (``bench_model``), all timed in interleaved rounds (A, B, C, A, B, C, ...) so that drift
in clock speed or background load hits them alike; the figure reported is the median round:

- ``eager``: the unfused model in the run's dtype, NCHW (the baseline of every speedup);
- ``eager channels_last``; on a GPU with fp16/bf16 also ``eager autocast`` (fp32 weights);
- ``torch.compile`` of the unfused model: default mode on the CPU (with Inductor's
  ``freezing`` for inference), ``max-autotune`` on a GPU;
- ``fused: <backend>`` for each fused backend that runs on the device (``convert``);
- ``frozen`` (CPU inference, fp32/bf16): ``resnet_fused.freeze``.

``mode="infer"`` times a forward pass in eval mode under ``inference_mode``; ``mode="train"``
times a whole training step in train mode: forward, cross-entropy, backward, SGD-with-momentum
step (fp16/bf16 train with fp32 parameters under autocast, as AMP does, without a grad scaler).
Memory per variant: on a GPU the peak allocated during one step; on a CPU (no allocator
statistics) the bytes autograd keeps for backward in training, counted once per storage with
``saved_tensors_hooks`` -- the activation memory that fusion changes.

Achieved TFLOP/s come from the model's multiply-adds, counted with forward hooks on every
Conv2d and Linear (2 FLOP per MAC; a training step counts 3x the forward). The device's peak
is measured in the same run: a large matmul in the run's dtype (FLOP/s) and a large copy
(bytes/s), so "% of peak" compares like with like on this machine.

``run_bench`` (what ``resnet-fused bench`` calls) adds the MAC count, the peaks and, with
``per_layer``, the per-conv table of ``layers.py``.
"""

from __future__ import annotations

import contextlib
import copy
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .. import backends as backend_registry
from .. import convert
from ..tuning import fused_candidates
from .timing import Peaks, Progress, measure_peaks, spread, synchronize, tf32_matmuls, time_rounds

DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TORCHVISION_FAMILIES = ("resnet", "resnext", "wide_resnet")

class BenchError(ValueError):
    """A request that cannot run here; the CLI prints it as one line and exits with status 2."""


@dataclass
class Result:
    name: str
    median_s: float
    images_per_s: float
    speedup: float  # vs the first variant (eager, NCHW)
    max_abs_diff: float  # vs the first variant's output
    memory_mb: float  # train: GPU peak allocated / CPU saved activations; infer: GPU peak, CPU 0
    spread: float = 0.0  # half the interquartile range of the rounds, relative to the median
    speedup_vs_compile: float | None = None
    tflops: float | None = None  # achieved, from the model's multiply-add count
    peak_pct: float | None = None  # of the measured matmul peak


@dataclass
class Report:
    setting: dict
    peaks: Peaks | None
    results: list[Result]
    macs_per_image: float | None = None
    layers: list = field(default_factory=list)  # layers.LayerResult
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Models, requests


def torchvision_names() -> list[str]:
    import torchvision.models

    names = torchvision.models.list_models(module=torchvision.models)
    return sorted(n for n in names if n.startswith(TORCHVISION_FAMILIES))


def _timm():
    try:
        import timm
    except ImportError:
        return None
    return timm


PAPER = "paper:"


def paper_names() -> list[str]:
    """``paper:<name>`` for the networks of He et al. in ``resnet_fused.models`` (when present)."""
    try:
        from .. import models
    except ImportError:
        return []
    names = [n for n in getattr(models, "__all__", dir(models)) if re.fullmatch(r"(resnet|plain)\d+", n)]
    return sorted(PAPER + n for n in names if callable(getattr(models, n, None)))


def build_model(name: str) -> nn.Module:
    """A randomly initialised model by name: torchvision ResNet/ResNeXt/Wide-ResNet,
    ``paper:<name>`` from ``resnet_fused.models``, else timm (when installed)."""
    if name in torchvision_names():
        import torchvision.models

        return torchvision.models.get_model(name)
    if name.startswith(PAPER) and name in paper_names():
        from .. import models

        return getattr(models, name.removeprefix(PAPER))()
    timm = _timm()
    if timm is not None and not name.startswith(PAPER) and name in timm.list_models():
        return timm.create_model(name, pretrained=False)
    extra = "" if timm is not None else " (timm is not installed, so timm names are unavailable)"
    paper = f", {PAPER}<name> for the paper's networks" if paper_names() else ""
    raise BenchError(f"unknown model {name!r}; choose one of {', '.join(torchvision_names())}{paper} "
                     f"or a timm model name{extra}")


def check_request(device: torch.device, dtype_name: str, mode: str, batch: int, size: int,
                  backends: list[str] | None) -> None:
    """Raise BenchError for what cannot run here: checked before anything is built or timed."""
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda: no CUDA device is visible here")
    if device.type not in ("cpu", "cuda"):
        raise BenchError(f"--device {device.type}: only cpu and cuda are supported")
    if batch < 1:
        raise BenchError(f"--batch must be >= 1, got {batch}")
    if batch < 2 and mode == "train":
        raise BenchError("--mode train needs --batch >= 2 (BatchNorm needs more than one value per channel)")
    if size < 32:
        raise BenchError(f"--size must be >= 32, got {size}")
    if dtype_name not in DTYPES:
        raise BenchError(f"unknown --dtype {dtype_name!r}; choose one of {', '.join(DTYPES)}")
    if device.type == "cpu":
        if dtype_name == "tf32":
            raise BenchError("--dtype tf32 needs a CUDA GPU (TF32 is a tensor-core format); use fp32 on the CPU")
        supported = {"bf16": "_is_mkldnn_bf16_supported", "fp16": "_is_mkldnn_fp16_supported"}.get(dtype_name)
        if supported and not _cpu_supports(supported):
            raise BenchError(f"--dtype {dtype_name}: this CPU has no native {dtype_name} support in oneDNN")
    elif dtype_name == "bf16" and not torch.cuda.is_bf16_supported():
        raise BenchError("--dtype bf16: this GPU does not support bfloat16")
    here = fused_candidates(device)
    for b in backends or []:
        if b not in backend_registry.FUSED_BACKENDS:
            raise BenchError(f"unknown backend {b!r}; fused backends are {', '.join(backend_registry.FUSED_BACKENDS)}")
        if b not in here:
            raise BenchError(f"backend {b!r} is not available for {device.type} here; available: {', '.join(here) or 'none'}")


def _cpu_supports(check: str) -> bool:
    try:
        return bool(getattr(torch.ops.mkldnn, check)())
    except (AttributeError, RuntimeError):
        return False


# ---------------------------------------------------------------------------------------------
# Counting and peaks


def count_macs(model: nn.Module, size: int, device: torch.device | None = None) -> float:
    """Multiply-adds of one image through ``model`` (every Conv2d and Linear), by forward hooks
    on a batch-1 fp32 pass of a copy; other layers (pooling, norms, attention matmuls) are not
    counted."""
    macs = 0

    def conv_hook(module, args, out):
        nonlocal macs
        k = module.weight.shape[1] * module.weight.shape[2] * module.weight.shape[3]
        macs += out.numel() * k

    def linear_hook(module, args, out):
        nonlocal macs
        macs += out.numel() * module.in_features

    counted = copy.deepcopy(model).eval().float()
    if device is not None:
        counted = counted.to(device)
    for m in counted.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(conv_hook)
        elif isinstance(m, nn.Linear):
            m.register_forward_hook(linear_hook)
    with torch.inference_mode():
        counted(torch.zeros(1, 3, size, size, device=device))
    return float(macs)


@contextlib.contextmanager
def _inductor_freezing(enabled: bool):
    if not enabled:
        yield
        return
    import torch._inductor.config as inductor_config

    with inductor_config.patch(freezing=True):
        yield


# ---------------------------------------------------------------------------------------------
# The end-to-end comparison


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
    *,
    backends: list[str] | None = None,
    frozen: bool = True,
    tf32: bool = False,
    bn_dtype: torch.dtype | None = None,
    flops_per_image: float | None = None,
    peaks: Peaks | None = None,
    progress: Progress | None = None,
    notes: list[str] | None = None,
) -> list[Result]:
    """Eager unfused ``model`` (NCHW, then channels_last), ``torch.compile`` of it (with
    ``with_compile``), ``convert(model, backend=b)`` for each fused backend (``backends``:
    default all that run on ``device``) and, for CPU inference, ``freeze(model)``; the fused,
    compiled and frozen variants use ``channels_last`` as given. The first result is the
    baseline of ``speedup``. ``bn_dtype`` (inference): the BatchNorm layers' parameters and
    buffers in that dtype rather than the run's, as AMP keeps them (fp32 BN in an fp16 model also
    keeps the Triton kernels' autotune key, which holds every tensor's dtype, the same as
    fp32-BN per-layer timings)."""
    train = mode == "train"
    gpu = device.type == "cuda"
    cl = torch.channels_last
    fmt = cl if channels_last else torch.contiguous_format
    notes = notes if notes is not None else []
    frozen_model = None
    if frozen and not train and not gpu and dtype in (torch.float32, torch.bfloat16):
        from ..freeze import freeze

        # Folded from the weights as given (fp32), before the model is cast to the run's dtype.
        frozen_model = freeze(model.eval(), dtype)
    # AMP keeps fp32 parameters and autocasts; inference runs the model in the dtype itself.
    param_dtype = torch.float32 if train else dtype
    base = model.train(train).to(device=device, dtype=param_dtype)
    if bn_dtype is not None and not train:
        for module in base.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.to(bn_dtype)
    g = torch.Generator().manual_seed(0)
    x_cpu = torch.randn(batch, 3, size, size, generator=g)
    x = x_cpu.to(device, param_dtype)
    x_fmt = x.contiguous(memory_format=fmt)
    amp_dtype = dtype if dtype != torch.float32 else None

    # name -> (module, input, autocast dtype)
    models: dict[str, tuple[nn.Module, torch.Tensor, torch.dtype | None]] = {"eager": (base, x, amp_dtype if train else None)}
    # Every variant holds its own copy: a training step moves only its own weights.
    eager_cl = copy.deepcopy(base).to(memory_format=cl)
    models["eager channels_last"] = (eager_cl, x.contiguous(memory_format=cl), amp_dtype if train else None)
    if gpu and not train and amp_dtype is not None:
        models[f"eager autocast {str(dtype).removeprefix('torch.')}"] = (
            copy.deepcopy(base).float().to(memory_format=cl), x.float().contiguous(memory_format=cl), amp_dtype)
    layout_model = eager_cl if channels_last else base
    compile_name = None
    if with_compile:
        compile_mode = "max-autotune" if gpu else None
        compile_name = "torch.compile" + (f" {compile_mode}" if compile_mode else "") + (
            " +freezing" if not gpu and not train else "")
        models[compile_name] = (torch.compile(copy.deepcopy(layout_model), mode=compile_mode), x_fmt, amp_dtype if train else None)
    for b in backends if backends is not None else fused_candidates(device):
        models[f"fused: {b}"] = (convert(layout_model, backend=b), x_fmt, amp_dtype if train else None)
    if backends is None and fused_candidates(device):
        # convert's default: per unit the fastest of the fused backends and the unfused ops,
        # measured on its first call (a warm-up call here; tuning.py).
        models["fused: auto"] = (convert(layout_model, backend="auto"), x_fmt, amp_dtype if train else None)
    if frozen_model is not None:
        name = "frozen" if frozen_model.packed else "frozen (fallback: unfrozen cpu)"
        if not frozen_model.packed:
            notes.append("frozen: the oneDNN ops are unavailable here, so the frozen model runs the unfused fallback")
        models[name] = (frozen_model, x.contiguous(memory_format=cl), None)

    total = (1 if with_compile else 0) + len(models) * (warmup + rounds + 1)
    done = 0

    def tick(what: str) -> None:
        nonlocal done
        done += 1
        if progress:
            progress(done, total, what)

    with tf32_matmuls(tf32) if gpu else contextlib.nullcontext():
        if train:
            classes = _num_outputs(base, x)
            target = torch.randint(0, classes, (batch,), generator=g).to(device)
            steps = {name: _train_step(m, xi, target, device, amp) for name, (m, xi, amp) in models.items()}
            if compile_name and progress:
                progress(done, total, f"first steps (compiling {compile_name}: minutes)")
            outputs = _first_outputs(steps, compile_name, notes)  # every copy takes the same first step
            steps = {name: steps[name] for name in outputs}
            if compile_name:
                tick("compiled")
            memory = {}
            for name, step in steps.items():
                memory[name] = _step_memory_mb(step, device)
                tick(f"memory: {name}")
            samples = time_rounds(steps, device, warmup, rounds, progress, done, total)
        else:
            calls = {name: _infer_call(m, xi, device, amp) for name, (m, xi, amp) in models.items()}
            # Freezing stays on for every call: a recompile (a guard that fails later) freezes too.
            with torch.inference_mode(), _inductor_freezing(not gpu):
                if compile_name and progress:
                    progress(done, total, f"compiling ({compile_name}; a minute or more on a CPU)")
                outputs = _first_outputs(calls, compile_name, notes)
                calls = {name: calls[name] for name in outputs}
                if compile_name:
                    tick("compiled")
                memory = {}
                for name, call in calls.items():
                    memory[name] = _step_memory_mb(call, device, saved=False)
                    tick(f"memory: {name}")
                samples = time_rounds(calls, device, warmup, rounds, progress, done, total)
    medians = {name: statistics.median(times) for name, times in samples.items()}
    baseline = medians["eager"]
    compiled = medians.get(compile_name)
    flops_per_step = None if flops_per_image is None else flops_per_image * batch * (3 if train else 1)
    results = []
    for name, times in samples.items():
        med = medians[name]
        tflops = None if flops_per_step is None else flops_per_step / med / 1e12
        results.append(Result(
            name=name, median_s=med, images_per_s=batch / med, speedup=baseline / med,
            max_abs_diff=(outputs[name].float() - outputs["eager"].float()).abs().max().item(),
            memory_mb=memory[name], spread=spread(times),
            speedup_vs_compile=None if compiled is None else compiled / med,
            tflops=tflops, peak_pct=None if tflops is None or peaks is None else 100 * tflops * 1e12 / peaks.flops,
        ))
    return results


def _first_outputs(calls: dict[str, Callable[[], torch.Tensor]], compile_name: str | None,
                   notes: list[str]) -> dict[str, torch.Tensor]:
    """Each variant's first output; a torch.compile that fails (no compiler, an unsupported
    op) drops out with a note instead of ending the run."""
    outputs = {}
    for name, call in calls.items():
        if name != compile_name:
            outputs[name] = call()
            continue
        try:
            outputs[name] = call()
        except Exception as error:  # noqa: BLE001  (whatever Inductor raises)
            first = (str(error).strip().splitlines() or [""])[0][:200]
            notes.append(f"{name} failed and was skipped: {type(error).__name__}: {first}")
    return outputs


def _num_outputs(model: nn.Module, x: torch.Tensor) -> int:
    """Classes of ``model``'s logits (one eval-mode sample; the model's mode is restored)."""
    modes = {m: m.training for m in model.modules()}
    try:
        with torch.no_grad():
            return model.eval()(x[:1]).shape[-1]
    finally:
        for m, mode in modes.items():
            m.training = mode


def _infer_call(model: nn.Module, x: torch.Tensor, device: torch.device, amp: torch.dtype | None) -> Callable[[], torch.Tensor]:
    if amp is None:
        return lambda: model(x)

    def call() -> torch.Tensor:
        with torch.autocast(device.type, dtype=amp):
            return model(x)

    return call


def _train_step(model: nn.Module, x, target, device: torch.device, amp: torch.dtype | None) -> Callable[[], torch.Tensor]:
    """One training step of ``model`` (its own optimizer); returns the step's logits."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
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


# ---------------------------------------------------------------------------------------------
# The whole run


def run_bench(
    model_name: str,
    *,
    device: torch.device,
    dtype_name: str,
    mode: str = "infer",
    batch: int,
    size: int,
    channels_last: bool,
    warmup: int,
    rounds: int,
    with_compile: bool,
    backends: list[str] | None = None,
    per_layer: bool = False,
    progress: Progress | None = None,
) -> Report:
    """Check the request, build the model, count its MACs, measure the device's peaks, time
    every variant end to end and (``per_layer``) every distinct fused conv."""
    check_request(device, dtype_name, mode, batch, size, backends)
    dtype = DTYPES[dtype_name]
    tf32 = dtype_name == "tf32"
    model = build_model(model_name)
    notes: list[str] = []
    if mode == "train":
        notes.append("train: forward + cross-entropy + backward + SGD step; TFLOP/s count 3x the forward's MACs")
    if progress:
        progress(0, 1, "counting multiply-adds")
    macs = count_macs(model, size)
    if progress:
        progress(0, 1, "measuring the device's matmul and copy peaks")
    peaks = measure_peaks(device, dtype, tf32)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    setting = {"model": model_name, "mode": mode, "batch": batch, "size": size, "dtype": dtype_name,
               "channels_last": channels_last, "device": where, "device_type": device.type,
               "torch": torch.__version__, "rounds": rounds}
    results = bench_model(model, batch, size, device, dtype, channels_last, warmup, rounds, with_compile, mode,
                          backends=backends, tf32=tf32, flops_per_image=2 * macs, progress=progress, notes=notes)
    # Once more after the timing: a peak is the best seen, and background load comes and goes.
    again = measure_peaks(device, dtype, tf32)
    peaks = Peaks(max(peaks.flops, again.flops), max(peaks.bytes, again.bytes),
                  peaks.matmul_n if peaks.flops >= again.flops else again.matmul_n, peaks.copy_mb)
    for r in results:
        r.peak_pct = None if r.tflops is None else 100 * r.tflops * 1e12 / peaks.flops
    report = Report(setting, peaks, results, macs_per_image=macs, notes=notes)
    if per_layer:
        from .layers import bench_layers

        report.layers = bench_layers(build_model(model_name), batch, size, device, dtype, channels_last, mode, peaks,
                                     backends=backends, rounds=max(3, min(rounds, 10)), tf32=tf32, progress=progress)
    return report
