"""Triton ``bn_act``: the BatchNorm(+residual)(+activation) half of a fused training unit.

The ops, in math (per channel k, over the M = N·H·W values of y (N, K, H, W) in channel k;
``reference.py`` holds the same in plain torch, the specification):

- ``bn_act_apply_triton``: ``out = act(γ·(y − μ)·invstd + β [+ residual])``, invstd = 1/√(σ²+ε).
- ``bn_act_backward_reduce_triton``: ``(Σ g, Σ g·x̂)``, g = ∂L/∂z (z the pre-activation,
  ``activation.act_grad``), x̂ = (y − μ)·invstd: dβ and dγ.
- ``bn_act_backward_apply_triton``: ``(dy, d_residual)`` with batch statistics (training) or
  constant running statistics (eval), see ``_bn_act_bwd_kernel``.
- ``bn_update_running_stats_triton_``: the momentum step of the running statistics, in place.

Layout: every activation is addressed through its strides as a 3-D ``[N, K, L]`` view
(L = H·W, ``t.flatten(2)``), tile ``[BLOCK_L, BLOCK_K]`` per program, one image per program. Both
contiguous NCHW (L stride 1) and channels_last (K stride 1) are such views, so neither is copied:
the JIT specializes the unit stride and the loads vectorize along it. Only a tensor whose H and
W cannot merge into one stride (an odd view) is copied by ``flatten``. Outputs are allocated in
``shapes.output_memory_format(y)``: channels_last when y is, contiguous otherwise.

All math is fp32 in registers (per-channel inputs of any float dtype are converted on load),
with correctly rounded sqrt and division. Reductions are deterministic: each program writes its
partial sums to its own row of a partials buffer and a second kernel adds the rows in a fixed
order. No atomics.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .. import fakes
from ..activation import check_code
from ..shapes import empty_like_activation, span
from .activation import act, act_grad

INT32_MAX = 2**31 - 1

# Elements per tile (BLOCK_L × BLOCK_K) and warps: memory-bound kernels, so a tile just large
# enough to keep loads in flight. BLOCK_K ≤ 64 channels; BLOCK_L takes the rest. 8 warps: at 4
# warps some kernels spill on sm_90 (bf16 apply; the backward reduce at 8192 elements), at 8 none
# does and the backward reduce needs at most 128 registers (tests/codegen/test_training_sm90.py).
_TILE_ELEMENTS = 4096
_MAX_BLOCK_K = 64
_NUM_WARPS = 8
# Backward reduce: each program walks this many L-tiles before writing its partial row, so the
# partials stay small (T = N · cdiv(L, BLOCK_L·_REDUCE_STEPS) rows).
_REDUCE_STEPS = 8
# Partials sum: tile rows summed per loop step, channels per program.
_SUM_BLOCK_T = 64
_SUM_BLOCK_K = 32


# ---------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _tile_index(pid_l, L, K, USE_INT64: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr):
    """Row and channel indices of L-tile ``pid_l`` and channel block ``program_id(1)``."""
    pid_k = tl.program_id(1)
    if USE_INT64:
        pid_l = pid_l.to(tl.int64)
        pid_k = pid_k.to(tl.int64)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    return offs_l, offs_k, offs_l < L, offs_k < K


@triton.jit
def _inv_std(var_ptr, offs_k, mask_k, eps):
    """1/√(σ²+ε) per channel, fp32, correctly rounded (as torch computes it)."""
    var = tl.load(var_ptr + offs_k, mask=mask_k, other=1.0).to(tl.float32)
    return tl.div_rn(tl.full(var.shape, 1.0, tl.float32), tl.sqrt_rn(var + eps))


@triton.jit
def _normalize(y, mean_ptr, var_ptr, gamma_ptr, beta_ptr, offs_k, mask_k, eps, HAS_GAMMA: tl.constexpr,
               HAS_BETA: tl.constexpr):
    """``y·scale + shift`` in fp32, scale = γ·invstd, shift = β − μ·scale: the pre-activation
    without residual, as the forward computes it (the backward recomputes it with this too)."""
    scale = _inv_std(var_ptr, offs_k, mask_k, eps)
    if HAS_GAMMA:
        scale = scale * tl.load(gamma_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
    shift = -tl.load(mean_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32) * scale
    if HAS_BETA:
        shift = shift + tl.load(beta_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
    return y.to(tl.float32) * scale[None, :] + shift[None, :]


@triton.jit
def _bn_act_fwd_kernel(
    y_ptr,  # y (N, K, L) any strides (NCHW or channels_last flattened over H·W), fp16/bf16/fp32
    res_ptr,  # residual (N, K, L) any strides, any float dtype; read only when HAS_RESIDUAL
    out_ptr,  # output (N, K, L) any strides, y's dtype; written once
    mean_ptr,  # (K,) contiguous batch (or running) mean, any float dtype
    var_ptr,  # (K,) contiguous batch (or running) variance, any float dtype
    gamma_ptr,  # (K,) contiguous BatchNorm weight; read only when HAS_GAMMA
    beta_ptr,  # (K,) contiguous BatchNorm bias; read only when HAS_BETA
    eps,  # fp32
    act_a, act_b,  # fp32 activation parameters (activation.act)
    K, L,
    LB,  # L-tiles per image: cdiv(L, BLOCK_L)
    sy_n, sy_k, sy_l,
    sr_n, sr_k, sr_l,
    so_n, so_k, so_l,
    HAS_GAMMA: tl.constexpr,
    HAS_BETA: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    ACT: tl.constexpr,  # activation.Kind
    USE_INT64: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``out = act(y·scale + shift [+ residual])``, scale = γ·invstd, shift = β − μ·scale."""
    pid = tl.program_id(0)
    n = pid // LB
    offs_l, offs_k, mask_l, mask_k = _tile_index(pid % LB, L, K, USE_INT64, BLOCK_L, BLOCK_K)
    if USE_INT64:
        n = n.to(tl.int64)
    mask = mask_l[:, None] & mask_k[None, :]
    y = tl.load(y_ptr + n * sy_n + offs_l[:, None] * sy_l + offs_k[None, :] * sy_k, mask=mask, other=0.0)
    z = _normalize(y, mean_ptr, var_ptr, gamma_ptr, beta_ptr, offs_k, mask_k, eps, HAS_GAMMA, HAS_BETA)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + n * sr_n + offs_l[:, None] * sr_l + offs_k[None, :] * sr_k, mask=mask, other=0.0)
        z = z + r.to(tl.float32)
    z = act(z, ACT, act_a, act_b)
    tl.store(out_ptr + n * so_n + offs_l[:, None] * so_l + offs_k[None, :] * so_k,
             z.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bn_act_bwd_reduce_kernel(
    grad_ptr,  # grad_out (N, K, L) any strides, y's dtype
    out_ptr,  # forward output (N, K, L) any strides; read only when ACT is ReLU (mask out <= 0)
    y_ptr,  # forward input y (N, K, L) any strides
    mean_ptr,  # (K,) contiguous batch mean, any float dtype
    var_ptr,  # (K,) contiguous batch variance, any float dtype
    gamma_ptr,  # (K,) contiguous BatchNorm weight; read only when HAS_GAMMA and ACT needs z
    beta_ptr,  # (K,) contiguous BatchNorm bias; read only when HAS_BETA and ACT needs z
    part_g_ptr,  # [T, K] fp32 contiguous, T = N·LS: row pid_0 ← this program's Σ g
    part_gx_ptr,  # [T, K] fp32 contiguous: row pid_0 ← this program's Σ g·x̂
    eps,  # fp32
    act_a, act_b,  # fp32 activation parameters (activation.act_grad)
    K, L,
    LS,  # programs per image along L; program (n·LS + s) covers L-tiles s·STEPS … s·STEPS + STEPS − 1
    sg_n, sg_k, sg_l,
    so_n, so_k, so_l,
    sy_n, sy_k, sy_l,
    HAS_GAMMA: tl.constexpr,
    HAS_BETA: tl.constexpr,
    ACT: tl.constexpr,  # activation.Kind
    USE_INT64: tl.constexpr,
    STEPS: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Per-program partial sums of dβ = Σ g and dγ = Σ g·x̂, g = ∂L/∂z = act'·grad_out
    (``activation.act_grad``: from the output for ReLU, from z = γ·x̂ + β recomputed from y for
    the kinds that need z), x̂ = (y − μ)·invstd (the normalized input, recomputed from y, not
    stored)."""
    pid = tl.program_id(0)
    n = pid // LS
    split = pid % LS
    if USE_INT64:
        n = n.to(tl.int64)
    offs_l, offs_k, mask_l, mask_k = _tile_index(split * STEPS, L, K, USE_INT64, BLOCK_L, BLOCK_K)
    invstd = _inv_std(var_ptr, offs_k, mask_k, eps)
    mean = tl.load(mean_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
    acc_g = tl.zeros((BLOCK_L, BLOCK_K), dtype=tl.float32)
    acc_gx = tl.zeros((BLOCK_L, BLOCK_K), dtype=tl.float32)
    for _ in range(STEPS):
        mask = (offs_l < L)[:, None] & mask_k[None, :]
        g = tl.load(grad_ptr + n * sg_n + offs_l[:, None] * sg_l + offs_k[None, :] * sg_k, mask=mask, other=0.0)
        y = tl.load(y_ptr + n * sy_n + offs_l[:, None] * sy_l + offs_k[None, :] * sy_k, mask=mask, other=0.0)
        g = _grad_z(g.to(tl.float32), out_ptr, n * so_n + offs_l[:, None] * so_l + offs_k[None, :] * so_k, mask, y,
                    mean_ptr, var_ptr, gamma_ptr, beta_ptr, offs_k, mask_k, eps, act_a, act_b, HAS_GAMMA, HAS_BETA,
                    ACT)
        xhat = (y.to(tl.float32) - mean[None, :]) * invstd[None, :]
        acc_g += g
        acc_gx += tl.where(mask, g * xhat, 0.0)
        offs_l += BLOCK_L
    row = pid * K
    if USE_INT64:
        row = pid.to(tl.int64) * K
    tl.store(part_g_ptr + row + offs_k, tl.sum(acc_g, axis=0), mask=mask_k)
    tl.store(part_gx_ptr + row + offs_k, tl.sum(acc_gx, axis=0), mask=mask_k)


@triton.jit
def _grad_z(g, out_ptr, out_offsets, mask, y, mean_ptr, var_ptr, gamma_ptr, beta_ptr, offs_k, mask_k, eps, act_a,
            act_b, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, ACT: tl.constexpr):
    """g = ∂L/∂z from g = ∂L/∂out: ReLU reads its mask from the output; the kinds past ReLU
    (Hardtanh, LeakyReLU, SiLU, Hardswish: activation.Activation.needs_preactivation) recompute
    z from y, which is the whole pre-activation because they come without a residual."""
    if ACT == 1:
        o = tl.load(out_ptr + out_offsets, mask=mask, other=0.0)
        g = act_grad(g, o.to(tl.float32), ACT, act_a, act_b)
    elif ACT > 1:
        z = _normalize(y, mean_ptr, var_ptr, gamma_ptr, beta_ptr, offs_k, mask_k, eps, HAS_GAMMA, HAS_BETA)
        g = act_grad(g, z, ACT, act_a, act_b)
    return g


@triton.jit
def _bn_partials_sum_kernel(
    part_g_ptr,  # [T, K] fp32 contiguous: per-program partial Σ g
    part_gx_ptr,  # [T, K] fp32 contiguous: per-program partial Σ g·x̂
    sum_g_ptr,  # (K,) fp32 ← Σ g
    sum_gx_ptr,  # (K,) fp32 ← Σ g·x̂
    T, K,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Column sums of the partials in a fixed order: the same bits on every run."""
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    acc_g = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    acc_gx = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    for start in range(0, T, BLOCK_T):
        rows = start + tl.arange(0, BLOCK_T)
        mask = (rows < T)[:, None] & mask_k[None, :]
        offsets = rows.to(tl.int64)[:, None] * K + offs_k[None, :]
        acc_g += tl.load(part_g_ptr + offsets, mask=mask, other=0.0)
        acc_gx += tl.load(part_gx_ptr + offsets, mask=mask, other=0.0)
    tl.store(sum_g_ptr + offs_k, tl.sum(acc_g, axis=0), mask=mask_k)
    tl.store(sum_gx_ptr + offs_k, tl.sum(acc_gx, axis=0), mask=mask_k)


@triton.jit
def _bn_act_bwd_kernel(
    grad_ptr,  # grad_out (N, K, L) any strides, y's dtype
    out_ptr,  # forward output (N, K, L) any strides; read only when ACT is ReLU (mask out <= 0)
    y_ptr,  # forward input y (N, K, L) any strides; read only when TRAINING or ACT needs z
    mean_ptr,  # (K,) contiguous mean used in the forward, any float dtype; read only when TRAINING or ACT needs z
    var_ptr,  # (K,) contiguous variance used in the forward, any float dtype
    gamma_ptr,  # (K,) contiguous BatchNorm weight; read only when HAS_GAMMA
    beta_ptr,  # (K,) contiguous BatchNorm bias; read only when HAS_BETA and ACT needs z
    sum_g_ptr,  # (K,) contiguous Σ g (bn_act_backward_reduce); read only when TRAINING
    sum_gx_ptr,  # (K,) contiguous Σ g·x̂; read only when TRAINING
    dy_ptr,  # dy (N, K, L) any strides, y's dtype; written once
    dres_ptr,  # d_residual (N, K, L) any strides, y's dtype; written only when RESIDUAL_GRAD
    eps,  # fp32
    count,  # fp32: M, the values per channel the batch statistics were taken over
    act_a, act_b,  # fp32 activation parameters (activation.act_grad)
    K, L,
    LB,  # L-tiles per image: cdiv(L, BLOCK_L)
    sg_n, sg_k, sg_l,
    so_n, so_k, so_l,
    sy_n, sy_k, sy_l,
    sd_n, sd_k, sd_l,
    sr_n, sr_k, sr_l,
    HAS_GAMMA: tl.constexpr,
    HAS_BETA: tl.constexpr,
    TRAINING: tl.constexpr,
    ACT: tl.constexpr,  # activation.Kind
    RESIDUAL_GRAD: tl.constexpr,
    USE_INT64: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """dy and d_residual of ``out = act(z)``, z = γ·x̂ + β [+ r], x̂ = (y − μ)·invstd.

    g = ∂L/∂z = act'(z)·grad_out (``_grad_z``: ReLU's act' is [out > 0], the others' need z,
    recomputed from y); d_residual = g.
    ∂L/∂x̂ = γ·g. In eval, μ and σ² are constants: ``dy = γ·invstd·g``.
    In training, μ = Σy/M and σ² = Σ(y − μ)²/M depend on every y of the channel:
    ∂x̂_j/∂y_i = invstd·(δ_ij − 1/M − x̂_i·x̂_j/M), so
    ``dy_i = invstd·Σ_j γ·g_j·∂x̂_j/∂y_i = γ·invstd·(g_i − Σg/M − x̂_i·Σ(g·x̂)/M)``
    with Σg and Σ(g·x̂) from ``_bn_act_bwd_reduce_kernel`` (dβ and dγ).
    """
    pid = tl.program_id(0)
    n = pid // LB
    offs_l, offs_k, mask_l, mask_k = _tile_index(pid % LB, L, K, USE_INT64, BLOCK_L, BLOCK_K)
    if USE_INT64:
        n = n.to(tl.int64)
    mask = mask_l[:, None] & mask_k[None, :]
    invstd = _inv_std(var_ptr, offs_k, mask_k, eps)
    scale = invstd
    if HAS_GAMMA:
        scale = scale * tl.load(gamma_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
    g = tl.load(grad_ptr + n * sg_n + offs_l[:, None] * sg_l + offs_k[None, :] * sg_k, mask=mask, other=0.0)
    g = g.to(tl.float32)
    if TRAINING or ACT > 1:
        y = tl.load(y_ptr + n * sy_n + offs_l[:, None] * sy_l + offs_k[None, :] * sy_k, mask=mask, other=0.0)
        y = y.to(tl.float32)
    else:
        y = g  # unread: neither constant statistics nor ReLU/identity need y
    g = _grad_z(g, out_ptr, n * so_n + offs_l[:, None] * so_l + offs_k[None, :] * so_k, mask, y,
                mean_ptr, var_ptr, gamma_ptr, beta_ptr, offs_k, mask_k, eps, act_a, act_b, HAS_GAMMA, HAS_BETA, ACT)
    if RESIDUAL_GRAD:
        tl.store(dres_ptr + n * sr_n + offs_l[:, None] * sr_l + offs_k[None, :] * sr_k,
                 g.to(dres_ptr.dtype.element_ty), mask=mask)
    dy = g
    if TRAINING:
        mean = tl.load(mean_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        mean_g = tl.div_rn(tl.load(sum_g_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32), count)
        mean_gx = tl.div_rn(tl.load(sum_gx_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32), count)
        xhat = (y.to(tl.float32) - mean[None, :]) * invstd[None, :]
        dy = dy - mean_g[None, :] - xhat * mean_gx[None, :]
    dy = dy * scale[None, :]
    tl.store(dy_ptr + n * sd_n + offs_l[:, None] * sd_l + offs_k[None, :] * sd_k,
             dy.to(dy_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bn_running_stats_kernel(
    running_mean_ptr,  # (K,) strided by s_rm, any float dtype; updated in place
    running_var_ptr,  # (K,) strided by s_rv, any float dtype; updated in place
    mean_ptr,  # (K,) contiguous batch mean, any float dtype
    var_ptr,  # (K,) contiguous biased batch variance, any float dtype
    K,
    s_rm, s_rv,
    momentum,  # fp32
    unbias,  # fp32: M/(M − 1), biased → unbiased variance
    BLOCK_K: tl.constexpr,
):
    """``running ← lerp(running, batch, momentum)`` with torch.lerp's formula (the end-anchored
    form for weights ≥ 0.5); the batch variance enters unbiased."""
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = offs_k < K
    rm = tl.load(running_mean_ptr + offs_k * s_rm, mask=mask, other=0.0)
    rv = tl.load(running_var_ptr + offs_k * s_rv, mask=mask, other=0.0)
    mean = tl.load(mean_ptr + offs_k, mask=mask, other=0.0).to(rm.dtype).to(tl.float32)
    var = (tl.load(var_ptr + offs_k, mask=mask, other=0.0).to(tl.float32) * unbias).to(rv.dtype).to(tl.float32)
    small = tl.abs(momentum) < 0.5
    rm32 = rm.to(tl.float32)
    rv32 = rv.to(tl.float32)
    new_rm = tl.where(small, rm32 + momentum * (mean - rm32), mean - (mean - rm32) * (1.0 - momentum))
    new_rv = tl.where(small, rv32 + momentum * (var - rv32), var - (var - rv32) * (1.0 - momentum))
    tl.store(running_mean_ptr + offs_k * s_rm, new_rm.to(rm.dtype), mask=mask)
    tl.store(running_var_ptr + offs_k * s_rv, new_rv.to(rv.dtype), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launchers


def _blocks(k: int, length: int) -> tuple[int, int]:
    """(BLOCK_L, BLOCK_K): up to 64 channels, the rest of _TILE_ELEMENTS along L, no wider than
    the image."""
    block_k = min(_MAX_BLOCK_K, triton.next_power_of_2(k))
    block_l = min(_TILE_ELEMENTS // block_k, triton.next_power_of_2(length))
    return block_l, block_k


def _nkl(t: torch.Tensor) -> torch.Tensor:
    """The (N, K, H·W) view of ``t``: no copy for NCHW, channels_last or broadcast tensors."""
    return t.flatten(2)


def _per_channel(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous()


def _use_int64(*tensors) -> bool:
    return max(span(t) for t in tensors) > INT32_MAX


def _device(t: torch.Tensor):
    # Triton launches on the current device; make that the tensor's.
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _check_dtype(y: torch.Tensor) -> None:
    if y.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"y: Triton bn_act ops take float16, bfloat16 or float32, not {y.dtype}")


def apply_launch(y, mean, var, gamma, beta, eps, residual, act, act_a, act_b, blocks=None):
    _check_dtype(y)
    check_code(act)
    out = empty_like_activation(y)
    if out.numel() == 0:
        return out
    n, k, h, w = y.shape
    length = h * w
    block_l, block_k = blocks or _blocks(k, length)
    y3, o3 = _nkl(y), _nkl(out)
    r3 = _nkl(residual) if residual is not None else y3
    mean, var = _per_channel(mean), _per_channel(var)
    lb = triton.cdiv(length, block_l)
    with _device(y):
        _bn_act_fwd_kernel[(n * lb, triton.cdiv(k, block_k))](
            y3, r3, o3, mean, var,
            _per_channel(gamma) if gamma is not None else var,
            _per_channel(beta) if beta is not None else var,
            float(eps), float(act_a), float(act_b), k, length, lb, *y3.stride(), *r3.stride(), *o3.stride(),
            HAS_GAMMA=gamma is not None, HAS_BETA=beta is not None, HAS_RESIDUAL=residual is not None,
            ACT=int(act), USE_INT64=_use_int64(y3, r3, o3), BLOCK_L=block_l, BLOCK_K=block_k,
            num_warps=_NUM_WARPS,
        )
    return out


def _gamma_beta(gamma, beta, fallback):
    """The per-channel pointers of the optional γ, β (``fallback``, unread, where absent)."""
    return (_per_channel(gamma) if gamma is not None else fallback,
            _per_channel(beta) if beta is not None else fallback)


def backward_reduce_launch(grad_out, out, y, mean, var, gamma, beta, eps, act, act_a, act_b, blocks=None,
                           steps=None):
    _check_dtype(y)
    check_code(act)
    n, k, h, w = y.shape
    sum_g = torch.zeros((k,), dtype=torch.float32, device=y.device)
    sum_gx = torch.zeros((k,), dtype=torch.float32, device=y.device)
    if y.numel() == 0:
        return sum_g, sum_gx
    length = h * w
    block_l, block_k = blocks or _blocks(k, length)
    steps = steps or min(_REDUCE_STEPS, triton.cdiv(length, block_l))
    splits = triton.cdiv(length, block_l * steps)
    g3, y3 = _nkl(grad_out), _nkl(y)
    o3 = _nkl(out) if act == 1 else g3  # out is the ReLU mask only
    var = _per_channel(var)
    partials = torch.empty((2, n * splits, k), dtype=torch.float32, device=y.device)
    with _device(y):
        _bn_act_bwd_reduce_kernel[(n * splits, triton.cdiv(k, block_k))](
            g3, o3, y3, _per_channel(mean), var, *_gamma_beta(gamma, beta, var), partials[0], partials[1],
            float(eps), float(act_a), float(act_b), k, length, splits, *g3.stride(), *o3.stride(), *y3.stride(),
            HAS_GAMMA=gamma is not None, HAS_BETA=beta is not None, ACT=int(act),
            USE_INT64=_use_int64(g3, o3, y3, partials), STEPS=steps,
            BLOCK_L=block_l, BLOCK_K=block_k, num_warps=_NUM_WARPS,
        )
        _bn_partials_sum_kernel[(triton.cdiv(k, _SUM_BLOCK_K),)](
            partials[0], partials[1], sum_g, sum_gx, n * splits, k,
            BLOCK_T=_SUM_BLOCK_T, BLOCK_K=_SUM_BLOCK_K, num_warps=_NUM_WARPS,
        )
    return sum_g, sum_gx


def backward_apply_launch(grad_out, out, y, mean, var, gamma, beta, eps, sum_g, sum_g_xhat, count, training, act,
                          act_a, act_b, residual_grad, blocks=None):
    _check_dtype(y)
    check_code(act)
    dy = empty_like_activation(y)
    d_res = empty_like_activation(y) if residual_grad else y.new_empty((0,))
    if y.numel() == 0:
        return dy, d_res
    n, k, h, w = y.shape
    length = h * w
    block_l, block_k = blocks or _blocks(k, length)
    g3, y3, d3 = _nkl(grad_out), _nkl(y), _nkl(dy)
    o3 = _nkl(out) if act == 1 else g3  # out is the ReLU mask only
    r3 = _nkl(d_res) if residual_grad else d3
    var = _per_channel(var)
    lb = triton.cdiv(length, block_l)
    with _device(y):
        _bn_act_bwd_kernel[(n * lb, triton.cdiv(k, block_k))](
            g3, o3, y3, _per_channel(mean), var, *_gamma_beta(gamma, beta, var),
            _per_channel(sum_g), _per_channel(sum_g_xhat), d3, r3,
            float(eps), float(count), float(act_a), float(act_b), k, length, lb,
            *g3.stride(), *o3.stride(), *y3.stride(), *d3.stride(), *r3.stride(),
            HAS_GAMMA=gamma is not None, HAS_BETA=beta is not None, TRAINING=training, ACT=int(act),
            RESIDUAL_GRAD=residual_grad,
            USE_INT64=_use_int64(g3, o3, y3, d3, r3), BLOCK_L=block_l, BLOCK_K=block_k, num_warps=_NUM_WARPS,
        )
    return dy, d_res


# ---------------------------------------------------------------------------------------------
# Ops


@torch.library.custom_op("resnet_fused::bn_act_apply_triton", mutates_args=())
def bn_act_apply_triton(
    y: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor | None,
    act: int,
    act_a: float,
    act_b: float,
) -> torch.Tensor:
    """``reference.bn_act_apply``: ``act((y − mean)/√(var + eps)·γ + β [+ residual])`` in y's
    dtype and memory format; γ/β None mean 1/0; ``(act, act_a, act_b)``: ``Activation.args``."""
    return apply_launch(y, mean, var, gamma, beta, eps, residual, act, act_a, act_b)


bn_act_apply_triton.register_fake(fakes.bn_act_apply)


@torch.library.custom_op("resnet_fused::bn_act_backward_reduce_triton", mutates_args=())
def bn_act_backward_reduce_triton(
    grad_out: torch.Tensor,
    out: torch.Tensor,
    y: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
    eps: float,
    act: int,
    act_a: float,
    act_b: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``reference.bn_act_backward_reduce``: ``(Σ g, Σ g·x̂)`` per channel, fp32 (K,)."""
    return backward_reduce_launch(grad_out, out, y, mean, var, gamma, beta, eps, act, act_a, act_b)


bn_act_backward_reduce_triton.register_fake(fakes.bn_act_backward_reduce)


@torch.library.custom_op("resnet_fused::bn_act_backward_apply_triton", mutates_args=())
def bn_act_backward_apply_triton(
    grad_out: torch.Tensor,
    out: torch.Tensor,
    y: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
    eps: float,
    sum_g: torch.Tensor,
    sum_g_xhat: torch.Tensor,
    count: int,
    training: bool,
    act: int,
    act_a: float,
    act_b: float,
    residual_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``reference.bn_act_backward_apply``: ``(dy, d_residual)`` in y's dtype and memory format;
    d_residual is an empty (0,) tensor unless ``residual_grad``."""
    return backward_apply_launch(grad_out, out, y, mean, var, gamma, beta, eps, sum_g, sum_g_xhat, count, training,
                                 act, act_a, act_b, residual_grad)


bn_act_backward_apply_triton.register_fake(fakes.bn_act_backward_apply)


@torch.library.custom_op("resnet_fused::bn_update_running_stats_triton_", mutates_args=("running_mean", "running_var"))
def bn_update_running_stats_triton_(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    count: int,
    momentum: float,
) -> None:
    """``reference.update_running_stats``, in place: a ``momentum`` step towards the batch mean
    and the unbiased batch variance ``var·count/(count − 1)``."""
    unbias = count / (count - 1)  # count == 1 raises ZeroDivisionError, as the reference does
    k = running_mean.shape[0]
    if k == 0:
        return
    block_k = min(1024, triton.next_power_of_2(k))
    with _device(running_mean):
        _bn_running_stats_kernel[(triton.cdiv(k, block_k),)](
            running_mean, running_var, _per_channel(mean), _per_channel(var), k,
            running_mean.stride(0), running_var.stride(0), float(momentum), float(unbias),
            BLOCK_K=block_k, num_warps=_NUM_WARPS,
        )


bn_update_running_stats_triton_.register_fake(fakes.bn_update_running_stats_)
