"""The C++ CPU kernels' copies per instruction set (csrc/cpu/isa.h): each copy this machine runs
computes the same bits as the baseline copy, for every training BatchNorm op, both layouts,
every dtype, activations that read the mask or z, and shapes whose rows and chunks end in
remainders (the vector loops' tails); and the choice is the widest supported, or refused with a
clear error where a copy cannot run."""

from __future__ import annotations

import pytest
import torch

from resnet_fused import _extension

pytestmark = pytest.mark.skipif(not _extension.has_cpu_ops(), reason=f"extension not built: {_extension.LOAD_ERROR}")

ops = torch.ops.resnet_fused
ISAS = ("baseline", "avx2", "avx512")
# (N, K, H, W): K and H*W off every vector width; the last passes one 2048-value NCHW chunk and
# one 64-row channels_last chunk, so partials merge.
SHAPES = [(3, 5, 7, 9), (2, 67, 5, 3), (2, 19, 47, 45)]


@pytest.fixture
def cpu_ext():
    from resnet_fused import _C

    chosen = _C.cpu_isa()
    yield _C
    _C.cpu_isa_set(chosen)


def _every_op(y: torch.Tensor, act: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    k = y.shape[1]
    gamma, beta = torch.rand(k, generator=g) + 0.5, torch.randn(k, generator=g)
    residual = torch.randn(y.shape, generator=g).to(y.dtype).contiguous(memory_format=_format(y))
    grad = torch.randn(y.shape, generator=g).to(y.dtype).contiguous(memory_format=_format(y))
    mean, var = ops.bn_stats(y)
    out = ops.bn_act_apply(y, mean, var, gamma, beta, 1e-5, residual, act, 0.05, 1.5)
    sum_g, sum_gx = ops.bn_act_backward_reduce(grad, out, y, mean, var, gamma, beta, 1e-5, act, 0.05, 1.5)
    count = y.numel() // k
    dy, d_res = ops.bn_act_backward_apply(grad, out, y, mean, var, gamma, beta, 1e-5, sum_g, sum_gx, count, True,
                                          act, 0.05, 1.5, True)
    running_mean, running_var = torch.randn(k, generator=g), torch.rand(k, generator=g) + 0.5
    ops.bn_update_running_stats_(running_mean, running_var, mean, var, count, 0.1)
    return [mean, var, out, sum_g, sum_gx, dy, d_res, running_mean, running_var]


def _format(y: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous() \
        else torch.contiguous_format


def test_the_widest_supported_copy_is_chosen(cpu_ext):
    assert cpu_ext.cpu_isa_supported("baseline")
    widest = [isa for isa in ISAS if cpu_ext.cpu_isa_supported(isa)][-1]
    import os

    assert cpu_ext.cpu_isa() == os.environ.get("RESNET_FUSED_CPU_ISA", widest)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("act", [1, 2, 4], ids=["relu", "hardtanh", "silu"])
def test_every_copy_computes_the_same_bits(cpu_ext, dtype, channels_last, act):
    runs = [isa for isa in ISAS if cpu_ext.cpu_isa_supported(isa)]
    if len(runs) == 1:
        pytest.skip("this build or CPU runs the baseline copy only")
    for shape in SHAPES:
        y = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape))) * 3 + 1
        y = y.to(dtype).contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        results = {}
        for isa in runs:
            cpu_ext.cpu_isa_set(isa)
            results[isa] = _every_op(y, act)
        for isa in runs[1:]:
            for i, (a, b) in enumerate(zip(results["baseline"], results[isa])):
                assert torch.equal(a, b), f"{isa}, {shape}, output {i}"


def test_unknown_or_unsupported_copies_are_refused(cpu_ext):
    with pytest.raises(ValueError, match="unknown CPU instruction set 'sse9' \\(baseline, avx2 or avx512\\)"):
        cpu_ext.cpu_isa_set("sse9")
    with pytest.raises(ValueError, match="unknown CPU instruction set"):
        cpu_ext.cpu_isa_supported("sse9")
    for isa in ISAS:
        if not cpu_ext.cpu_isa_supported(isa):
            with pytest.raises(ValueError, match=f"cannot run with {isa} here"):
                cpu_ext.cpu_isa_set(isa)
    previous = cpu_ext.cpu_isa()
    assert cpu_ext.cpu_isa_set("baseline") == previous and cpu_ext.cpu_isa() == "baseline"
