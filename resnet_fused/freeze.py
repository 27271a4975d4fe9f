"""``freeze(model)``: a frozen snapshot of an eval-mode model for CPU inference.

What freezing does:

1. ``convert(model, backend="cpu")`` finds the Conv2d → BatchNorm2d (→ ReLU) chains, the ResNet
   blocks and the residual adds (on a deep copy: ``model`` itself is not touched).
2. Each fused conv's BatchNorm is folded into its weight and bias from the running statistics,
   in float64, rounded once to ``dtype``: ``W' = W·s``, ``b' = (b − μ)·s + β``, ``s = γ/√(σ² + ε)``.
   Plain convs without a BatchNorm are frozen too.
3. At the first call with a given input shape, each folded weight is reordered (packed) once
   into the blocked layout oneDNN picks for that problem, and kept (up to 4 shapes per conv).
4. Each conv runs as one oneDNN convolution with its epilogue as post-ops: ReLU, or, at a
   block's end, residual add + ReLU. Inside a ResNet stage, each block after the first writes
   its output into the memory of its input (the residual), as Inductor's freezing does; the
   caller's tensors and any output a hook may hold are never overwritten. Activations are
   channels_last; ``dtype`` is ``torch.float32`` or ``torch.bfloat16``.

The oneDNN entry points are PyTorch's private ops, the ones Inductor's freezing emits:
``torch.ops.mkldnn._reorder_convolution_weight``, ``torch.ops.mkldnn._convolution_pointwise``
(``.default``: conv + ReLU; ``.binary``: conv + add + ReLU) and
``torch.ops.mkldnn._convolution_pointwise_.binary`` (the same, in place into the residual).
They are used only when all exist *and* a tiny probe matches ``F.conv2d`` in the requested
dtype (``mkldnn_usable``; why not: ``PROBE_FAILURES``). Otherwise ``freeze`` returns the exact
fallback: the unfrozen ``convert(model, backend="cpu")`` modules (BatchNorm applied inside the
fused op from the snapshot's statistics) in the same snapshot wrapper; ``FrozenModel.packed``
says which one you got.

The contract (the same as ``torch.jit.freeze`` and Inductor freezing):

- **A snapshot.** Parameters and running statistics are read once. Later changes to the
  original model (an optimizer step, ``load_state_dict``, writes through ``.data``) are not
  seen: call ``freeze`` again.
- **Inference only.** ``freeze`` refuses a model that has any module in training mode;
  the frozen model refuses ``.train()``, ``requires_grad_()`` and an input that requires
  grad. Grad mode itself is allowed: the frozen model runs under ``torch.no_grad()``, its
  tensors are constants, and its output never requires grad.
- **Inputs** are cast to ``dtype`` and 4-D ones made channels_last on entry; the output is in
  ``dtype``.
- ``state_dict()`` holds the folded (dense) weights; the packed copies are oneDNN tensors made
  from them. A frozen model cannot be moved, cast, copied or pickled: freeze the original
  again (it takes a moment).
"""

from __future__ import annotations

import functools
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from . import backends
from .ops.activation import Kind
from .convert import convert
from .nn import (FOLDED, FusedBasicBlock, FusedBottleneck, FusedConv2d, has_hooks,
                 is_plain_conv, numeric_padding)

FREEZE_DTYPES = (torch.float32, torch.bfloat16)


def _mkldnn_ops():
    """The private oneDNN ops (unary, binary, in-place binary, weight reorder), or None when this
    torch build lacks any of them."""
    try:
        if not torch.backends.mkldnn.is_available():
            return None
        ops = torch.ops.mkldnn
        return (ops._convolution_pointwise.default, ops._convolution_pointwise.binary,
                ops._convolution_pointwise_.binary, ops._reorder_convolution_weight.default)
    except (AttributeError, RuntimeError):
        return None


@functools.lru_cache(maxsize=None)
def _ops():
    """The resolved overloads for the frozen convs' hot path (only called once a probe passed)."""
    return _mkldnn_ops()


# dtype -> why the packed path is not used (absent: usable or not probed yet)
PROBE_FAILURES: dict[torch.dtype, str] = {}


@functools.lru_cache(maxsize=None)
def _probe(dtype: torch.dtype) -> bool:
    ops = _mkldnn_ops()
    if ops is None:
        PROBE_FAILURES[dtype] = "torch.ops.mkldnn convolution ops are missing from this torch build"
        return False
    unary, binary, binary_, reorder = ops
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    g = torch.Generator().manual_seed(0)

    def operands(groups: int, stride: list[int], bias_dtype: torch.dtype):
        x = torch.randn(2, 8, 7, 7, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
        w = torch.randn(12, 8 // groups, 3, 3, generator=g).to(dtype)
        b = torch.randn(12, generator=g).to(bias_dtype)
        args = (reorder(w, [1, 1], stride, [1, 1], groups, list(x.shape)), b, [1, 1], stride, [1, 1], groups)
        return x, args, F.conv2d(x.double(), w.double(), b.double(), stride, 1, 1, groups)

    try:
        # The features the frozen convs use: packed weights, bias, padding, channels_last; stride
        # and groups with the ReLU post-op; the residual add + ReLU (out of place and in place)
        # on ungrouped convs, the only ones frozen blocks hand a residual to.
        # Bias: fp32 for the unary op, the data's dtype for the binary ops (which require it).
        x, args, expected = operands(groups=2, stride=[2, 2], bias_dtype=torch.float32)
        checks = [("relu, grouped", unary(x, *args, "relu", [], ""), expected.relu())]
        x, args, expected = operands(groups=1, stride=[1, 1], bias_dtype=dtype)
        residual = torch.randn(expected.shape, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
        accumulated = residual.clone()
        returned = binary_(accumulated, x, *args, "add", 1.0, "relu", [], "")
        want = (expected + residual.double()).relu()
        checks += [("add", binary(x, residual, *args, "add", None, "relu", [], ""), want),
                   ("in-place add", accumulated, want)]
        for what, got, want in checks:
            if got.shape != want.shape or got.dtype != dtype:
                PROBE_FAILURES[dtype] = f"probe ({what}): got {got.dtype} {tuple(got.shape)}"
                return False
            error = ((got.double() - want).abs().max() / want.abs().max()).item()
            if not error <= tol:
                PROBE_FAILURES[dtype] = f"probe ({what}): relative error {error:.2g} > {tol}"
                return False
        if returned.data_ptr() != accumulated.data_ptr():
            PROBE_FAILURES[dtype] = "probe: the in-place op did not write in place"
            return False
        return True
    except Exception as error:  # any failure of a private op means: use the fallback
        PROBE_FAILURES[dtype] = f"probe: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        return False


def mkldnn_usable(dtype: torch.dtype) -> bool:
    """Whether the packed oneDNN path can run ``dtype`` here: the private ops exist and a tiny
    probe (packed weight, groups, stride, ReLU, residual-add and in-place accumulate post-ops)
    matches F.conv2d."""
    return _probe(dtype)


# Weights are packed for the input shape a conv actually sees (oneDNN picks its blocked format
# per problem shape; a mismatch would reorder the weight on every call): once per shape, for at
# most this many shapes; further shapes reuse the first packing (correct, reordered per call).
MAX_PACKED_SHAPES = 4


class FrozenConv2d(nn.Module):
    """``act(conv(x, W') + b' [+ residual])`` with a BatchNorm-folded, oneDNN-packed weight.

    ``act`` is ReLU when ``relu``. A constant: ``weight``/``bias`` are the folded values (buffers,
    for inspection and ``state_dict``); the packed copies are made from them once per input shape.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, stride, padding, dilation, groups: int,
                 relu: bool, dtype: torch.dtype):
        super().__init__()
        self.stride, self.padding, self.dilation = list(stride), list(padding), list(dilation)
        self.groups, self.relu, self.dtype = groups, relu, dtype
        self.in_channels, self.out_channels = weight.shape[1] * groups, weight.shape[0]
        self.kernel_size = tuple(weight.shape[2:])
        self.register_buffer("weight", weight.to(dtype).contiguous())
        # The shift in fp32 for the plain conv (exact; oneDNN takes it with bf16 data, and a
        # micro-benchmark ran bf16 convs ~5% faster so); the residual ops require the data's dtype.
        self.register_buffer("bias", bias.float().contiguous())
        self.register_buffer("bias_lowp", bias.to(dtype).contiguous(), persistent=False)
        self._attr = "relu" if relu else "none"
        self._packed: dict[torch.Size, torch.Tensor] = {}
        self.training = False

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, bn: nn.Module | None, relu: bool, dtype: torch.dtype) -> "FrozenConv2d":
        """Fold ``bn`` (eval mode: its running statistics) into ``conv``, in float64."""
        with torch.no_grad():
            w = conv.weight.detach().double()
            b = conv.bias.detach().double() if conv.bias is not None else w.new_zeros(w.shape[0])
            if bn is not None:
                scale = (bn.running_var.detach().double() + bn.eps).rsqrt()
                if bn.weight is not None:
                    scale = scale * bn.weight.detach().double()
                shift = -bn.running_mean.detach().double() * scale
                if bn.bias is not None:
                    shift = shift + bn.bias.detach().double()
                w = w * scale.view(-1, 1, 1, 1)
                b = b * scale + shift
        return cls(w, b, conv.stride, numeric_padding(conv), conv.dilation, conv.groups, relu, dtype)

    def packed_weight(self, input_shape: torch.Size) -> torch.Tensor:
        packed = self._packed.get(input_shape)
        if packed is None:
            if len(self._packed) >= MAX_PACKED_SHAPES:
                return next(iter(self._packed.values()))
            packed = _ops()[3](self.weight, self.padding, self.stride, self.dilation, self.groups, list(input_shape))
            self._packed[input_shape] = packed
        return packed

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, accumulate: bool = False) -> torch.Tensor:
        """``accumulate=True``: write the result into ``residual`` (which the caller owns and no
        longer needs) instead of a new tensor, as Inductor does."""
        if x.dtype != self.dtype or not x.is_contiguous(memory_format=torch.channels_last):
            x = x.to(self.dtype).contiguous(memory_format=torch.channels_last)  # after a module that changed it
        unary, binary, binary_, _ = _ops()
        conv = (self.padding, self.stride, self.dilation, self.groups)
        weight = self.packed_weight(x.shape)
        if residual is None:
            return unary(x, weight, self.bias, *conv, self._attr, [], "")
        if self.groups != 1 or residual.shape[-1] * residual.shape[-2] == 1:
            # The residual post-op is probed (and used) on ungrouped convs only; on a 1x1 output
            # (ambiguous layout) torch 2.11's out-of-place op cannot create its memory.
            out = unary(x, weight, self.bias, *conv, "none", [], "").add_(residual)
            return out.relu_() if self.relu else out
        if residual.dtype != self.dtype or not residual.is_contiguous(memory_format=torch.channels_last):
            residual, accumulate = residual.to(self.dtype).contiguous(memory_format=torch.channels_last), False
        if accumulate:
            return binary_(residual, x, weight, self.bias_lowp, *conv, "add", 1.0, self._attr, [], "")
        return binary(x, residual, weight, self.bias_lowp, *conv, "add", None, self._attr, [], "")

    def train(self, mode: bool = True):
        if mode:
            raise RuntimeError(_TRAIN_ERROR)
        return super().train(False)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={tuple(self.stride)}, "
                f"padding={tuple(self.padding)}, groups={self.groups}, relu={self.relu}, BatchNorm folded, "
                f"{str(self.dtype).removeprefix('torch.')} oneDNN-packed weight")

    # The packed weights are opaque oneDNN tensors: copies and pickles pack again on first use.
    def __getstate__(self):
        state = super().__getstate__()
        state["_packed"] = {}
        return state


class FrozenBlock(nn.Module):
    """A torchvision BasicBlock/Bottleneck of frozen convs: ``relu(convN(...conv1(x)) + shortcut)``,
    the add + ReLU a post-op of the last conv. With ``accumulate`` (the caller hands over ``x``)
    or a downsample conv (a fresh shortcut), the last conv writes into the shortcut's memory."""

    def __init__(self, block: nn.Module):
        super().__init__()
        names = [n for n in ("conv1", "conv2", "conv3") if hasattr(block, n)]
        for name in names:
            setattr(self, name, getattr(block, name))
        self.downsample = block.downsample
        self._convs = [getattr(self, n) for n in names]
        ds = block.downsample
        self._fresh_shortcut = (
            type(ds) is nn.Sequential and len(ds) >= 1 and type(ds[0]) is FrozenConv2d
            and all(type(m) is nn.Identity for m in list(ds)[1:]) and not any(has_hooks(m) for m in ds.modules())
        )
        self.training = False

    def forward(self, x: torch.Tensor, accumulate: bool = False) -> torch.Tensor:
        if self.downsample is None:
            shortcut = x
        else:
            shortcut = self.downsample(x)
            accumulate = self._fresh_shortcut
        out = x
        for conv in self._convs[:-1]:
            out = conv(out)
        return self._convs[-1](out, shortcut, accumulate=accumulate)

    def train(self, mode: bool = True):
        if mode:
            raise RuntimeError(_TRAIN_ERROR)
        return super().train(False)


class FrozenStage(nn.Sequential):
    """A Sequential of FrozenBlocks (a ResNet stage): each block after the first owns its input,
    the previous block's output, and accumulates its result into it (unless a hook may hold it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A global forward hook (nn.modules.module.register_module_forward_hook) may keep outputs.
        hooked = bool(getattr(nn.modules.module, "_global_forward_hooks", True))
        previous = None
        for block in self:
            x = block(x, accumulate=previous is not None and not hooked and not has_hooks(previous))
            previous = block
        return x

    def train(self, mode: bool = True):
        if mode:
            raise RuntimeError(_TRAIN_ERROR)
        return super().train(False)


_TRAIN_ERROR = (
    "a frozen model is an inference snapshot (BatchNorm folded into the weights) and cannot train: "
    "train the original model, then call resnet_fused.freeze(model) again"
)


_COPY_ERROR = (
    "a frozen model cannot be copied or pickled (it holds oneDNN-packed weights and generated "
    "forwards): save or copy the original model and call resnet_fused.freeze() on that"
)


class FrozenModel(nn.Module):
    """A frozen snapshot of an eval-mode model for CPU inference (see ``resnet_fused.freeze``).

    Parameter and buffer changes made to the original model after ``freeze()`` are not seen:
    freeze it again. Refuses ``.train()`` and autograd.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype, packed: bool):
        super().__init__()
        self.model = model
        self.dtype = dtype
        self.packed = packed
        self.training = False

    def forward(self, *args, **kwargs):
        args = tuple(self._prepare(a) for a in args)
        kwargs = {k: self._prepare(v) for k, v in kwargs.items()}
        with torch.no_grad():
            return self.model(*args, **kwargs)

    def _prepare(self, x):
        if not isinstance(x, torch.Tensor):
            return x
        if x.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(
                "a frozen model does not support autograd (its input requires grad): use the original, "
                "unfrozen model to compute gradients, or pass input.detach()"
            )
        if x.device.type != "cpu":
            raise RuntimeError(f"a frozen model runs on the CPU; got an input on {x.device}")
        if x.is_floating_point():
            x = x.to(self.dtype)
            if x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
        return x

    def train(self, mode: bool = True):
        if mode:
            raise RuntimeError(_TRAIN_ERROR)
        return super().train(False)

    def requires_grad_(self, requires_grad: bool = True):
        if requires_grad:
            raise RuntimeError("a frozen model does not support autograd: its tensors are constants")
        return super().requires_grad_(False)

    def _apply(self, fn, *args, **kwargs):
        # .to(), .cuda(), .half(), .float(): the packed weights are fixed CPU tensors in self.dtype.
        raise RuntimeError(
            "a frozen model is a fixed CPU snapshot in one dtype: it cannot be moved or cast; "
            "call resnet_fused.freeze(model, dtype=...) on the original model instead"
        )

    def __deepcopy__(self, memo):
        raise TypeError(_COPY_ERROR)

    def __reduce_ex__(self, protocol):
        raise TypeError(_COPY_ERROR)

    def extra_repr(self) -> str:
        why = PROBE_FAILURES.get(self.dtype, "unavailable")
        how = ("BatchNorm folded, oneDNN-packed weights, ReLU/add post-ops" if self.packed
               else f"fallback: unfrozen fused cpu modules (oneDNN path not used: {why})")
        return (f"frozen snapshot, dtype={str(self.dtype).removeprefix('torch.')}, channels_last, {how}; "
                "parameter changes after freeze() are not seen (freeze again); no .train(), no autograd")


def _training_modules(model: nn.Module) -> list[str]:
    return [name or type(model).__name__ for name, m in model.named_modules() if m.training]


def freeze(model: nn.Module, dtype: torch.dtype = torch.float32) -> FrozenModel:
    """A frozen snapshot of eval-mode ``model`` for fast CPU inference in ``dtype``
    (``torch.float32`` or ``torch.bfloat16``).

    BatchNorm is folded into the conv weights once, the weights are packed once in oneDNN's
    layout, and each conv runs with its ReLU and residual add + ReLU as oneDNN post-ops on
    channels_last activations. ``model`` is not modified.

    **Snapshot**: parameter or running-statistic changes made to ``model`` after freezing are
    not seen by the frozen model; freeze again. The frozen model refuses ``.train()`` and
    inputs that require grad (grad mode alone is fine: nothing is recorded). Inputs are cast to
    ``dtype`` (4-D ones to channels_last). Where the private oneDNN ops are missing or fail a
    probe, the result runs the unfrozen ``convert(model, backend="cpu")`` modules instead (same
    answers, same contract; ``.packed`` is False).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"freeze expects an nn.Module, got {type(model).__name__}")
    if dtype not in FREEZE_DTYPES:
        raise ValueError(f"freeze supports dtype torch.float32 or torch.bfloat16, got {dtype}")
    training = _training_modules(model)
    if training:
        shown = ", ".join(training[:3]) + (", ..." if len(training) > 3 else "")
        raise RuntimeError(
            f"freeze needs a model in eval mode (BatchNorm is folded from its running statistics); "
            f"in training mode: {shown}. Call model.eval() first"
        )
    devices = {t.device.type for t in (*model.parameters(), *model.buffers())}
    if devices - {"cpu"}:
        raise ValueError(f"freeze is for CPU inference; the model has tensors on {sorted(devices - {'cpu'})}: "
                         "call model.cpu() first")
    backend = "cpu" if "cpu" in backends.available_backends() else "auto"
    fused = convert(model, backend=backend)  # a deep copy
    packed = mkldnn_usable(dtype)
    if packed:
        fused = _freeze_convs(fused, dtype)
    _cast_unfrozen(fused, dtype)
    return FrozenModel(fused.eval(), dtype, packed)


def _freeze_convs(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Replace every fused conv (and every plain conv) with a FrozenConv2d, the torchvision
    blocks made of them with FrozenBlocks, and Sequentials of those with FrozenStages."""
    done: dict[int, nn.Module] = {}

    def frozen(child: nn.Module) -> nn.Module | None:
        # FrozenConv2d applies ReLU or nothing; other activations stay with the fused conv.
        # A TF-style "same" conv pads by the input's size on each call: it stays fused, unfrozen.
        frozen_act = (isinstance(child, FusedConv2d) and child.act.kind in (Kind.IDENTITY, Kind.RELU)
                      and not child.same_padding)
        if frozen_act and child.folded_bn.running_mean is not None:
            return FrozenConv2d.from_conv(child, child.folded_bn, child.relu, dtype)
        if is_plain_conv(child):
            return FrozenConv2d.from_conv(child, None, False, dtype)
        if type(child) in FOLDED and child.running_mean is not None:
            return nn.Identity()  # applied by the frozen conv before it
        if type(child) in (FusedBasicBlock, FusedBottleneck):
            convs = [getattr(child, n) for n in ("conv1", "conv2", "conv3") if hasattr(child, n)]
            if all(type(c) is FrozenConv2d for c in convs) and not has_hooks(child) and "forward" not in child.__dict__:
                return FrozenBlock(child)
        if (type(child) is nn.Sequential and len(child) and not has_hooks(child) and "forward" not in child.__dict__
                and all(type(b) is FrozenBlock for b in child)):
            return FrozenStage(OrderedDict(child._modules))
        return None

    def visit(parent: nn.Module) -> None:  # children first: blocks see their frozen convs
        for name, child in list(parent.named_children()):
            if id(child) not in done:
                visit(child)
                replacement = frozen(child)
                done[id(child)] = child if replacement is None else replacement
            setattr(parent, name, done[id(child)])

    visit(model)
    replacement = frozen(model)
    return model if replacement is None else replacement


def _cast_unfrozen(model: nn.Module, dtype: torch.dtype) -> None:
    """``dtype`` for the tensors of every module that is not a FrozenConv2d (pooling, the head,
    anything freeze left as it was), without gradients."""
    for module in model.modules():
        if isinstance(module, FrozenConv2d):
            continue
        for name, p in module._parameters.items():
            if p is not None:
                p = p.detach().to(dtype) if p.is_floating_point() else p.detach()
                if p.dim() == 4:  # conv weights the fallback (or an unfrozen conv) runs on channels_last input
                    p = p.contiguous(memory_format=torch.channels_last)
                module._parameters[name] = nn.Parameter(p, requires_grad=False)
        for name, b in module._buffers.items():
            if b is not None and b.is_floating_point():
                module._buffers[name] = b.to(dtype)
