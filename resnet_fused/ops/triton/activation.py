"""The activations of the Triton kernels, once: the twin of ``activate``/``activate_grad`` in
csrc/epilogue.h, specified by ``reference.activate``/``activate_grad`` (torch.nn.functional and
ATen's backward functions). ``KIND`` is an ``activation.Kind`` value (0 identity, 1 ReLU,
2 Hardtanh, 3 LeakyReLU, 4 SiLU, 5 Hardswish: literals below, since a jit function cannot read a
Python enum), a constexpr, so each kernel compiles only its own branch; ``a``/``b`` are the fp32
parameters (Hardtanh's bounds, LeakyReLU's slope). Comparisons are written so that a NaN input
propagates exactly as in torch.
"""

from __future__ import annotations

import triton
import triton.language as tl


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
    return z


@triton.jit
def act_grad(g, v, KIND: tl.constexpr, a, b):
    """∂L/∂z from g = ∂L/∂act(z), fp32. ``v`` is the output for ReLU (identity: unread) and the
    pre-activation z for every other kind (``Activation.needs_preactivation``); each branch is
    the ATen backward of the kind (threshold_, hardtanh_, leaky_relu_, silu_, hardswish_backward)."""
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
    return g
