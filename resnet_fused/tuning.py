"""``backend="auto"`` for fused modules: per distinct unit, the fastest exact path, measured.

A unit is what decides a fused conv's speed: the device (type, name, compute capability), the
input's shape, dtype and layout, the filter's shape, stride, padding, dilation and groups,
whether a residual rides along, the activation, and the mode (the inference op; the training
unit; eval with autograd recording). The first call of a new unit times each candidate -- every
fused backend that runs on the device, and ``reference``, the exact unfused PyTorch ops -- on
copies of the call's module and inputs (nothing of the model changes: no running statistics
move, no gradient accumulates), one warm-up then REPS timed calls (with the backward when the
call records autograd), and keeps the fastest median for the rest of the process. The warm-up
also runs the runtime guard's first check (guard.py), so a kernel the guard rejects is timed as
the reference it falls back to, and never wins by being wrong.

``RESNET_FUSED_TUNE_CACHE`` names a JSON file of choices, read at the first decision and
rewritten after each new one, so a long run, or the next process on the same machine, pays once.
``RESNET_FUSED_TUNE=off`` gives the device rule (``backends.resolve``) without timing, which is
also what a torch.compile trace and a multi-process SyncBatchNorm training unit use (timing
there would break the graph, or let ranks run different collectives).
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import threading
import time
import warnings
from collections.abc import Callable

import torch

from . import backends

REPS = 3  # timed calls per candidate after the warm-up; the median decides

_choices: dict[str, str] = {}  # unit key -> backend name, this process
_loaded_from: str | None = None  # the cache file _choices was last read from


def enabled() -> bool:
    value = os.environ.get("RESNET_FUSED_TUNE", "on")
    if value not in ("on", "off"):
        raise ValueError(f"RESNET_FUSED_TUNE={value!r}: choose on or off")
    return value == "on"


def reset() -> None:
    """Forget every choice (tests; or after the machine's load changed)."""
    global _loaded_from
    _choices.clear()
    _loaded_from = None


def choices() -> dict[str, str]:
    """The choices made (or loaded) so far: unit key (JSON text) -> backend."""
    return dict(_choices)


def fused_candidates(device: torch.device) -> list[str]:
    """The fused backends that run on ``device``; not Triton on a CPU, where only its
    interpreter runs it: a test tool, not a path."""
    return [name for name in backends.FUSED_BACKENDS if backends.REGISTRY[name].runs_on(device)
            and not (name == "triton" and device.type == "cpu")]


def candidates(device: torch.device) -> list[str]:
    """What may run a unit on ``device``: the fused backends, then the exact unfused ops."""
    return [*fused_candidates(device), "reference"]


def _device_and_input(x: torch.Tensor) -> list:
    device = x.device
    name, capability = "cpu", None
    if device.type == "cuda":
        name, capability = torch.cuda.get_device_name(device), list(torch.cuda.get_device_capability(device))
    layout = "channels_last" if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
        and not x.is_contiguous() else "contiguous"
    return [device.type, name, capability, list(x.shape), str(x.dtype).removeprefix("torch."), layout]


def unit_key(x: torch.Tensor, weight: torch.Tensor, residual, stride, padding, dilation, groups: int,
             act_kind: str, mode: str) -> str:
    return json.dumps([*_device_and_input(x), list(weight.shape), list(stride), list(padding), list(dilation), groups,
                       residual is not None, act_kind, mode])


def norm_key(x: torch.Tensor, act_kind: str, mode: str) -> str:
    """The key of a BatchNorm + activation unit with no conv (norm_act.py)."""
    return json.dumps([*_device_and_input(x), "batch_norm", act_kind, mode])


def call_once(run: Callable[[], torch.Tensor], tensors: list, recording: bool) -> None:
    """A trial's one call: ``run()``, and when ``recording``, its backward by
    ``torch.autograd.grad`` to those of ``tensors`` that require grad (no ``.grad``
    accumulates), with the saved tensors bypassing the caller's saved-tensor hooks
    (non-reentrant checkpointing counts them)."""
    with torch.autograd.graph.saved_tensors_hooks(_unchanged, _unchanged), \
            torch.enable_grad() if recording else torch.no_grad():
        out = run()
        if recording:
            wrt = [t for t in tensors if isinstance(t, torch.Tensor) and t.requires_grad]
            torch.autograd.grad(out, wrt, torch.ones_like(out), allow_unused=True)


def _unchanged(t: torch.Tensor) -> torch.Tensor:
    return t


def choose(key: str, device: torch.device, trial: Callable[[str], None], fallback: str) -> str:
    """The backend for unit ``key``: the cached choice, or the fastest candidate by ``trial``
    (one call of the unit on that backend, on copies), timed now and remembered. A candidate
    whose trial raises is no candidate; when none runs, ``fallback``, unremembered (the call
    itself then raises as it would have, with its own message)."""
    _load()
    options = candidates(device)
    chosen = _choices.get(key)
    if chosen in options:
        return chosen
    times = {}
    for name in options:
        try:
            times[name] = _median_time(trial, name, device)
        except Exception:  # noqa: BLE001  (whatever stops a candidate here stops it for this unit)
            continue
    if not times:
        return fallback
    chosen = min(times, key=times.get)
    _choices[key] = chosen
    _save()
    return chosen


def _median_time(trial: Callable[[str], None], name: str, device: torch.device) -> float:
    trial(name)  # warm-up: compiles, autotunes, and runs the guard's first check
    samples = []
    for _ in range(REPS):
        _synchronize(device)
        start = time.perf_counter()
        trial(name)
        _synchronize(device)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cache_path() -> str | None:
    return os.environ.get("RESNET_FUSED_TUNE_CACHE") or None


def _load() -> None:
    """Read the cache file once per path (a changed RESNET_FUSED_TUNE_CACHE is read anew); a
    file that cannot be read is reported once and measured over."""
    global _loaded_from
    path = _cache_path()
    if path is None or path == _loaded_from:
        return
    _loaded_from = path
    try:
        stored = _read(path)
    except (OSError, ValueError) as error:
        warnings.warn(f"resnet_fused: RESNET_FUSED_TUNE_CACHE={path!r} cannot be used ({error}); "
                      "the units are measured again and the file rewritten", stacklevel=4)
        return
    for key, name in stored.items():
        _choices.setdefault(key, name)


def _others(path: str) -> dict[str, str]:
    """What the file holds now: another process may have added units since this one read it
    (a file that is not ours is replaced)."""
    try:
        return _read(path)
    except (OSError, ValueError):
        return {}


def _read(path: str) -> dict[str, str]:
    """The choices in the cache file ({} if there is none); ValueError for one that is not ours."""
    try:
        with open(path) as file:
            stored = json.load(file)
    except FileNotFoundError:
        return {}
    if not isinstance(stored, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in stored.items()):
        raise ValueError("not an object of unit keys to backend names")
    return stored


def _save() -> None:
    """Write every choice to the cache file (via a temporary file and a rename: a reader never
    sees half a file); a failure to write is a warning, never lost work."""
    path = _cache_path()
    if path is None:
        return
    temporary = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        with open(temporary, "w") as file:
            json.dump({**_others(path), **_choices}, file, indent=0, sort_keys=True)
        os.replace(temporary, path)
    except OSError as error:
        warnings.warn(f"resnet_fused: cannot write RESNET_FUSED_TUNE_CACHE={path!r} ({error})", stacklevel=4)
        with contextlib.suppress(OSError):
            os.remove(temporary)
