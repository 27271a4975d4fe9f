"""RESNET_FUSED_AUTOTUNE: with autotuning off (0 or 1) each Triton conv launch takes its tile
class's first config and goes straight to the kernel, never through the autotuner (Triton 3.6's
autotuner benchmarks even a single pruned config); a positive N bounds the tuning to the first N
candidates. The GPU run (benchmarks/gpu_check.sh) tests with autotuning off, so
``test_every_config_runs_once`` runs each config the autotuner may choose once, explicitly.

The CPU tests stand in for the kernels with recorders: they check which config a launch would
take and that the autotuned kernel is never called, with no compilation.
"""

from __future__ import annotations

import pytest
import torch

from helpers import act_args
from resnet_fused import guard
from resnet_fused.ops import reference
from resnet_fused.ops.triton import conv_bn_act as triton_op
from resnet_fused.ops.triton import conv_bn_stats

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


class Recorder:
    """Stands in for a Triton kernel: ``kernel[grid](*args, **kwargs)`` records the call."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append(kwargs)


class Forbidden:
    def __getitem__(self, grid):
        raise AssertionError("the autotuned kernel was called with autotuning off")


@pytest.fixture
def compiled_mode(monkeypatch):
    """The launchers as they behave on a GPU (not interpreting), with recorders for kernels."""
    monkeypatch.setattr(triton_op, "_interpreting", lambda: False)
    direct = Recorder()
    monkeypatch.setattr(triton_op, "_conv_bn_act_fwd_kernel", direct)
    monkeypatch.setattr(triton_op, "conv_bn_act_fwd_kernel", Forbidden())
    monkeypatch.setattr(conv_bn_stats, "_conv_bn_stats_fwd_kernel", direct)
    monkeypatch.setattr(conv_bn_stats, "conv_bn_stats_fwd_kernel", Forbidden())
    monkeypatch.setattr(conv_bn_stats, "_conv_bn_stats_finalize_kernel", Recorder())
    return direct


@pytest.mark.parametrize(("value", "limit"), [(None, None), ("", None), ("all", None), ("0", 0), ("1", 1), ("2", 2)])
def test_autotune_limit_parsing(monkeypatch, value, limit):
    if value is None:
        monkeypatch.delenv("RESNET_FUSED_AUTOTUNE", raising=False)
    else:
        monkeypatch.setenv("RESNET_FUSED_AUTOTUNE", value)
    assert triton_op.autotune_limit() == limit


@pytest.mark.parametrize("value", ["0", "1"])
def test_autotune_off_is_one_config_per_tile_class(monkeypatch, value):
    monkeypatch.setattr(triton_op, "_interpreting", lambda: False)
    monkeypatch.setenv("RESNET_FUSED_AUTOTUNE", value)
    for dtype in DTYPES.values():
        for tile_c, tile_k in triton_op.CONFIG_REACHING_TILES:
            config = triton_op.fixed_config(dtype, tile_c, tile_k)
            assert isinstance(config, type(triton_op.gpu_configs(dtype, tile_c, tile_k)[0]))
            assert triton_op._config_id(config) == triton_op._config_id(triton_op.gpu_configs(dtype, tile_c, tile_k)[0])


def test_autotune_on_or_interpreting_leaves_the_autotuner(monkeypatch):
    monkeypatch.setattr(triton_op, "_interpreting", lambda: False)
    for value in ("", "2", "all"):
        monkeypatch.setenv("RESNET_FUSED_AUTOTUNE", value)
        assert triton_op.fixed_config(torch.float16, 64, 64) is None
    monkeypatch.setattr(triton_op, "_interpreting", lambda: True)
    monkeypatch.setenv("RESNET_FUSED_AUTOTUNE", "0")
    assert triton_op.fixed_config(torch.float16, 64, 64) is None


def test_bounded_autotuning_prunes_to_the_first_n(monkeypatch):
    monkeypatch.setattr(triton_op, "_interpreting", lambda: False)
    x = torch.empty(1, dtype=torch.float16)
    wanted = triton_op.gpu_configs(torch.float16, 256, 256)
    assert len(wanted) > 2
    for value, count in (("2", 2), ("", len(wanted))):
        monkeypatch.setenv("RESNET_FUSED_AUTOTUNE", value)
        kept = triton_op._prune_configs(triton_op._ALL_GPU_CONFIGS, {"x_ptr": x, "tile_c": 256, "tile_k": 256})
        assert sorted(map(triton_op._config_id, kept)) == sorted(map(triton_op._config_id, wanted[:count]))


@pytest.mark.parametrize(("c", "k", "groups"), [(3, 64, 1), (256, 64, 1), (128, 128, 32)], ids=["stem", "1x1", "grouped"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_launchers_with_autotuning_off_call_the_kernel_once_with_the_fixed_config(compiled_mode, monkeypatch, dtype, c, k, groups):
    monkeypatch.setenv("RESNET_FUSED_AUTOTUNE", "0")
    x = torch.randn(2, c, 6, 6).to(dtype)
    weight = torch.randn(k, c // groups, 3, 3).to(dtype)
    bn = [torch.rand(k) + 0.5 for _ in range(4)]
    tile_c, tile_k, _ = triton_op.group_grid(c, k, groups)
    expected = triton_op.gpu_configs(dtype, tile_c, tile_k)[0]
    conv = ([1, 1], [1, 1], [1, 1], groups)
    triton_op.launch(x, weight, None, *bn, 1e-5, None, *conv, *act_args(True), False)
    conv_bn_stats.launch(x, weight, None, *conv, False)
    assert len(compiled_mode.calls) == 2
    for kwargs in compiled_mode.calls:
        assert {name: kwargs[name] for name in expected.kwargs} == expected.kwargs
        assert (kwargs["num_warps"], kwargs["num_stages"]) == (expected.num_warps, expected.num_stages)


# ---------------------------------------------------------------------------------------------
# On a GPU: every config the autotuner may choose, once, by dtype and kernel.

def _every_config(dtype):
    """Each distinct config gpu_configs can return for ``dtype``, with a (C, K) that reaches it."""
    seen = {}
    for tile_c, tile_k in triton_op.CONFIG_REACHING_TILES:
        for config in triton_op.gpu_configs(dtype, tile_c, tile_k):
            seen.setdefault(triton_op._config_id(config), (config, tile_c, tile_k))
    return list(seen.values())


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["conv_bn_act", "conv_bn_stats"])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_every_config_runs_once(dtype_name, kernel):
    dtype = DTYPES[dtype_name]
    g = torch.Generator().manual_seed(5)
    failures = []
    for config, c, k in _every_config(dtype):
        x = torch.randn(2, c, 9, 7, generator=g).cuda().contiguous(memory_format=torch.channels_last)
        weight = (torch.randn(k, c, 3, 3, generator=g) / (9 * c) ** 0.5).cuda()
        bn = [torch.rand(k, generator=g).cuda() + 0.5, torch.randn(k, generator=g).cuda() * 0.3,
              torch.randn(k, generator=g).cuda() * 0.3, torch.rand(k, generator=g).cuda() + 0.5]
        residual = torch.randn(2, k, 9, 7, generator=g).cuda().contiguous(memory_format=torch.channels_last)
        conv = ([1, 1], [1, 1], [1, 1], 1)
        low = [t.to(dtype) for t in (x, weight, residual)]
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            if kernel == "conv_bn_act":
                fused = triton_op.launch(low[0], low[1], None, *bn, 1e-5, low[2], *conv, *act_args(True), False,
                                         config=config)
                unfused = reference.conv_bn_act(low[0], low[1], None, *bn, residual=low[2], padding=1)
                exact = reference.conv_bn_act(x.double(), weight.double(), None, *(t.double() for t in bn),
                                              residual=residual.double(), padding=1)
            else:
                fused = conv_bn_stats.launch(low[0], low[1], None, *conv, False, config=config)
                y = torch.nn.functional.conv2d(low[0], low[1], padding=1)
                unfused = (y, *reference.bn_stats(y))
                y = torch.nn.functional.conv2d(x.double(), weight.double(), padding=1)
                exact = (y, *reference.bn_stats(y))
        torch.cuda.synchronize()
        if dtype == torch.float32:
            fused_t = fused if isinstance(fused, tuple) else (fused,)
            exact_t = exact if isinstance(exact, tuple) else (exact,)
            errors = [((f.double() - e).abs().max() / e.abs().max()).item() for f, e in zip(fused_t, exact_t)]
            ok, detail = max(errors) < 1e-5, f"relative errors {errors}"
        else:
            ok, _, detail = guard.compare(fused, unfused, exact)
        if not ok:
            failures.append(f"{config} (C={c}, K={k}): {detail}")
    assert not failures, "\n".join(failures)
