"""The activations of the Triton kernels, once: the twin of ``activate``/``activate_grad`` in
csrc/epilogue.h, specified by ``reference.activate``/``activate_grad`` (torch.nn.functional and
ATen's backward functions). ``KIND`` is an ``activation.Kind`` value (0 identity, 1 ReLU,
2 Hardtanh, 3 LeakyReLU, 4 SiLU, 5 Hardswish, 6 GELU, 7 GELU tanh: literals below, since a jit function cannot read a
Python enum), a constexpr, so each kernel compiles only its own branch; ``a``/``b`` are the fp32
parameters (Hardtanh's bounds, LeakyReLU's slope). Comparisons are written so that a NaN input
propagates exactly as in torch.
"""

from __future__ import annotations

import triton
import triton.language as tl


# GELU's constants below are csrc/epilogue.h's: 1/√2 = 0.7071..., 1/√(2π) = 0.3989...,
# √(2/π) = 0.7978..., and the tanh form's cubic coefficient κ = 0.044715; u = √(2/π)·(z + κz³).


@triton.jit
def _erf(x):
    # Abramowitz & Stegun 7.1.26, |error| < 1.5e-7 (1e-5 relative is the fp32 rule): an exp, a
    # division and five multiply-adds, as SiLU costs. libdevice's erff spilled registers in the
    # widest fp32 conv tile (codegen/test_activations_sm90.py). A NaN passes through.
    ax = tl.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * ax)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    e = 1.0 - poly * tl.exp(-ax * ax)
    return tl.where(x < 0.0, -e, e)


@triton.jit
def act(z, KIND: tl.constexpr, a, b):
    """act(z) in fp32 for the fp32 tensor ``z``."""
    if KIND == 1:
        # where(), not maximum(): a NaN must stay NaN, as it does in torch.relu.
        z = tl.where(z < 0.0, 0.0, z)
    elif KIND == 2:
        # torch.clamp's order: a NaN compares false both times and passes.
        z = tl.where(z < a, a, tl.where(z > b, b, z))
    elif KIND == 3:
        z = tl.where(z > 0.0, z, z * a)
    elif KIND == 4:
        # ATen's x / (1 + exp(-x)); exp(-x) = inf gives -0, not NaN.
        z = z / (1.0 + tl.exp(-z))
    elif KIND == 5:
        # ATen's x · min(max(x + 3, 0), 6) / 6, NaN passing through both.
        t = z + 3.0
        t = tl.where(t < 0.0, 0.0, tl.where(t > 6.0, 6.0, t))
        z = z * t / 6.0
    elif KIND == 6:
        z = z * 0.5 * (1.0 + _erf(z * 0.7071067811865476))
    elif KIND == 7:
        # 0.5·z·(1 + tanh(u)) = z·σ(2u): no 1 + tanh(u) → 0 cancellation for negative z, and no
        # tanh (Triton has no portable one).
        z = z / (1.0 + tl.exp(-2.0 * 0.7978845608028654 * (z + 0.044715 * z * z * z)))
    return z


@triton.jit
def act_grad(g, v, KIND: tl.constexpr, a, b):
    """∂L/∂z from g = ∂L/∂act(z), fp32. ``v`` is the output for ReLU (identity: unread) and the
    pre-activation z for every other kind (``Activation.needs_preactivation``); each branch is
    the ATen backward of the kind (threshold_, hardtanh_, leaky_relu_, silu_, hardswish_, gelu_backward)."""
    if KIND == 1:
        g = tl.where(v <= 0.0, 0.0, g)  # a NaN output passes its gradient, as in torch
    elif KIND == 2:
        g = tl.where((v <= a) | (v >= b), 0.0, g)
    elif KIND == 3:
        g = tl.where(v > 0.0, g, g * a)
    elif KIND == 4:
        s = 1.0 / (1.0 + tl.exp(-v))
        g = g * s * (1.0 + v * (1.0 - s))
    elif KIND == 5:
        g = tl.where(v <= -3.0, 0.0, tl.where(v < 3.0, g * (v / 3.0 + 0.5), g))
    elif KIND == 6:
        cdf = 0.5 * (1.0 + _erf(v * 0.7071067811865476))
        g = g * (cdf + v * 0.3989422804014327 * tl.exp(-0.5 * v * v))
    elif KIND == 7:
        # With s = σ(2u) = (1 + tanh u)/2: 1 − tanh²u = 4s(1 − s), so the derivative is
        # s + 2v·s(1 − s)·√(2/π)·(1 + 3κv²).
        s = 1.0 / (1.0 + tl.exp(-2.0 * 0.7978845608028654 * (v + 0.044715 * v * v * v)))
        g = g * (s + 2.0 * v * s * (1.0 - s) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * v * v))
    return g
