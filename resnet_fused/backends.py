"""The backend registry: which implementation runs a fused op. One record per backend says
where it runs, its inference op and its training kernels; everything else (functional.py,
training.py, nn.py, the bench) asks the registry. Adding a backend is one ``Backend`` record
in ``REGISTRY`` plus the module holding its ``inference`` and ``kernels``.

The choice is made per call from the tensor's device, so a converted model can be moved
between devices afterwards. Nothing here touches the GPU, or imports Triton, at import time.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import _extension, guard
from .ops import extension, reference
from .ops.kernels import Kernels
from .ops import triton as triton_ops


@dataclass(frozen=True)
class Backend:
    name: str
    # Whether it can run tensors on this device on this machine, and if not, why.
    runs_on: Callable[[torch.device], bool]
    why_not: str
    # (x, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps, residual, stride,
    #  padding, dilation, groups, act, act_a, act_b, allow_tf32) -> out, arguments validated
    #  (functional.py); (act, act_a, act_b) is ops.activation.Activation.args.
    inference: Callable[..., torch.Tensor]
    kernels: Callable[[], Kernels]  # the training unit's pieces (training.py)
    # The unfused PyTorch ops: the oracle and the fallback, not a fused path.
    is_reference: bool = False
    # Whether the runtime guard (guard.py) checks each new kind of call against the reference
    # when RESNET_FUSED_VERIFY is unset: for kernels that may meet chips never tested.
    verify_by_default: bool = False


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


REGISTRY: dict[str, Backend] = {
    backend.name: backend
    for backend in (
        Backend(
            "triton",
            lambda device: device.type == "cuda" or (device.type == "cpu" and triton_interpreting()),
            "Triton needs a CUDA tensor (or TRITON_INTERPRET=1 for CPU tensors)",
            triton_ops.inference, triton_ops.kernels, verify_by_default=True,
        ),
        Backend(
            "cuda",
            lambda device: device.type == "cuda" and _extension.has_cuda_ops(),
            "it needs a CUDA tensor and the extension built with CUDA",
            extension.inference, extension.kernels, verify_by_default=True,
        ),
        Backend(
            "cpu",
            lambda device: device.type == "cpu" and _extension.has_cpu_ops(),
            "it needs a CPU tensor and the compiled extension resnet_fused._C",
            extension.inference, extension.kernels,
        ),
        Backend("reference", lambda device: True, "", reference.inference, reference.kernels, is_reference=True),
    )
}

# name -> (record, the record under the guard), made here so that torch.compile, tracing
# get(), finds them made.
_guarded: dict[str, tuple[Backend, Backend]] = {
    name: (record, guard.guard_backend(record, REGISTRY["reference"])) for name, record in REGISTRY.items()
    if not record.is_reference
}

BACKENDS = tuple(REGISTRY)  # fastest first
FUSED_BACKENDS = tuple(name for name, backend in REGISTRY.items() if not backend.is_reference)


def get(name: str) -> Backend:
    """The record of backend ``name`` as callers run it: its inference op and training kernels
    under the runtime guard (guard.py), which decides per call whether to verify."""
    check_backend_name(name)
    record = REGISTRY[name]
    if record.is_reference:
        return record
    guarded = _guarded.get(name)
    if guarded is None or guarded[0] is not record:  # a record replaced since (tests)
        guarded = _guarded[name] = (record, guard.guard_backend(record, REGISTRY["reference"]))
    return guarded[1]


def available_backends() -> list[str]:
    """The backends that can run on this machine, fastest first."""
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    return [name for name, backend in REGISTRY.items() if any(backend.runs_on(d) for d in devices)]


def check_backend_name(backend: str) -> None:
    if backend != "auto" and backend not in REGISTRY:
        raise ValueError(f"unknown backend {backend!r}; choose 'auto' or one of {list(BACKENDS)}")


def resolve(backend: str, device: torch.device) -> str:
    """The concrete backend for a tensor on ``device``; raises if ``backend`` cannot run there."""
    check_backend_name(backend)
    if backend == "auto":
        if device.type == "cuda":
            # The Triton kernel is the tuned path until the hand-written CUDA kernels land.
            return "triton"
        if device.type == "cpu" and REGISTRY["cpu"].runs_on(device):
            return "cpu"
        return "reference"
    if not REGISTRY[backend].runs_on(device):
        raise RuntimeError(
            f"backend {backend!r} cannot run a tensor on {device}: {REGISTRY[backend].why_not}. "
            f"Available here: {available_backends()}; backend='auto' picks one per device."
        )
    return backend
