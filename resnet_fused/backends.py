"""Which implementation runs a fused op: ``"triton"``, ``"cuda"``, ``"cpu"`` or ``"reference"``.

The choice is made per call from the tensor's device, so a converted model can be moved
between devices afterwards. Nothing here touches the GPU at import time.
"""

from __future__ import annotations

import os

import torch

from . import _extension

BACKENDS = ("triton", "cuda", "cpu", "reference")


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _triton_usable_on(device: torch.device) -> bool:
    if device.type == "cuda":
        return True
    return device.type == "cpu" and triton_interpreting()


def available_backends() -> list[str]:
    """The backends that can run on this machine, fastest first."""
    gpu = torch.cuda.is_available()
    usable = {
        "triton": gpu or triton_interpreting(),
        "cuda": gpu and _extension.has_cuda_ops(),
        "cpu": _extension.has_cpu_ops(),
        "reference": True,
    }
    return [name for name in BACKENDS if usable[name]]


def check_backend_name(backend: str) -> None:
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose 'auto' or one of {list(BACKENDS)}")


def resolve(backend: str, device: torch.device) -> str:
    """The concrete backend for a tensor on ``device``; raises if ``backend`` cannot run there."""
    check_backend_name(backend)
    if backend == "auto":
        if device.type == "cuda":
            # The Triton kernel is the tuned path until the hand-written CUDA kernels land.
            return "triton"
        if device.type == "cpu" and _extension.has_cpu_ops():
            return "cpu"
        return "reference"
    runs_here = {
        "triton": _triton_usable_on(device),
        "cuda": device.type == "cuda" and _extension.has_cuda_ops(),
        "cpu": device.type == "cpu" and _extension.has_cpu_ops(),
        "reference": True,
    }[backend]
    if not runs_here:
        why = {
            "triton": "Triton needs a CUDA tensor (or TRITON_INTERPRET=1 for CPU tensors)",
            "cuda": "it needs a CUDA tensor and the extension built with CUDA",
            "cpu": "it needs a CPU tensor and the compiled extension resnet_fused._C",
        }[backend]
        raise RuntimeError(
            f"backend {backend!r} cannot run a tensor on {device}: {why}. "
            f"Available here: {available_backends()}; backend='auto' picks one per device."
        )
    return backend
