"""Builds the resnet_fused._C extension; package metadata lives in pyproject.toml.

Install with torch already present:  pip install --no-build-isolation -e .

Environment switches:
  RESNET_FUSED_NO_CUDA=1  CPU kernels only, even when a CUDA toolkit is found
  FORCE_CUDA=1            CUDA kernels required: fail now instead of silently skipping them
  TORCH_CUDA_ARCH_LIST    archs to compile for (default: visible GPUs, else 8.0;9.0+PTX)
  MAX_JOBS                parallel compile jobs (default: min(cores, GiB of RAM / 4))
  CUDA_HOME               CUDA toolkit root (default: found from nvcc, see find_cuda_home)

The CUDA build needs the CUTLASS headers of the pinned package nvidia-cutlass
(CUTLASS_PIN below; `pip install --no-deps nvidia-cutlass==4.2.0.0`) whenever
the arch list has an 8.x or 9.0 entry: the cuda backend's fused conv kernels
are CUTLASS instantiations (csrc/cuda/cutlass/cutlass_sm90_*.cu, cutlass_sm80_*.cu).
"""

import concurrent.futures as concurrent_futures
import importlib.metadata
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
# The CUTLASS release whose headers the kernels are written against (pyproject's
# build requirements and the README's install commands pin the same one).
CUTLASS_PIN = "nvidia-cutlass==4.2.0.0"


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


def cutlass_include_dirs() -> tuple[list[str], str]:
    """CUTLASS's header dirs inside the installed package nvidia-cutlass (module cutlass_library).

    find_spec does not import the package: its Python side needs dependencies that a
    `pip install --no-deps` leaves out, and only the headers are used here.
    """
    spec = importlib.util.find_spec("cutlass_library")
    roots = list(spec.submodule_search_locations or []) if spec else []
    for root in roots:
        include = Path(root) / "source" / "include"
        util = Path(root) / "source" / "tools" / "util" / "include"
        if (include / "cutlass" / "cutlass.h").exists() and util.is_dir():
            try:
                version = importlib.metadata.version("nvidia-cutlass")
            except importlib.metadata.PackageNotFoundError:
                version = "unknown version"
            return [str(include), str(util)], version
    where = f" (cutlass_library found at {roots[0]}, but without source/include/cutlass)" if roots else ""
    raise RuntimeError(
        f"The CUDA build needs the CUTLASS headers from the Python package {CUTLASS_PIN}{where}. "
        f"Install it with:  pip install --no-deps {CUTLASS_PIN}  "
        "(offline: pip install --no-deps --no-index --find-links benchmarks/wheels nvidia-cutlass==4.2.0.0), "
        "or build without CUDA kernels: RESNET_FUSED_NO_CUDA=1."
    )


def cubin_archs(gencodes: list[str]) -> list[int]:
    """The real archs (80, 90, ...) of torch's -gencode flags; PTX-only entries do not count."""
    found = set()
    for flag in gencodes:
        for arch in re.findall(r"code=\[?sm_(\d+)", flag):
            found.add(int(arch))
        for arch in re.findall(r"code=\[([^\]]*)\]", flag):  # code=[sm_80,compute_80]
            found.update(int(a) for a in re.findall(r"sm_(\d+)", arch))
    return sorted(found)


def cutlass_groups(archs: list[int], include_dirs: list[str]) -> list[dict]:
    """The CUTLASS kernel files and the nvcc flags of each family (see BuildWithArchGroups).

    sm90 (wgmma, TMA): compiled only for sm_90a, the one target those instructions
    exist on; built when 9.0 is in the arch list. sm80 (mma.sync): compiled for every
    8.x and 9.0 cubin in the arch list (on Hopper it is the fallback for problems the
    sm90 kernel cannot take). -DNDEBUG: CUTLASS's device asserts off (with them ptxas
    serializes wgmma). No PTX: a GPU without a matching cubin takes the exact path.
    """
    groups = []
    if 90 in archs:
        groups.append({
            "name": "cutlass_sm90",
            "sources": rel(CSRC.glob("cuda/cutlass/cutlass_sm90_*.cu")),
            "nvcc": ["-gencode=arch=compute_90a,code=sm_90a", "-DNDEBUG"],
            "include_dirs": include_dirs,
        })
    sm80 = [a for a in archs if 80 <= a <= 90]
    if sm80:
        groups.append({
            "name": "cutlass_sm80",
            "sources": rel(CSRC.glob("cuda/cutlass/cutlass_sm80_*.cu")),
            "nvcc": [f"-gencode=arch=compute_{a},code=sm_{a}" for a in sm80] + ["-DNDEBUG"],
            "include_dirs": include_dirs,
        })
    return groups


def c_string(value: str) -> str:
    # A macro whose value is a C string literal; torch shell-quotes each flag, so
    # the double quotes reach the compiler intact.
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def rel(paths) -> list[str]:
    # setuptools wants source paths relative to setup.py.
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def make_extension():
    with_cuda, why = decide_cuda()
    sources = rel([CSRC / "ops.cpp", CSRC / "bindings.cpp", *CSRC.glob("cpu/*.cpp")])
    macros = [("RESNET_FUSED_TORCH_VERSION", c_string(torch.__version__))]
    # No -std flag: torch appends the standard its headers need (C++20 for 2.14,
    # C++17 for older releases); the sources are valid under both.
    # No fp contraction: the CPU kernels' copies for wider instruction sets
    # (csrc/cpu/isa.h) would fuse a * b + c into an fma where the baseline copy
    # rounds twice, and every copy must compute the same bits.
    cxx_flags = ["-O3", "-ffp-contract=off"]
    # No --use_fast_math: it flushes denormals and approximates division/sqrt,
    # which moves results away from the PyTorch reference. -lineinfo keeps
    # source lines for Nsight Compute / compute-sanitizer at no runtime cost.
    nvcc_flags = ["-O3", "-lineinfo"]

    archs = cuda_version = None
    gencodes, extra_includes, groups = [], [], []
    cutlass_line = "-"
    if with_cuda:
        archs, archs_from = cuda_arch_list()
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        cuda_version = nvcc_version()
        # Not cuda/cutlass/: those kernel files build in their own groups, with their own arch flags.
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
        real_archs = cubin_archs(gencodes)
        if any(80 <= a <= 90 for a in real_archs):
            cutlass_dirs, cutlass_version = cutlass_include_dirs()
            groups = cutlass_groups(real_archs, cutlass_dirs)
            cutlass_line = f"nvidia-cutlass {cutlass_version}, {Path(cutlass_dirs[0]).parent.parent}"
        else:
            cutlass_line = f"none (no 8.x or 9.0 cubin in {archs}): every conv takes cuDNN + epilogue"
        sm80 = [a for a in real_archs if 80 <= a <= 90]
        if any(g["name"] == "cutlass_sm90" for g in groups):
            macros.append(("RESNET_FUSED_CUTLASS_SM90", "1"))
        if any(g["name"] == "cutlass_sm80" for g in groups):
            macros.append(("RESNET_FUSED_CUTLASS_SM80_ARCHS", c_string(";".join(map(str, sm80)))))

    lines = [
        f"CUDA kernels : {'ON' if with_cuda else 'OFF'} ({why})",
        f"CUDA archs   : {f'{archs} ({archs_from})' if with_cuda else '-'}",
        f"gencode      : {' '.join(g.removeprefix('-gencode=') for g in gencodes) or '-'}",
        f"torch        : {torch.__version__} (built with CUDA {torch.version.cuda})",
        f"nvcc CUDA    : {cuda_version or '-'}",
        f"CUDA_HOME    : {CUDA_HOME}",
        f"lib headers  : {' '.join(extra_includes) or '-'} (-idirafter, CUDA only)",
        f"CUTLASS      : {cutlass_line}",
        *(f"  {g['name']}: {len(g['sources'])} files, {' '.join(f for f in g['nvcc'] if 'gencode' in f)}"
          for g in groups),
        f"MAX_JOBS     : {os.environ['MAX_JOBS']}",
    ]
    print("resnet_fused build configuration\n  " + "\n  ".join(lines), flush=True)

    ext = CUDAExtension if with_cuda else CppExtension
    extension = ext(
        name="resnet_fused._C",
        sources=sources,
        include_dirs=[str(CSRC)],
        define_macros=macros,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
    )
    extension.arch_groups = groups
    return extension


class BuildWithArchGroups(BuildExtension):
    """torch's BuildExtension, plus source groups that get their own nvcc arch flags.

    BuildExtension gives every .cu file of an extension the same nvcc flags, but the
    sm90 CUTLASS kernels must be compiled for sm_90a only (and the sm80 ones for the
    8.x/9.0 archs only). Each group goes through the same compiler wrapper torch
    installs (ninja, MAX_JOBS, torch's include dirs and defines) in its own build
    folder, with the extension's nvcc flags minus their -gencode entries plus the
    group's; the objects are linked into the one extension, so conv_bn_act.cu calls
    the kernels directly. Considered and not taken: a second extension module per arch
    (the op would have to find its kernels across two shared objects at run time).

    The groups run one after the other, each parallel inside, when MAX_JOBS is smaller
    than the number of source files (CI: 2 cores); with enough cores (a GPU machine)
    they run at the same time, so the sm90 kernels compile while the rest does.
    """

    def build_extension(self, ext):
        groups = getattr(ext, "arch_groups", [])
        if not groups:
            return super().build_extension(ext)
        args = ext.extra_compile_args
        base_nvcc = [f for f in args["nvcc"] if not f.startswith("-gencode")]
        macros = list(ext.define_macros) + [(name,) for name in ext.undef_macros]

        # Bound before the wrapper below replaces it: the group threads must not
        # call the wrapper, which waits for them.
        original = self.compiler.compile

        def compile_group(group):
            return original(
                group["sources"],
                output_dir=os.path.join(self.build_temp, group["name"]),
                macros=macros,
                include_dirs=list(ext.include_dirs) + group["include_dirs"],
                debug=self.debug,
                extra_postargs={**args, "nvcc": base_nvcc + group["nvcc"]},
                depends=ext.depends,
            )

        total = len(ext.sources) + sum(len(g["sources"]) for g in groups)
        concurrent = int(os.environ["MAX_JOBS"]) >= total
        pool = concurrent_futures.ThreadPoolExecutor(len(groups)) if concurrent else None
        futures = [pool.submit(compile_group, g) if pool else None for g in groups]
        group_objects = [] if pool else [obj for g in groups for obj in compile_group(g)]

        def compile_then_collect(*a, **kw):
            # setuptools compiles ext.sources with this, then links what it returns.
            objects = original(*a, **kw)
            for future in futures:
                if future is not None:
                    objects += future.result()
            return objects + group_objects

        self.compiler.compile = compile_then_collect
        try:
            super().build_extension(ext)
        finally:
            self.compiler.compile = original
            if pool:
                pool.shutdown(wait=True)


setup(
    ext_modules=[make_extension()],
    cmdclass={"build_ext": BuildWithArchGroups.with_options(use_ninja=True)},
)
