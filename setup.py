"""Builds the resnet_fused._C extension; package metadata lives in pyproject.toml.

Install with torch already present:  pip install --no-build-isolation -e .

Environment switches:
  RESNET_FUSED_NO_CUDA=1  CPU kernels only, even when a CUDA toolkit is found
  FORCE_CUDA=1            CUDA kernels required: fail now instead of silently skipping them
  TORCH_CUDA_ARCH_LIST    archs to compile for (default: visible GPUs, else 8.0;9.0+PTX)
  MAX_JOBS                parallel compile jobs (default: min(cores, GiB of RAM / 4))
  CUDA_HOME               CUDA toolkit root (default: found from nvcc, see find_cuda_home)
"""

import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent.resolve()
CSRC = ROOT / "csrc"
# A100 and H100; +PTX lets newer GPUs JIT the sm_90 code instead of failing to load.
DEFAULT_ARCHS = "8.0;9.0+PTX"


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def has_cudart(root: Path) -> bool:
    return any(
        any(root.glob(pattern))
        for pattern in ("lib64/libcudart*", "lib/libcudart*", "targets/*/lib/libcudart*")
    )


def find_cuda_home() -> str | None:
    """Locate the toolkit root from nvcc, resolving symlinks and wrapper scripts.

    torch guesses dirname(dirname(which nvcc)), which is wrong when nvcc is a
    wrapper (here /usr/local/bin/nvcc execs /usr/local/cuda-13.0/bin/nvcc): the
    guess /usr/local has no libcudart and the link step fails.
    """
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = Path(nvcc).resolve()
        candidates.append(real.parent.parent)
        try:
            with open(real, "rb") as f:
                head = f.read(64 * 1024)
        except OSError:
            head = b""
        if head.startswith(b"#!"):  # a shell wrapper: follow the nvcc path it execs
            for path in re.findall(rb"(/[^\s'\"]+)/bin/nvcc\b", head):
                candidates.append(Path(path.decode()).resolve())
    candidates.append(Path("/usr/local/cuda"))
    for root in candidates:
        if (root / "bin" / "nvcc").exists() and has_cudart(root):
            return str(root)
    return None


# torch.utils.cpp_extension reads CUDA_HOME once, at import: set it first.
if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")):
    found = find_cuda_home()
    if found:
        os.environ["CUDA_HOME"] = found

if "MAX_JOBS" not in os.environ:
    # Each nvcc/g++ job on the ATen headers peaks around 2-4 GiB; more jobs than
    # that OOM-kills small CI machines.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    os.environ["MAX_JOBS"] = str(max(1, min(cores, int(mem_gib // 4))))

import torch  # noqa: E402
from torch.utils.cpp_extension import (  # noqa: E402
    CUDA_HOME,
    BuildExtension,
    CppExtension,
    CUDAExtension,
    _get_cuda_arch_flags,  # private, but the one place torch's arch-name parsing lives
)


def decide_cuda() -> tuple[bool, str]:
    if env_flag("RESNET_FUSED_NO_CUDA"):
        return False, "RESNET_FUSED_NO_CUDA=1"
    if env_flag("FORCE_CUDA"):
        # FORCE_CUDA means the caller needs the CUDA kernels: a missing piece is an error.
        if torch.version.cuda is None:
            raise RuntimeError(f"FORCE_CUDA=1 but torch {torch.__version__} is not a CUDA build")
        if CUDA_HOME is None:
            raise RuntimeError("FORCE_CUDA=1 but no CUDA toolkit found: set CUDA_HOME or put nvcc on PATH")
        return True, "FORCE_CUDA=1"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is not a CUDA build"
    if CUDA_HOME is None:
        return False, "no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)"
    return True, f"toolkit found and torch is a CUDA {torch.version.cuda} build"


def cuda_arch_list() -> tuple[str, str]:
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if archs and archs != "native":
        return archs, "TORCH_CUDA_ARCH_LIST"
    if torch.cuda.is_available():
        # Same choice torch makes for visible GPUs, made here so the module can report it.
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        return ";".join(f"{a}.{b}" for a, b in caps) + "+PTX", "visible GPUs"
    # With no GPU torch's own default indexes an empty list (IndexError).
    return DEFAULT_ARCHS, "default, no GPU visible"


def nvcc_version() -> str:
    try:
        out = subprocess.run(
            [os.path.join(CUDA_HOME, "bin", "nvcc"), "--version"],
            capture_output=True, text=True, check=True,
        ).stdout
        m = re.search(r"release (\d+\.\d+)", out)
        if m:
            return m.group(1)
    except (OSError, subprocess.CalledProcessError):
        pass
    return torch.version.cuda


def pip_cuda_includes() -> list[str]:
    """Header dirs of the CUDA libraries that torch's wheels install (nvidia/*/include).

    A toolkit with only the compiler and runtime (as on CI) lacks cublas_v2.h
    and cusparse.h, which ATen/cuda/CUDAContext.h includes. They are added with
    -idirafter, so the toolkit's own headers always win where both exist.
    """
    if (Path(CUDA_HOME) / "include" / "cusparse.h").exists():
        return []
    spec = importlib.util.find_spec("nvidia")
    roots = spec.submodule_search_locations if spec else []
    return sorted(str(d) for root in roots for d in Path(root).glob("*/include") if d.is_dir())


def c_string(value: str) -> str:
    # A macro whose value is a C string literal; torch shell-quotes each flag, so
    # the double quotes reach the compiler intact.
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def rel(paths) -> list[str]:
    # setuptools wants source paths relative to setup.py.
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def make_extension():
    with_cuda, why = decide_cuda()
    sources = rel([CSRC / "ops.cpp", *CSRC.glob("cpu/*.cpp")])
    macros = [("RESNET_FUSED_TORCH_VERSION", c_string(torch.__version__))]
    # No -std flag: torch appends the standard its headers need (C++20 for 2.14,
    # C++17 for older releases); the sources are valid under both.
    cxx_flags = ["-O3"]
    # No --use_fast_math: it flushes denormals and approximates division/sqrt,
    # which moves results away from the PyTorch reference. -lineinfo keeps
    # source lines for Nsight Compute / compute-sanitizer at no runtime cost.
    nvcc_flags = ["-O3", "-lineinfo"]

    archs = cuda_version = None
    gencodes, extra_includes = [], []
    if with_cuda:
        archs, archs_from = cuda_arch_list()
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        cuda_version = nvcc_version()
        sources += rel(CSRC.glob("cuda/*.cu"))
        # Pass the -gencode flags ourselves: torch adds none when any nvcc flag
        # contains "arch", which an include path like /home/me/research/... does.
        gencodes = _get_cuda_arch_flags()
        nvcc_flags += gencodes
        extra_includes = pip_cuda_includes()
        cxx_flags += [f"-idirafter{d}" for d in extra_includes]
        nvcc_flags += [f"-Xcompiler=-idirafter{d}" for d in extra_includes]
        macros += [
            ("RESNET_FUSED_WITH_CUDA", "1"),
            ("RESNET_FUSED_CUDA_ARCHS", c_string(archs)),
            ("RESNET_FUSED_CUDA_VERSION", c_string(cuda_version)),
        ]

    lines = [
        f"CUDA kernels : {'ON' if with_cuda else 'OFF'} ({why})",
        f"CUDA archs   : {f'{archs} ({archs_from})' if with_cuda else '-'}",
        f"gencode      : {' '.join(g.removeprefix('-gencode=') for g in gencodes) or '-'}",
        f"torch        : {torch.__version__} (built with CUDA {torch.version.cuda})",
        f"nvcc CUDA    : {cuda_version or '-'}",
        f"CUDA_HOME    : {CUDA_HOME}",
        f"lib headers  : {' '.join(extra_includes) or '-'} (-idirafter, CUDA only)",
        f"MAX_JOBS     : {os.environ['MAX_JOBS']}",
    ]
    print("resnet_fused build configuration\n  " + "\n  ".join(lines), flush=True)

    ext = CUDAExtension if with_cuda else CppExtension
    return ext(
        name="resnet_fused._C",
        sources=sources,
        include_dirs=[str(CSRC)],
        define_macros=macros,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
    )


setup(
    ext_modules=[make_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
