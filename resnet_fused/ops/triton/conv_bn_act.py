"""Triton ``conv_bn_act``: convolution + eval-mode BatchNorm (+ residual) + activation in one launch.

Implicit GEMM: rows are output pixels ``m = (n, p, q)`` (M = N·P·Q), columns are output
channels ``k`` (K), and the reduction runs over ``(r, s, c)`` (R·S·C). The input is never
unfolded in memory; each program gathers its ``[BLOCK_M, BLOCK_C]`` input tile straight from
the activation tensor with the padding expressed as a load mask. The mainloop is
``implicit_gemm.implicit_gemm_tile``, shared with the training-mode conv (``conv_bn_stats``).
Grouped convolutions run in the same kernel, over (tiles of) groups too.

Epilogue, per output channel k, in fp32 before the single store, from the live BatchNorm
tensors (nothing is folded or cached outside the kernel, so nothing can go stale):
``scale_k = γ_k/√(σ²_k+ε)``, ``shift_k = β_k + (b_k − μ_k)·scale_k`` (b: the conv bias),
``out = act(acc·scale_k + shift_k [+ residual])``, ``act`` any ``activation.Kind``
(``activation.act``, a constexpr branch: each kind compiles its own kernel).

The kernel addresses every tensor through its strides, but the launcher hands it channels_last
(NHWC) activations and a (K, R, S, C) weight: with the reduction dimension C contiguous the
loads vectorize and become asynchronous copies, while NCHW operands make every config spill
registers on sm_90. NCHW callers pay a layout copy in and out; channels_last models pay nothing.

Inference only: this op has no backward (the fused training path is a separate op).
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from .. import fakes
from ..activation import check_code
from ..shapes import empty_output, span
from .activation import act
from .implicit_gemm import group_tile, implicit_gemm_tile

INT32_MAX = 2**31 - 1

# Tile shapes (BLOCK_M, BLOCK_N, num_warps, num_stages) the autotuner may choose on a GPU, by
# element size. BLOCK_M is a multiple of 64 and num_warps a multiple of 4 so that fp16/bf16 and
# TF32 dots lower to Hopper wgmma; every one compiles for sm_90 without register spills
# (tests/codegen/test_conv_bn_act_sm90.py). No 128x128 tile at 8 warps: its epilogue's per-channel
# vectors, replicated across the MMA layout, push it into spills. fp32 tiles are smaller: IEEE
# fp32 runs on FMA units and holds both operands in registers.
_GPU_TILES = {
    2: ((64, 256, 8, 3), (64, 128, 4, 4), (128, 64, 8, 4), (64, 64, 4, 4)),
    4: ((128, 64, 8, 2), (64, 64, 4, 3)),
}
# Reduction chunk over input channels: 16 for thin inputs (the RGB stem, C=3) so few lanes are
# masked off; otherwise as wide as shared memory allows for the element size.
_BLOCK_C_THIN = 16
_BLOCK_C = {2: 64, 4: 32}
# Tiles narrower than 64 output channels (grouped convs: resnext50_32x4d has 4 to 32 channels
# per group) take BLOCK_N and BLOCK_C from the tile's own channel counts, rounded up to a power
# of two of at least 16, so a 4-group tile of 4-wide groups computes 16x16, not 64x64.
# (BLOCK_M, num_warps, num_stages) by element size; fp32 at 2 stages, since IEEE 64x32x16 at 3
# stages spilled 4 bytes on sm_90 (a ptxas quirk at 80 registers; 2 stages compile clean).
_NARROW_TILES = {2: ((64, 4, 4), (128, 8, 3)), 4: ((64, 4, 2), (128, 8, 2))}
_NARROW_BELOW = 64


def _config(block_m, block_n, block_c, num_warps, num_stages):
    return triton.Config(
        {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_C": block_c},
        num_warps=num_warps,
        num_stages=num_stages,
    )


def _pow2_at_least(n: int, low: int) -> int:
    return max(low, 1 << (n - 1).bit_length())


def gpu_configs(dtype: torch.dtype, tile_c: int, tile_k: int) -> list[triton.Config]:
    """The configs the GPU autotuner may choose for inputs of ``dtype`` when one program reduces
    over ``tile_c`` input channels for ``tile_k`` output channels (C and K when ungrouped)."""
    size = dtype.itemsize
    if tile_k < _NARROW_BELOW:
        block_n = _pow2_at_least(tile_k, 16)
        block_c = min(_pow2_at_least(tile_c, 16), _BLOCK_C[size])
        return [_config(bm, block_n, block_c, w, st) for bm, w, st in _NARROW_TILES[size]]
    block_c = _BLOCK_C_THIN if tile_c <= _BLOCK_C_THIN else _BLOCK_C[size]
    return [_config(bm, bn, block_c, w, st) for bm, bn, w, st in _GPU_TILES[size]]


# (tile_c, tile_k) pairs that between them reach every config gpu_configs can return.
CONFIG_REACHING_TILES = [(c, k) for c in (16, 32, 64) for k in (16, 32, 48, 64)]


def _config_id(config: triton.Config) -> tuple:
    return (*sorted(config.kwargs.items()), config.num_warps, config.num_stages)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# The interpreter runs programs one after another in numpy and ignores warps and stages:
# wide tiles mean fewer sequential steps (resnet50 at 32x32 runs 3x faster than with
# 32x64x64), and a single config skips benchmarking altogether. (Narrower tiles for narrow
# groups measured no faster: the interpreter's cost is per step, not per lane.)
_INTERPRETER_CONFIGS = [_config(32, 128, 128, 4, 1)]
_ALL_GPU_CONFIGS = list({
    _config_id(config): config
    for dtype in (torch.float16, torch.float32)
    for tile_c, tile_k in CONFIG_REACHING_TILES
    for config in gpu_configs(dtype, tile_c, tile_k)
}.values())


def autotune_limit() -> int | None:
    """How many of a tile class's candidate configs the autotuner may try, from the environment
    variable RESNET_FUSED_AUTOTUNE: unset (or not a number), all of them; ``N`` > 0, the first N
    (the lists above are in order of expected merit), for timing runs with a bounded tuning
    cost; ``0`` (or ``1``), none: each launch takes its tile class's first config (``fixed_config``)."""
    value = os.environ.get("RESNET_FUSED_AUTOTUNE", "").strip()
    return int(value) if value.isdigit() else None


def fixed_config(dtype: torch.dtype, tile_c: int, tile_k: int) -> triton.Config | None:
    """The one config a launch uses when autotuning is off (RESNET_FUSED_AUTOTUNE=0 or 1): its
    tile class's first candidate, launched directly, not through the autotuner. Triton 3.6's
    autotuner benchmarks every pruned config whenever the kernel declares more than one, even
    when the pruning leaves one, so pruning alone cannot switch the benchmarking off. None when
    autotuning is on, or under the interpreter (whose autotuner holds a single config)."""
    limit = autotune_limit()
    if _interpreting() or limit is None or limit > 1:
        return None
    return gpu_configs(dtype, tile_c, tile_k)[0]


def _prune_configs(configs, named_args, **kwargs):
    if _interpreting():
        return configs
    candidates = gpu_configs(named_args["x_ptr"].dtype, named_args["tile_c"], named_args["tile_k"])
    limit = autotune_limit()
    if limit is not None:
        # Bounded tuning (timings). A limit of 0 or 1 never gets here through launch(), which
        # then bypasses the autotuner (fixed_config); every config is still run explicitly by
        # the GPU tests through launch(config=).
        candidates = candidates[:max(1, limit)]
    wanted = {_config_id(c) for c in candidates}
    return [c for c in configs if _config_id(c) in wanted]


@triton.jit
def _conv_bn_act_fwd_kernel(
    x_ptr,  # input (N, C, H, W), any strides; channels_last from the launcher
    w_ptr,  # weight (K, C/groups, R, S), any strides; (K, R, S, C/groups) in memory from the launcher
    bias_ptr,  # (K,) contiguous conv bias, any float dtype; read only when HAS_BIAS
    gamma_ptr,  # (K,) contiguous BatchNorm weight; read only when HAS_BN_WEIGHT
    beta_ptr,  # (K,) contiguous BatchNorm bias; read only when HAS_BN_BIAS
    mean_ptr,  # (K,) contiguous BatchNorm running mean
    var_ptr,  # (K,) contiguous BatchNorm running variance
    res_ptr,  # residual (N, K, P, Q), any strides; read only when HAS_RESIDUAL
    out_ptr,  # output (N, K, P, Q), any strides; written once
    eps,  # BatchNorm epsilon (fp32)
    act_a, act_b,  # fp32 activation parameters (activation.act)
    M,  # N·P·Q output pixels; an i64 argument when it passes 2**31
    N, C, H, W, K, P, Q,
    tile_c,  # input channels per group tile (implicit_gemm_tile); C when ungrouped
    tile_k,  # output channels per group tile; K when ungrouped
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    sx_n, sx_c, sx_h, sx_w,
    sw_k, sw_c, sw_r, sw_s,
    sr_n, sr_k, sr_p, sr_q,
    so_n, so_k, so_p, so_q,
    R: tl.constexpr,
    S: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_BN_WEIGHT: tl.constexpr,
    HAS_BN_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    ACT: tl.constexpr,  # activation.Kind
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

    # Eval-mode BatchNorm from its live tensors; the conv bias rides in the shift. Correctly
    # rounded sqrt and division (tl.sqrt is approximate on NVIDIA) match torch.batch_norm and
    # csrc/epilogue.h to the ulp.
    var = tl.load(var_ptr + offs_k, mask=mask_k, other=1.0).to(tl.float32)
    scale = tl.div_rn(tl.full((BLOCK_N,), 1.0, tl.float32), tl.sqrt_rn(var + eps))
    if HAS_BN_WEIGHT:
        scale = scale * tl.load(gamma_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
    centre = -tl.load(mean_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
    if HAS_BIAS:
        centre = centre + tl.load(bias_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
    shift = centre * scale
    if HAS_BN_BIAS:
        shift = shift + tl.load(beta_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
    acc = acc * scale[None, :] + shift[None, :]
    mask_out = mask_m[:, None] & mask_k[None, :]
    if HAS_RESIDUAL:
        res_rows = n * sr_n + p * sr_p + q * sr_q
        residual = tl.load(res_ptr + res_rows[:, None] + offs_k[None, :] * sr_k, mask=mask_out, other=0.0)
        acc = acc + residual.to(tl.float32)
    acc = act(acc, ACT, act_a, act_b)
    out_rows = n * so_n + p * so_p + q * so_q
    tl.store(
        out_ptr + out_rows[:, None] + offs_k[None, :] * so_k,
        acc.to(out_ptr.dtype.element_ty),
        mask=mask_out,
    )


conv_bn_act_fwd_kernel = triton.autotune(
    configs=_INTERPRETER_CONFIGS if _interpreting() else _ALL_GPU_CONFIGS,
    # Everything that changes the code path or the per-image work; dtypes are added by Triton
    # itself. Not the batch: a config tuned at batch 64 serves batch 256 without retuning.
    key=["C", "K", "tile_c", "tile_k", "P", "Q", "R", "S", "stride_h", "stride_w", "HAS_RESIDUAL", "INPUT_PRECISION"],
    prune_configs_by={"early_config_prune": _prune_configs},
)(_conv_bn_act_fwd_kernel)


@torch.library.custom_op("resnet_fused::conv_bn_act_triton", mutates_args=())
def conv_bn_act_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    bn_weight: torch.Tensor | None,
    bn_bias: torch.Tensor | None,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    act: int,
    act_a: float,
    act_b: float,
    allow_tf32: bool,
) -> torch.Tensor:
    """``act(bn(conv(x, weight, groups) + bias) [+ residual])`` with eval-mode BatchNorm, one launch.

    Arguments are assumed validated (functional.check_conv_bn_act).
    """
    return launch(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps, residual,
                  stride, padding, dilation, groups, act, act_a, act_b, allow_tf32)


def group_grid(c: int, k: int, groups: int) -> tuple[int, int, int]:
    """``(tile_c, tile_k, GROUP_TILE)`` for a conv with ``c`` input and ``k`` output channels:
    the channels of one group tile (implicit_gemm_tile), and how many groups that is."""
    tile = group_tile(groups, c // groups, k // groups)
    return tile * (c // groups), tile * (k // groups), tile


def launch(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps, residual,
           stride, padding, dilation, groups, act, act_a, act_b, allow_tf32,
           config: triton.Config | None = None) -> torch.Tensor:
    """The op's body. ``config`` bypasses the autotuner (tests run every config this way), as
    autotuning switched off does (``fixed_config``)."""
    check_code(act)
    out = empty_output(x, weight, stride, padding, dilation)
    if out.numel() == 0:
        return out
    x_cl = x.contiguous(memory_format=torch.channels_last)
    weight_cl = weight.contiguous(memory_format=torch.channels_last)
    res_cl = residual.contiguous(memory_format=torch.channels_last) if residual is not None else None
    out_cl = out if out.is_contiguous(memory_format=torch.channels_last) else torch.empty_like(out, memory_format=torch.channels_last)
    # The kernel indexes per-channel tensors with unit stride; a strided view must be copied.
    per_channel = [t.contiguous() if t is not None else running_mean for t in (bias, bn_weight, bn_bias)]
    n, c, h, w = x.shape
    k, _, r, s = weight.shape
    _, _, p, q = out.shape
    res_arg = res_cl if res_cl is not None else out_cl
    use_int64 = max(span(t) for t in (x_cl, weight_cl, res_arg, out_cl)) > INT32_MAX
    tile_c, tile_k, tiles_per_group = group_grid(c, k, groups)
    args = (
        x_cl, weight_cl, *per_channel, running_mean.contiguous(), running_var.contiguous(), res_arg, out_cl,
        float(eps), float(act_a), float(act_b), n * p * q, n, c, h, w, k, p, q, tile_c, tile_k,
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        *x_cl.stride(), *weight_cl.stride(), *res_arg.stride(), *out_cl.stride(),
    )
    flags = dict(
        R=r,
        S=s,
        HAS_BIAS=bias is not None,
        HAS_BN_WEIGHT=bn_weight is not None,
        HAS_BN_BIAS=bn_bias is not None,
        HAS_RESIDUAL=residual is not None,
        ACT=int(act),
        GROUP_TILE=tiles_per_group,
        INPUT_PRECISION="tf32" if (allow_tf32 and x.dtype == torch.float32) else "ieee",
        USE_INT64=use_int64,
    )
    grid = lambda meta: (triton.cdiv(n * p * q, meta["BLOCK_M"]) * (k // tile_k), triton.cdiv(tile_k, meta["BLOCK_N"]))  # noqa: E731
    config = config if config is not None else fixed_config(x.dtype, tile_c, tile_k)
    # Triton launches on the current device; make that the input's.
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        if config is None:
            conv_bn_act_fwd_kernel[grid](*args, **flags)
        else:
            _conv_bn_act_fwd_kernel[grid](
                *args, **flags, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages
            )
    if out_cl is not out:
        out.copy_(out_cl)
    return out


conv_bn_act_triton.register_fake(fakes.conv_bn_act)
