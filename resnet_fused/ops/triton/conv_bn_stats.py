"""Triton ``conv_bn_stats``: the training-mode convolution, with BatchNorm batch statistics.

``y = conv2d(x, weight, groups) + bias``, written once in x's dtype and
``shapes.output_memory_format(x)``, together with the per-output-channel mean and *biased* variance
of y over (N, H, W) in fp32: ``reference.bn_stats(y)``, the first kernel of a fused training
unit (``bn_act`` then normalizes with these statistics).

Two launches, deterministic, no atomics:

1. ``_conv_bn_stats_fwd_kernel``: the implicit-GEMM mainloop shared with the inference kernel
   (``implicit_gemm.implicit_gemm_tile``), then an epilogue that adds the bias, stores y and,
   from the same fp32 accumulator (so fp16/bf16 statistics see the unrounded conv output),
   reduces the tile's rows per channel in two passes over the register tile: the mean
   ``hi = Σy/n``, then the deviations ``d = y − hi`` give ``lo = Σd/n`` (what rounding took from
   hi: the tile mean is ``hi + lo`` to about twice fp32's precision) and
   ``M2 = Σd² − (Σd)²/n`` (the corrected two-pass sum of squares around hi + lo). Program
   ``(pid_m, pid_n, pid_g)`` (``implicit_gemm.tile_coordinates``) writes row ``pid_m`` of the partials ``[3, T, K]`` (hi, lo, M2), columns
   of its channel block.
2. ``_conv_bn_stats_finalize_kernel``: per block of channels, Chan et al.'s parallel merge of
   the T tiles in a fixed order (chunks of tiles, count-weighted within a chunk), on the tile
   means' deviations from tile 0's ``hi`` (``(hi_i − hi_0) + lo_i``, exact subtraction of nearby
   values), then ``mean = hi_0 + merged deviation`` and ``var = M2 / M``. The statistics are
   never formed as E[y²] − E[y]² from raw sums, which cancels catastrophically when
   |mean| ≫ std; and the tile means are never rounded to one fp32 each, which costs
   ~|mean|/std · 1e-7 relative in the variance (measured: 5e-4 at mean 1000, std 0.07; with
   hi/lo, ~1e-7).

Partials sizing. The number of M-tiles depends on the BLOCK_M the autotuner picks, which the
launcher does not know before the launch. The partials are allocated for the smallest BLOCK_M
among all configs the kernel was built with (``min_block_m``), an upper bound on the tile
count whichever config runs, and the conv kernel records the BLOCK_M it actually ran with in a
one-element header. The finalize kernel reads that header and derives every tile's row count
``min(BLOCK_M, M − t·BLOCK_M)`` and the number of tiles from it; rows past the last tile (left
unwritten, or stale from an autotuner benchmark run with a smaller tile) are masked off and
never read. No memset is needed.

Autotuning uses the inference kernel's configs (``conv_bn_act.gpu_configs``) and pruning: every
one also compiles for sm_90 without spills with the statistics epilogue
(tests/codegen/test_training_sm90.py).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .. import fakes
from ..shapes import empty_output, span
from . import conv_bn_act as _conv
from .implicit_gemm import implicit_gemm_tile, tile_coordinates

INT32_MAX = 2**31 - 1

# Finalize kernel tiles: channels per program and tiles merged per loop step.
_FIN_BLOCK_K = 32
_FIN_BLOCK_T = 64


@triton.jit
def _conv_bn_stats_fwd_kernel(
    x_ptr,  # input (N, C, H, W), any strides; channels_last from the launcher
    w_ptr,  # weight (K, C/groups, R, S), any strides; (K, R, S, C/groups) in memory from the launcher
    bias_ptr,  # (K,) contiguous conv bias, any float dtype; read only when HAS_BIAS
    y_ptr,  # output y (N, K, P, Q), any strides; channels_last from the launcher
    hi_part_ptr,  # [T, K] fp32 contiguous, T ≥ cdiv(M, BLOCK_M): row pid_m ← tile mean, rounded: Σy/n
    lo_part_ptr,  # [T, K] fp32 contiguous: row pid_m ← tile mean − hi: Σ(y − hi)/n
    m2_part_ptr,  # [T, K] fp32 contiguous: row pid_m ← Σ(y − tile mean)² over the tile
    tile_rows_ptr,  # (1,) int32: ← BLOCK_M, the rows per tile of this launch (written by program (0, 0))
    M,  # N·P·Q output pixels; an i64 argument when it passes 2**31
    N, C, H, W, K, P, Q,
    tile_c,  # input channels per group tile (implicit_gemm_tile); C when ungrouped
    tile_k,  # output channels per group tile; K when ungrouped
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    sx_n, sx_c, sx_h, sx_w,
    sw_k, sw_c, sw_r, sw_s,
    sy_n, sy_k, sy_p, sy_q,
    R: tl.constexpr,
    S: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    GROUP_TILE: tl.constexpr,  # groups per program (implicit_gemm.group_tile)
    INPUT_PRECISION: tl.constexpr,  # "ieee" or "tf32"; only consulted for fp32 operands
    USE_INT64: tl.constexpr,  # some tensor spans more than 2**31-1 elements
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    acc, offs_m, offs_k, mask_m, mask_k, n, p, q = implicit_gemm_tile(
        x_ptr, w_ptr, M, H, W, K, P, Q, tile_c, tile_k,
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
        sx_n, sx_c, sx_h, sx_w, sw_k, sw_c, sw_r, sw_s,
        R, S, GROUP_TILE, INPUT_PRECISION, USE_INT64, BLOCK_M, BLOCK_N, BLOCK_C,
    )
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)[None, :]
    y_rows = n * sy_n + p * sy_p + q * sy_q
    tl.store(
        y_ptr + y_rows[:, None] + offs_k[None, :] * sy_k,
        acc.to(y_ptr.dtype.element_ty),
        mask=mask_m[:, None] & mask_k[None, :],
    )

    # The tile's statistics per channel, from the fp32 accumulator: its mean, then a second
    # pass over the registers for the deviations from it (not Σy² − n·mean²).
    pid_m, _, _ = tile_coordinates(K, tile_k)
    first_program = (tl.program_id(0) == 0) & (tl.program_id(1) == 0)
    if USE_INT64:
        pid_m = pid_m.to(tl.int64)
    rows = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(tl.float32)
    hi = tl.div_rn(tl.sum(tl.where(mask_m[:, None], acc, 0.0), axis=0), rows)
    dev = tl.where(mask_m[:, None], acc - hi[None, :], 0.0)
    dev_sum = tl.sum(dev, axis=0)
    lo = tl.div_rn(dev_sum, rows)
    m2 = tl.sum(dev * dev, axis=0) - dev_sum * lo
    row = pid_m * K + offs_k
    tl.store(hi_part_ptr + row, hi, mask=mask_k)
    tl.store(lo_part_ptr + row, lo, mask=mask_k)
    tl.store(m2_part_ptr + row, m2, mask=mask_k)
    if first_program:
        tl.store(tile_rows_ptr, tl.full((), BLOCK_M, tl.int32))


@triton.jit
def _conv_bn_stats_finalize_kernel(
    hi_part_ptr,  # [T, K] fp32 contiguous: per-(M-tile, channel) mean, rounded; rows ≥ the tile count unread
    lo_part_ptr,  # [T, K] fp32 contiguous: per-(M-tile, channel) mean − hi
    m2_part_ptr,  # [T, K] fp32 contiguous: per-(M-tile, channel) Σ(y − tile mean)²
    tile_rows_ptr,  # (1,) int32: BLOCK_M of the conv launch that wrote the partials
    mean_ptr,  # (K,) fp32 contiguous: ← batch mean
    var_ptr,  # (K,) fp32 contiguous: ← biased batch variance
    M,  # rows reduced per channel (N·P·Q)
    K,
    T,  # rows allocated in the partials
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Chan, Golub & LeVeque's pairwise update, one chunk of BLOCK_T tiles at a time.

    It runs on shifted means μ_i = (hi_i − hi_0) + lo_i (tile i's mean minus tile 0's rounded
    mean: small numbers, so nothing of the spread is lost to the magnitude of the mean).
    A chunk of tiles i with counts n_i, means μ_i and M2_i combines into
    ``n_c = Σ n_i``, ``μ_c = Σ n_i·μ_i / n_c``, ``M2_c = Σ (M2_i + n_i·(μ_i − μ_c)²)``;
    the running total (n_a, μ_a, M2_a) absorbs it with δ = μ_c − μ_a, n = n_a + n_c:
    ``μ = μ_a + δ·n_c/n``, ``M2 = M2_a + M2_c + δ²·n_a·n_c/n``. Finally
    ``mean = hi_0 + μ`` and ``var = M2/M``.
    """
    pid = tl.program_id(0)
    offs_k = pid * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    tile_rows = tl.load(tile_rows_ptr).to(tl.int64)
    shift = tl.load(hi_part_ptr + offs_k, mask=mask_k, other=0.0)  # hi of tile 0: M ≥ 1, so it exists
    n_a = tl.zeros((BLOCK_K,), dtype=tl.float32)
    mean_a = tl.zeros((BLOCK_K,), dtype=tl.float32)
    m2_a = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for start in range(0, T, BLOCK_T):
        tiles = start + tl.arange(0, BLOCK_T)
        # Rows in each tile: BLOCK_M, fewer in the last tile, none past it.
        count = tl.minimum(tl.maximum(M - tiles.to(tl.int64) * tile_rows, 0), tile_rows).to(tl.float32)
        mask = (count > 0.0)[:, None] & mask_k[None, :]
        offsets = tiles.to(tl.int64)[:, None] * K + offs_k[None, :]
        hi_i = tl.load(hi_part_ptr + offsets, mask=mask, other=0.0)
        lo_i = tl.load(lo_part_ptr + offsets, mask=mask, other=0.0)
        mean_i = tl.where(mask, (hi_i - shift[None, :]) + lo_i, 0.0)
        m2_i = tl.load(m2_part_ptr + offsets, mask=mask, other=0.0)
        n_i = count[:, None]
        n_c = tl.sum(count, axis=0)
        mean_c = tl.div_rn(tl.sum(n_i * mean_i, axis=0), tl.maximum(n_c, 1.0))
        dev = tl.where(mask, mean_i - mean_c[None, :], 0.0)
        m2_c = tl.sum(m2_i + n_i * dev * dev, axis=0)
        n = n_a + n_c
        delta = mean_c - mean_a
        weight = tl.div_rn(n_c + tl.zeros_like(n), tl.maximum(n, 1.0))  # n_c/n; 0 for an empty chunk
        mean_a = mean_a + delta * weight
        m2_a = m2_a + m2_c + delta * delta * n_a * weight
        n_a = n
    tl.store(mean_ptr + offs_k, shift + mean_a, mask=mask_k)
    tl.store(var_ptr + offs_k, tl.div_rn(m2_a, n_a), mask=mask_k)


# The stats conv's configs: the inference kernel's. Every one compiles for sm_90 without spills
# with the statistics epilogue too (its column reductions cost fewer registers than the BN
# epilogue's replicated per-channel vectors), so no separate list is needed.
gpu_configs = _conv.gpu_configs
GPU_CONFIGS = _conv._ALL_GPU_CONFIGS

conv_bn_stats_fwd_kernel = triton.autotune(
    configs=_conv._INTERPRETER_CONFIGS if _conv._interpreting() else GPU_CONFIGS,
    # As the inference kernel's key, less the residual it has no use for.
    key=["C", "K", "tile_c", "tile_k", "P", "Q", "R", "S", "stride_h", "stride_w", "INPUT_PRECISION"],
    prune_configs_by={"early_config_prune": _conv._prune_configs},
)(_conv_bn_stats_fwd_kernel)


def min_block_m(configs) -> int:
    """The smallest BLOCK_M among ``configs``: partials sized for it hold the tiles of any."""
    return min(config.kwargs["BLOCK_M"] for config in configs)


def _empty_partials(tiles: int, k: int, device) -> torch.Tensor:
    """(3, tiles, K) fp32: tile means' hi and lo parts, then tile M2s. Left uninitialized (tests fill it with NaN
    to prove no row outside the launch's tiles is read)."""
    return torch.empty((3, tiles, k), dtype=torch.float32, device=device)


@torch.library.custom_op("resnet_fused::conv_bn_stats_triton", mutates_args=())
def conv_bn_stats_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    allow_tf32: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y, mean, var)``: ``y = conv2d(x, weight, groups) + bias`` in x's dtype and memory
    format, and y's per-channel batch mean and biased variance in fp32, shape (K,).

    Arguments are assumed validated (as for conv_bn_act); x is fp16, bf16 or fp32.
    """
    return launch(x, weight, bias, stride, padding, dilation, groups, allow_tf32)


def launch(x, weight, bias, stride, padding, dilation, groups, allow_tf32, config: triton.Config | None = None):
    """The op's body. ``config`` bypasses the autotuner (tests run every config this way), as
    autotuning switched off does (``conv_bn_act.fixed_config``)."""
    y = empty_output(x, weight, stride, padding, dilation)
    n, c, h, w = x.shape
    k, _, r, s = weight.shape
    _, _, p, q = y.shape
    m = n * p * q
    mean = torch.empty((k,), dtype=torch.float32, device=x.device)
    var = torch.empty((k,), dtype=torch.float32, device=x.device)
    if y.numel() == 0:
        # No rows: the mean and variance of nothing are NaN, as torch.var_mean says.
        return y, mean.fill_(float("nan")), var.fill_(float("nan"))
    x_cl = x.contiguous(memory_format=torch.channels_last)
    weight_cl = weight.contiguous(memory_format=torch.channels_last)
    y_cl = y if y.is_contiguous(memory_format=torch.channels_last) else torch.empty_like(y, memory_format=torch.channels_last)
    tile_c, tile_k, tiles_per_group = _conv.group_grid(c, k, groups)
    config = config if config is not None else _conv.fixed_config(x.dtype, tile_c, tile_k)
    # Sized before the autotuner picks a config: for the smallest tile any config may use.
    tiles = triton.cdiv(m, min_block_m([config] if config is not None else conv_bn_stats_fwd_kernel.configs))
    partials = _empty_partials(tiles, k, x.device)
    tile_rows = torch.empty((1,), dtype=torch.int32, device=x.device)
    use_int64 = max(span(t) for t in (x_cl, weight_cl, y_cl, partials)) > INT32_MAX
    args = (
        x_cl, weight_cl, bias.contiguous() if bias is not None else mean, y_cl, *partials, tile_rows,
        m, n, c, h, w, k, p, q, tile_c, tile_k,
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        *x_cl.stride(), *weight_cl.stride(), *y_cl.stride(),
    )
    flags = dict(
        R=r,
        S=s,
        HAS_BIAS=bias is not None,
        GROUP_TILE=tiles_per_group,
        INPUT_PRECISION="tf32" if (allow_tf32 and x.dtype == torch.float32) else "ieee",
        USE_INT64=use_int64,
    )
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * (k // tile_k), triton.cdiv(tile_k, meta["BLOCK_N"]))  # noqa: E731
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        if config is None:
            conv_bn_stats_fwd_kernel[grid](*args, **flags)
        else:
            _conv_bn_stats_fwd_kernel[grid](
                *args, **flags, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages
            )
        _conv_bn_stats_finalize_kernel[(triton.cdiv(k, _FIN_BLOCK_K),)](
            *partials, tile_rows, mean, var, m, k, partials.shape[1],
            BLOCK_T=_FIN_BLOCK_T, BLOCK_K=_FIN_BLOCK_K, num_warps=4,
        )
    if y_cl is not y:
        y.copy_(y_cl)
    return y, mean, var


conv_bn_stats_triton.register_fake(fakes.conv_bn_stats)
