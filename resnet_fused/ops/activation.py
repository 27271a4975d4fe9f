"""The activation a fused op applies last: ``Activation(kind, a, b)``, a small immutable spec.

Every op takes it as three plain scalars ``(int code, float a, float b)`` (``Activation.args``),
the form an op schema can carry. The per-element math lives once per language: ``act`` and
``act_grad`` in csrc/epilogue.h (C++, CPU and CUDA), ``ops/triton/activation.py`` (Triton),
and ``reference.activate`` (torch.nn.functional, the specification). The codes here are the
``ActKind`` values of epilogue.h; tests/ops/test_activations.py checks that the two agree.

| kind        | a         | b        | module                                   |
|-------------|-----------|----------|------------------------------------------|
| IDENTITY    |           |          | ``nn.Identity``                          |
| RELU        |           |          | ``nn.ReLU``                              |
| HARDTANH    | min_val   | max_val  | ``nn.Hardtanh``; ``nn.ReLU6`` is (0, 6)  |
| LEAKY_RELU  | slope     |          | ``nn.LeakyReLU``                         |
| SILU        |           |          | ``nn.SiLU``                              |
| HARDSWISH   |           |          | ``nn.Hardswish``                         |
| GELU        |           |          | ``nn.GELU()``; timm's ``GELU``           |
| GELU_TANH   |           |          | ``nn.GELU(approximate="tanh")``; timm's ``GELUTanh`` |

Unused parameters are 0, so equal activations compare and hash equal.
"""

from __future__ import annotations

import enum
import math
import sys
from dataclasses import dataclass

from torch import nn


class Kind(enum.IntEnum):
    IDENTITY = 0
    RELU = 1
    HARDTANH = 2
    LEAKY_RELU = 3
    SILU = 4
    HARDSWISH = 5
    GELU = 6  # 0.5·z·(1 + erf(z/√2))
    GELU_TANH = 7  # 0.5·z·(1 + tanh(√(2/π)·(z + 0.044715·z³)))


@dataclass(frozen=True)
class Activation:
    kind: Kind
    a: float = 0.0
    b: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "kind", Kind(check_code(self.kind)))
        a, b = float(self.a), float(self.b)
        if self.kind == Kind.HARDTANH:
            # nn.Hardtanh's own rule; NaN bounds fail it too.
            if not (a < b):
                raise ValueError(f"Activation: Hardtanh needs min_val < max_val, got ({a}, {b})")
        elif self.kind == Kind.LEAKY_RELU:
            if not math.isfinite(a):
                raise ValueError(f"Activation: LeakyReLU needs a finite negative_slope, got {a}")
            b = 0.0
        else:
            a = b = 0.0
        object.__setattr__(self, "a", a)
        object.__setattr__(self, "b", b)

    @property
    def args(self) -> tuple[int, float, float]:
        """``(code, a, b)``: the three op arguments."""
        return int(self.kind), self.a, self.b

    @property
    def needs_preactivation(self) -> bool:
        """Whether the derivative needs the pre-activation value z rather than the output:
        ReLU's is ``out > 0`` and the identity's is 1; every other kind's backward recomputes z
        from the saved conv output (training.py)."""
        return self.kind not in (Kind.IDENTITY, Kind.RELU)

    def to_module(self) -> nn.Module:
        """The stock module computing this activation (``nn.ReLU6`` for Hardtanh(0, 6))."""
        if self.kind == Kind.HARDTANH:
            return nn.ReLU6() if (self.a, self.b) == (0.0, 6.0) else nn.Hardtanh(self.a, self.b)
        if self.kind == Kind.LEAKY_RELU:
            return nn.LeakyReLU(self.a)
        if self.kind in (Kind.GELU, Kind.GELU_TANH):
            return nn.GELU(approximate="tanh" if self.kind == Kind.GELU_TANH else "none")
        return {Kind.IDENTITY: nn.Identity, Kind.RELU: nn.ReLU, Kind.SILU: nn.SiLU, Kind.HARDSWISH: nn.Hardswish}[
            self.kind]()

    @classmethod
    def from_module(cls, module: nn.Module) -> Activation | None:
        """The activation of a stock module, or None: exact types only (a subclass may compute
        something else) and no hooks (a fused op would not call them). ``inplace`` does not
        matter: the fused op writes a new tensor either way."""
        if any(getattr(module, name, None) for name in ("_forward_hooks", "_forward_pre_hooks",
                                                           "_backward_hooks", "_backward_pre_hooks")):
            return None
        kind = type(module)
        if kind is nn.Hardtanh or kind is nn.ReLU6:
            return cls(Kind.HARDTANH, module.min_val, module.max_val)
        if kind is nn.LeakyReLU:
            return cls(Kind.LEAKY_RELU, module.negative_slope)
        if kind is nn.GELU:
            return {"none": cls(Kind.GELU), "tanh": cls(Kind.GELU_TANH)}.get(module.approximate)
        simple = {nn.Identity: Kind.IDENTITY, nn.ReLU: Kind.RELU, nn.SiLU: Kind.SILU, nn.Hardswish: Kind.HARDSWISH,
                  **_timm_gelus()}
        return cls(simple[kind]) if kind in simple else None

    def __repr__(self) -> str:
        params = {Kind.HARDTANH: f"({self.a:g}, {self.b:g})", Kind.LEAKY_RELU: f"({self.a:g})"}.get(self.kind, "")
        return f"Activation.{self.kind.name}{params}"


def _timm_gelus() -> dict[type, Kind]:
    """timm's own GELU modules (``F.gelu(x)`` and ``F.gelu(x, approximate="tanh")``, what its
    ``create_act_layer("gelu")`` makes), if timm's activations module is loaded (a model cannot
    hold one otherwise); looked up, not imported."""
    module = sys.modules.get("timm.layers.activations")
    found = {getattr(module, "GELU", None): Kind.GELU, getattr(module, "GELUTanh", None): Kind.GELU_TANH}
    return {cls: kind for cls, kind in found.items() if isinstance(cls, type)}


def check_code(code) -> int:
    """``code`` as an int if it names an activation, else a ValueError that lists them."""
    if isinstance(code, bool) or int(code) != code or int(code) not in Kind._value2member_map_:
        raise ValueError(f"unknown activation code {code!r}; known: "
                         + ", ".join(f"{k.value} ({k.name})" for k in Kind))
    return int(code)


IDENTITY = Activation(Kind.IDENTITY)
RELU = Activation(Kind.RELU)


def resolve(act: Activation | nn.Module | None, relu: bool | None, where: str) -> Activation:
    """The activation of a public call that takes ``relu=`` (bool, the older form) and ``act=``
    (an Activation or a stock activation module) side by side; exactly one may be given.
    Neither: ReLU, the default of ``relu``."""
    if act is not None and relu is not None:
        raise ValueError(f"{where}: give relu= or act=, not both (relu=True is act=Activation(Kind.RELU))")
    if relu is not None:
        if not isinstance(relu, bool):
            raise TypeError(f"{where}: relu must be a bool, got {type(relu).__name__}; use act= for other activations")
        return RELU if relu else IDENTITY
    if act is None:
        return RELU
    if isinstance(act, Activation):
        return act
    if isinstance(act, nn.Module):
        found = Activation.from_module(act)
        if found is None:
            raise ValueError(f"{where}: {type(act).__name__} is not a fusable activation; supported: exactly "
                             "nn.Identity, nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.LeakyReLU, nn.SiLU, nn.Hardswish, "
                             "nn.GELU (or timm's GELU, GELUTanh) without hooks")
        return found
    raise TypeError(f"{where}: act must be an Activation or an activation module, got {type(act).__name__}")
