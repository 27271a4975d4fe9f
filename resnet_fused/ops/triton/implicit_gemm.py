"""The implicit-GEMM convolution mainloop shared by every Triton conv kernel here.

Rows are output pixels ``m = (n, p, q)`` (M = N·P·Q), columns are output channels ``k`` (K),
and the reduction runs over ``(r, s, c)`` (R·S·C). The input is never unfolded in memory; each
program gathers its ``[BLOCK_M, BLOCK_C]`` input tile straight from the activation tensor with
the padding expressed as a load mask.

``implicit_gemm_tile`` is inlined into each caller (``conv_bn_act._conv_bn_act_fwd_kernel``,
the eval-mode fused op, and ``conv_bn_stats._conv_bn_stats_fwd_kernel``, the training-mode
conv with batch statistics), so every kernel gets the same loads, masks and pipelining and
differs only in its epilogue. It is a plain ``@triton.jit`` function of this package's own:
it compiles for sm_90 in tests/codegen/sm90.py's child process like the kernels that call it
(tests/codegen/test_conv_bn_act_sm90.py, tests/codegen/test_training_sm90.py).

Grouped convolutions (ResNeXt) add a group coordinate: program ``(pid_m, pid_n, pid_g)``
works on ``GROUP_TILE`` consecutive groups, i.e. on the ``tile_c`` input channels starting at
``pid_g·tile_c`` and the ``tile_k`` output channels starting at ``pid_g·tile_k`` (an ungrouped
conv is one tile: ``tile_c = C``, ``tile_k = K``). ``pid_g`` shares grid axis 0 with ``pid_m``
(``tile_coordinates``): CUDA caps axes 1 and 2 at 65535, which a depthwise conv's group count
can pass, and consecutive programs then cover every group of the same output rows, whose
input rows they share in L2. A group is often
narrower than the 16 a tensor-core dot needs (resnext50_32x4d's first stage has 4 channels per
group), so the launcher packs several groups into one tile: the filter tile is then
block-diagonal, each output column reading only the input channels of its own group, and
masked-off weights load as zeros. That wastes ``1 − 1/GROUP_TILE`` of the multiply-adds, but a
single narrow group padded to 16x16 would waste more (15/16 for 4-wide groups, against 3/4).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def tile_coordinates(K, tile_k):
    """``(pid_m, pid_n, pid_g)`` of this program: grid axis 0 runs over (M-tile, group tile)
    pairs, the K/tile_k group tiles fastest; axis 1 over BLOCK_N column blocks of a tile."""
    group_tiles = K // tile_k
    pid = tl.program_id(0)
    return pid // group_tiles, tl.program_id(1), pid % group_tiles


@triton.jit
def implicit_gemm_tile(
    x_ptr,  # input (N, C, H, W), any strides; channels_last from the launchers
    w_ptr,  # weight (K, C/groups, R, S), any strides; (K, R, S, C/groups) in memory from the launchers
    M,  # N·P·Q output pixels
    H, W, K, P, Q,
    tile_c,  # input channels per group tile: GROUP_TILE·C/groups (C when ungrouped)
    tile_k,  # output channels per group tile: GROUP_TILE·K/groups (K when ungrouped)
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    sx_n, sx_c, sx_h, sx_w,
    sw_k, sw_c, sw_r, sw_s,
    R: tl.constexpr,
    S: tl.constexpr,
    GROUP_TILE: tl.constexpr,  # groups per program; 1 when ungrouped or when a group fills a tile
    INPUT_PRECISION: tl.constexpr,  # "ieee" or "tf32"; only consulted for fp32 operands
    USE_INT64: tl.constexpr,  # some tensor spans more than 2**31-1 elements
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """This program's ``[BLOCK_M, BLOCK_N]`` tile of ``conv2d(x, w, groups)`` (no bias) in fp32.

    The tile is ``tile_coordinates``'s ``(pid_m, pid_n, pid_g)``. Returns ``(acc, offs_m, offs_k,
    mask_m, mask_k, n, p, q)``: the accumulator, the tile's output-pixel and (global)
    output-channel indices with their bounds masks, and each row's ``(n, p, q)`` for the
    epilogue's addressing. Indices are int64 when ``USE_INT64``.
    """
    pid_m, pid_n, pid_g = tile_coordinates(K, tile_k)
    if USE_INT64:
        # Widen before multiplying: pid_m * BLOCK_M may pass 2**31 itself.
        pid_m = pid_m.to(tl.int64)
        pid_n = pid_n.to(tl.int64)
        pid_g = pid_g.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    local_k = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_g * tile_k + local_k
    mask_m = offs_m < M
    mask_k = local_k < tile_k
    q = offs_m % Q
    p = (offs_m // Q) % P
    n = offs_m // (P * Q)
    h_origin = p * stride_h - pad_h
    w_origin = q * stride_w - pad_w
    x_rows = x_ptr + pid_g * tile_c * sx_c + n * sx_n
    w_cols = w_ptr + offs_k * sw_k
    if GROUP_TILE > 1:
        # Column j belongs to the tile's group j // (K/groups), whose input channels start at
        # tile channel (j // (K/groups))·C/groups; the weight's channel index is relative to it.
        group_c = tile_c // GROUP_TILE
        group_first_c = (local_k // (tile_k // GROUP_TILE)) * group_c

    # One flat loop over (r, s, channel block) rather than three nested ones, so the software
    # pipeliner overlaps loads with dots even when C fits in a single block.
    # (Plain arithmetic, not tl.cdiv: library @jit helpers cannot be compiled for sm_90 in the
    # same process as the interpreter, which is how tests/codegen/test_conv_bn_act_sm90.py runs.)
    c_blocks = (tile_c + BLOCK_C - 1) // BLOCK_C
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in range(R * S * c_blocks):
        rs = step // c_blocks
        r = rs // S
        s = rs % S
        offs_c = (step % c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_c = offs_c < tile_c
        h = h_origin + r * dil_h
        w = w_origin + s * dil_w
        in_bounds = mask_m & (h >= 0) & (h < H) & (w >= 0) & (w < W)
        a = tl.load(
            (x_rows + h * sx_h + w * sx_w)[:, None] + offs_c[None, :] * sx_c,
            mask=in_bounds[:, None] & mask_c[None, :],
            other=0.0,
        )
        if GROUP_TILE > 1:
            c_in_group = offs_c[:, None] - group_first_c[None, :]
            b = tl.load(
                (w_cols + r * sw_r + s * sw_s)[None, :] + c_in_group * sw_c,
                mask=(c_in_group >= 0) & (c_in_group < group_c) & mask_c[:, None] & mask_k[None, :],
                other=0.0,
            )
        else:
            b = tl.load(
                (w_cols + r * sw_r + s * sw_s)[None, :] + offs_c[:, None] * sw_c,
                mask=mask_c[:, None] & mask_k[None, :],
                other=0.0,
            )
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    return acc, offs_m, offs_k, mask_m, mask_k, n, p, q


def group_tile(groups: int, c_per_group: int, k_per_group: int) -> int:
    """How many groups one program covers: the largest power of two that divides ``groups`` and
    keeps both of the tile's channel counts within 16 (a tensor-core dot's narrowest side), or 1.
    Dividing ``groups`` means every tile is whole, so the kernel needs no partial-tile masks."""
    tile = 1
    while groups % (2 * tile) == 0 and 2 * tile * max(c_per_group, k_per_group) <= 16:
        tile *= 2
    return tile
