"""The CUTLASS kernels in the built extension, read back from its cubins with cuobjdump (CPU only).

What a GPU run would rely on and the CPU can prove: the sm90 kernels exist as sm_90a cubins and
their machine code uses wgmma (HGMMA); the sm80 kernels exist as sm_80 (and sm_90) cubins using
mma.sync (HMMA); every CUTLASS kernel carries the fused epilogue in its type; and none of them
spills: no local memory, no stack, no STL instruction. Skipped, with the reason, when the
extension was built without CUDA or no cuobjdump is found.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from resnet_fused import _extension


def find_cuobjdump() -> str | None:
    """The toolkit's cuobjdump, else the copy Triton ships (a compiler-only toolkit lacks it)."""
    candidates = [shutil.which("cuobjdump")]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates.append(os.path.join(home, "bin", "cuobjdump"))
    try:
        import triton

        candidates.append(str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def _skip_reason() -> str | None:
    if not _extension.has_cpu_ops():
        return f"extension not built: {_extension.LOAD_ERROR}"
    if not _extension.has_cuda_ops():
        return "extension built without CUDA (RESNET_FUSED_NO_CUDA=1 or no toolkit): no cubins to read"
    if find_cuobjdump() is None:
        return "no cuobjdump: neither the CUDA toolkit's nor Triton's bundled copy was found"
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))

# Mangled-name fragments of the two kernel families (cutlass_sm90.cuh, cutlass_sm80.cuh).
SM90_KERNEL = "KernelImplicitTmaWarpSpecializedSm90"
SM80_KERNEL = "ImplicitGemmConvolutionWithFusedEpilogue"


def _cuobjdump(*args: str, cwd: Path | None = None) -> str:
    return subprocess.run([find_cuobjdump(), *args], capture_output=True, text=True, check=True, cwd=cwd).stdout


def _functions(text: str, header: str) -> dict[str, str]:
    """cuobjdump output cut into {mangled function name: its block}."""
    parts = re.split(header, text)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


@pytest.fixture(scope="module")
def cubins(tmp_path_factory) -> dict[str, Path]:
    """The CUTLASS cubins of the extension, one file each: {"cutlass_sm90_f16_128x128x64.sm_90a": path}.

    Extracted with -xelf rather than read with -arch, which matches sm_90 and sm_90a alike.
    cuobjdump names each cubin after its source file and arch, so a cubin ties a kernel to the
    .cu file (and the nvcc flags) it came from.
    """
    folder = tmp_path_factory.mktemp("cubins")
    _cuobjdump("-xelf", "all", _extension._C.__file__, cwd=folder)
    return {p.name.removesuffix(".cubin"): p for p in sorted(folder.glob("cutlass_*.cubin"))}


@pytest.fixture(scope="module")
def sass(cubins) -> dict[str, dict[str, str]]:
    return {name: _functions(_cuobjdump("-sass", str(p)), r"\n\s+Function : (\S+)\n") for name, p in cubins.items()}


@pytest.fixture(scope="module")
def res_usage(cubins) -> dict[str, dict[str, str]]:
    return {name: _functions(_cuobjdump("-res-usage", str(p)), r"\n Function (\S+?):\n") for name, p in cubins.items()}


def _built() -> dict:
    from resnet_fused import _C

    return _C.cuda_conv_build()


def _kernels() -> list[dict]:
    from resnet_fused import _C

    return _C.cuda_conv_kernels()


def _expected_cubins() -> set[str]:
    """One cubin per built kernel and arch: sm_90a for the sm90 family, each sm80 cubin arch for
    the sm80 family (kernel names are the .cu file names without the cutlass_ prefix)."""
    build = _built()
    expected = set()
    for k in _kernels():
        if k["arch"] == "sm90" and build["sm90a"]:
            expected.add(f"cutlass_{k['name']}.sm_90a")
        if k["arch"] == "sm80":
            expected.update(f"cutlass_{k['name']}.sm_{a}" for a in build["sm80_cubins"])
    return expected


def test_cubins_for_each_family(cubins):
    build = _built()
    assert build["sm90a"] or build["sm80_cubins"], "a CUDA build with 8.x/9.0 archs has CUTLASS kernels"
    # Exactly these: in particular no plain sm_90 cubin of an sm90 kernel (wgmma would trap there).
    assert set(cubins) == _expected_cubins()


def test_sm90_kernels_use_wgmma(sass):
    if not _built()["sm90a"]:
        pytest.skip("no 9.0 in TORCH_CUDA_ARCH_LIST: no sm90 kernels built")
    sm90 = {name: functions for name, functions in sass.items() if name.startswith("cutlass_sm90_")}
    assert len(sm90) == 4, list(sm90)  # fp16/bf16 x tile N 128/64
    for cubin, functions in sm90.items():
        kernels = {n: body for n, body in functions.items() if SM90_KERNEL in n}
        assert len(kernels) == 1, (cubin, list(functions))
        (name, body), = kernels.items()
        assert re.search(r"\bHGMMA\.64x\d+x16\.F32", body), cubin  # wgmma, fp32 accumulators
        # The fused epilogue is part of the kernel's type: per-column scale and bias, residual
        # as C, and the Clamp activation whose bounds make it ReLU or the identity.
        assert "PerColLinCombPerColBiasEltAct" in name and "Clamp" in name, name
        assert ("bfloat16_t" in name) == ("_bf16_" in cubin), (cubin, name)


def test_sm80_kernels_use_mma_sync(sass):
    build = _built()
    if not build["sm80_cubins"]:
        pytest.skip("no 8.x/9.0 cubin in TORCH_CUDA_ARCH_LIST: no sm80 kernels built")
    sm80 = {name: functions for name, functions in sass.items() if name.startswith("cutlass_sm80_")}
    assert len(sm80) == 4 * len(build["sm80_cubins"]), list(sm80)
    for cubin, functions in sm80.items():
        kernels = {n: body for n, body in functions.items() if SM80_KERNEL in n}
        assert len(kernels) == 1, (cubin, list(functions))
        (name, body), = kernels.items()
        assert re.search(r"\bHMMA\.16816\.F32", body), cubin  # mma.sync m16n8k16, fp32 accumulators
        assert "BiasResidualAct" in name, name  # our fused output functor
        assert ("bfloat16_t" in name) == ("_bf16_" in cubin), (cubin, name)


def test_no_spills_no_stack(res_usage, sass):
    assert set(res_usage) == _expected_cubins()
    for cubin, functions in res_usage.items():
        for name, block in functions.items():
            # LOCAL is per-thread local memory, where spills go; STACK the call stack.
            assert re.search(r"\bSTACK:0\b", block) and re.search(r"\bLOCAL:0\b", block), (cubin, name, block)
            assert int(re.search(r"REG:(\d+)", block).group(1)) <= 255, (cubin, name, block)
    for cubin, functions in sass.items():
        for name, body in functions.items():
            assert not re.search(r"\bSTL(\.\w+)*\s", body), f"spill store in {cubin}: {name}"
