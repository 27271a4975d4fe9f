"""Which piece each piecewise function took: recorded in one run, imposed on another.

A ReLU's derivative jumps at 0, a Hardtanh's at its bounds, a max pool's where two inputs tie.
Where a float32 run and its float64 reference land on different sides of a jump (1e-7 apart),
their gradients differ by a whole channel's share, and comparing them measures nothing: in a deep
network each of two equally good float32 computations flips a few such masks against float64,
at different places, and their errors differ by 1000x from draw to draw. So the training check
records, at every such function of the float32 run it judges, which piece each element took, and
the float64 reference computes those pieces: the same function, in exact arithmetic.

Both sides work at the level of torch functions (a TorchFunctionMode, above autograd, so the
float64 run differentiates the imposed piece): ``F.relu``/``torch.relu``/``Tensor.relu`` and their
in-place forms, ``F.relu6``, ``F.hardtanh``, ``F.leaky_relu``, ``F.hardswish``,
``F.hardsigmoid``, ``clamp``/``clip`` and ``F.max_pool2d``/``F.adaptive_max_pool2d``. A fused op
(``torch.ops.resnet_fused.*`` with an ``act`` argument) records its activation's pieces from its
output, which is where the unfused model calls the activation it absorbed; the choices are
imposed in call order, and a choice whose function or shape differs from the call it meets is a
``PieceMismatch``, never a silent misjudgement.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..ops.activation import Kind

BELOW, INSIDE, ABOVE = 0, 1, 2  # the pieces of a function bounded on both sides


class PieceMismatch(RuntimeError):
    """The run that imposes choices calls another piecewise function than the recorded run."""


@dataclass
class Choice:
    function: str  # "relu", "leaky_relu", "bounded" (hardtanh/clamp), "hardswish", "hardsigmoid", "max_pool"
    chosen: torch.Tensor  # bool (relu, leaky_relu), int8 BELOW/INSIDE/ABOVE, or a max pool's int64 indices


def _bounded_pieces(out: torch.Tensor, low, high) -> torch.Tensor:
    """BELOW where the output sits at the lower bound, ABOVE at the upper, else INSIDE (None: no bound)."""
    chosen = torch.full(out.shape, INSIDE, dtype=torch.int8, device=out.device)
    if low is not None:
        chosen[out <= low] = BELOW
    if high is not None:
        chosen[out >= high] = ABOVE
    return chosen


def _hardswish_pieces(out: torch.Tensor) -> torch.Tensor:
    """z <= -3: 0; z >= 3: z (so out >= 3); between: z(z + 3)/6, which is 0 only at z = 0."""
    chosen = torch.full(out.shape, INSIDE, dtype=torch.int8, device=out.device)
    chosen[out == 0] = BELOW
    chosen[out >= 3] = ABOVE
    return chosen


def _choice_of(function: str, out: torch.Tensor, low=None, high=None) -> Choice:
    out = out.detach()
    if function in ("relu", "leaky_relu"):
        return Choice(function, out > 0)
    if function == "bounded":
        return Choice(function, _bounded_pieces(out, low, high))
    if function == "hardswish":
        return Choice(function, _hardswish_pieces(out))
    return Choice(function, _bounded_pieces(out, 0.0, 1.0))  # hardsigmoid


def _piece(choice: Choice, x: torch.Tensor, low=None, high=None, slope=0.0) -> torch.Tensor:
    """The function on ``x`` (the imposing run's input) computed by the recorded pieces."""
    c = choice.chosen
    if choice.function == "relu":
        return x * c
    if choice.function == "leaky_relu":
        return torch.where(c, x, x * slope)
    if choice.function == "bounded":
        inside = x if low is None else torch.where(c == BELOW, torch.as_tensor(low, dtype=x.dtype), x)
        return inside if high is None else torch.where(c == ABOVE, torch.as_tensor(high, dtype=x.dtype), inside)
    zero = torch.zeros((), dtype=x.dtype)
    if choice.function == "hardswish":
        return torch.where(c == BELOW, zero, torch.where(c == ABOVE, x, x * (x + 3) / 6))
    return torch.where(c == BELOW, zero, torch.where(c == ABOVE, torch.ones((), dtype=x.dtype), x / 6 + 0.5))


# The torch functions with pieces: function -> (its pieces' name, reading the call's arguments into a dict
# with input, inplace and the bounds or slope).
def _arguments(names, defaults):
    return lambda args, kwargs: {**defaults, **dict(zip(names, args)), **kwargs}


_ACTIVATIONS = {
    F.relu: ("relu", _arguments(("input", "inplace"), {"inplace": False})),
    torch.relu: ("relu", _arguments(("input",), {"inplace": False})),
    torch.relu_: ("relu", _arguments(("input",), {"inplace": True})),
    torch.Tensor.relu: ("relu", _arguments(("input",), {"inplace": False})),
    torch.Tensor.relu_: ("relu", _arguments(("input",), {"inplace": True})),
    F.relu6: ("bounded", _arguments(("input", "inplace"), {"inplace": False, "min_val": 0.0, "max_val": 6.0})),
    F.hardtanh: ("bounded", _arguments(("input", "min_val", "max_val", "inplace"),
                                       {"min_val": -1.0, "max_val": 1.0, "inplace": False})),
    F.leaky_relu: ("leaky_relu", _arguments(("input", "negative_slope", "inplace"),
                                            {"negative_slope": 0.01, "inplace": False})),
    F.hardswish: ("hardswish", _arguments(("input", "inplace"), {"inplace": False})),
    F.hardsigmoid: ("hardsigmoid", _arguments(("input", "inplace"), {"inplace": False})),
}
for _clamp, _inplace in ((torch.clamp, False), (torch.clip, False), (torch.Tensor.clamp, False),
                         (torch.Tensor.clip, False), (torch.Tensor.clamp_, True), (torch.Tensor.clip_, True)):
    _ACTIVATIONS[_clamp] = ("bounded", _arguments(("input", "min", "max"), {"min": None, "max": None, "inplace": _inplace}))
for _clamp, _inplace, _side in ((torch.clamp_min, False, "min"), (torch.Tensor.clamp_min, False, "min"),
                                (torch.Tensor.clamp_min_, True, "min"), (torch.clamp_max, False, "max"),
                                (torch.Tensor.clamp_max, False, "max"), (torch.Tensor.clamp_max_, True, "max")):
    _ACTIVATIONS[_clamp] = ("bounded", _arguments(("input", _side), {"min": None, "max": None, "inplace": _inplace}))

_MAX_POOLS = {
    F.max_pool2d: (F.max_pool2d_with_indices, ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode",
                                               "return_indices")),
    F.adaptive_max_pool2d: (F.adaptive_max_pool2d_with_indices, ("input", "output_size", "return_indices")),
}
_FUSED_KINDS = {Kind.RELU: "relu", Kind.HARDTANH: "bounded", Kind.LEAKY_RELU: "leaky_relu", Kind.HARDSWISH: "hardswish"}


def _bounds(function: str, values: dict):
    if function != "bounded":
        return None, None
    return values.get("min_val", values.get("min")), values.get("max_val", values.get("max"))


def _fused_activation(func, args, kwargs):
    """(function, low, high) of a resnet_fused op's activation, or None (no such op, or a
    smooth activation)."""
    overload = func if isinstance(func, torch._ops.OpOverload) else getattr(func, "default", None)
    if not isinstance(overload, torch._ops.OpOverload) or overload.namespace != "resnet_fused":
        return None
    names = [a.name for a in overload._schema.arguments]
    if "act" not in names:
        return None
    values = dict(zip(names, args), **kwargs)
    function = _FUSED_KINDS.get(Kind(values["act"]))
    if function is None:
        return None
    low, high = (values["act_a"], values["act_b"]) if function == "bounded" else (None, None)
    return function, low, high


class _Pieces(TorchFunctionMode):
    def __init__(self, choices: list[Choice] | None = None):
        super().__init__()
        self.choices = [] if choices is None else choices
        self.imposing = choices is not None
        self.position = 0  # the next choice to impose

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _ACTIVATIONS:
            function, read = _ACTIVATIONS[func]
            values = read(args, kwargs)
            low, high = _bounds(function, values)
            if self.imposing:
                return self._impose(function, values, low, high)
            out = func(*args, **kwargs)
            self.choices.append(_choice_of(function, out, low, high))
            return out
        if func in _MAX_POOLS:
            with_indices, names = _MAX_POOLS[func]
            values = dict(zip(names, args), **kwargs)
            wants_indices = values.pop("return_indices", False)
            if self.imposing:
                x, indices = values["input"], self._next("max_pool", None).chosen
                out = x.flatten(-2).gather(-1, indices.flatten(-2)).view(indices.shape)
            else:
                out, indices = with_indices(**values)
                self.choices.append(Choice("max_pool", indices))
            return (out, indices) if wants_indices else out
        fused = None if self.imposing else _fused_activation(func, args, kwargs)
        result = func(*args, **kwargs)
        if fused is not None:
            function, low, high = fused
            out = result[0] if isinstance(result, (tuple, list)) else result
            self.choices.append(_choice_of(function, out, low, high))
        return result

    def _next(self, function: str, shape) -> Choice:
        if self.position >= len(self.choices):
            raise PieceMismatch(f"a {function} call past the {len(self.choices)} recorded")
        choice = self.choices[self.position]
        if choice.function != function or (shape is not None and tuple(choice.chosen.shape) != tuple(shape)):
            raise PieceMismatch(f"call {self.position}: {function} of shape {tuple(shape or ())} where the recorded "
                                f"run had {choice.function} of shape {tuple(choice.chosen.shape)}")
        self.position += 1
        return choice

    def _impose(self, function: str, values: dict, low, high) -> torch.Tensor:
        x = values["input"]
        choice = self._next(function, x.shape)
        if values["inplace"]:
            # A piece computed from a copy: ``x`` is overwritten, and the piece's backward may read it.
            return x.copy_(_piece(choice, x.clone(), low, high, values.get("negative_slope", 0.0)))
        return _piece(choice, x, low, high, values.get("negative_slope", 0.0))


@contextlib.contextmanager
def recording():
    """Records the pieces the block's forward calls take: ``with recording() as chosen: model(x)``."""
    mode = _Pieces()
    with mode:
        yield mode.choices


@contextlib.contextmanager
def imposing(choices: list[Choice]):
    """Computes the block's piecewise functions by ``choices`` (recorded from a run of the same
    model: call for call, in order); every choice must be used."""
    mode = _Pieces(list(choices))
    with mode:
        yield
    if mode.position != len(mode.choices):
        raise PieceMismatch(f"{len(mode.choices) - mode.position} of {len(mode.choices)} recorded choices were not "
                            "met by the imposing run")
