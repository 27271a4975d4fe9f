"""Fused modules that stand in for Conv2d → BatchNorm2d (→ ReLU) chains and ResNet blocks.

State stays where the original model kept it, so ``state_dict()`` keys and values do not change:
``FusedConv2d`` *is* an ``nn.Conv2d`` (same ``weight``/``bias``), and the BatchNorm it absorbs
stays registered in its old slot as a ``FoldedBatchNorm2d``: same parameters and buffers, but its
forward passes the input through, because the fused conv has already applied it.

Every BatchNorm mode runs fused: eval without gradients through the inference op
(``conv_bn_act``); training, ``track_running_stats=False`` and eval with autograd recording
(frozen-BN fine-tuning) through the training op (training.py), with nn.BatchNorm2d's running-
statistics semantics; autocast casts as the unfused conv would. float64, the ``reference``
backend and a residual whose dtype would promote run the unfused modules.
"""

from __future__ import annotations

import copy
import sys

import torch
from torch import fx, nn

from . import backends, functional, tuning
from .ops import reference
from .ops.activation import IDENTITY, RELU, Activation, Kind, resolve
from .ops.shapes import output_size
from .sync_batch_norm import sync_group_size


def share_state(folded: nn.Module, bn: nn.Module) -> None:
    """Make ``folded`` hold the very slots of ``bn``, None entries included:
    BatchNorm2d(bias=False) has a weight and no bias, which the constructor cannot express on
    every torch version."""
    folded._parameters = dict(bn._parameters)
    folded._buffers = dict(bn._buffers)
    folded._non_persistent_buffers_set = set(bn._non_persistent_buffers_set)
    folded.train(bn.training)


class FoldedBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d whose normalisation is applied by the ``FusedConv2d`` before it.

    Holds the very same parameter and buffer tensors as the BatchNorm2d it replaces.
    """

    def __init__(self, bn: nn.BatchNorm2d):
        super().__init__(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, device="meta")
        share_state(self, bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class FoldedSyncBatchNorm(nn.SyncBatchNorm):
    """A SyncBatchNorm applied by the ``FusedConv2d`` before it, across the same process group;
    holds the very same parameter and buffer tensors (and ``process_group``) as the original."""

    def __init__(self, bn: nn.SyncBatchNorm):
        super().__init__(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                         bn.process_group, device="meta")
        share_state(self, bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def frozen_batch_norm_type() -> type | None:
    """torchvision's FrozenBatchNorm2d class if torchvision.ops is loaded (a model cannot hold
    one otherwise); looked up, not imported: importing torchvision.ops imports Triton."""
    return getattr(sys.modules.get("torchvision.ops.misc"), "FrozenBatchNorm2d", None)


class FoldedFrozenBatchNorm2d(nn.Module):
    """A torchvision ``FrozenBatchNorm2d`` (the backbone norm of torchvision's detection models:
    running statistics and affine parameters as buffers, never updated, no gradients) applied by
    the ``FusedConv2d`` before it; holds the very same buffers as the original (same state_dict
    keys; ``reference.frozen_batch_norm`` is its forward)."""

    frozen = True  # eval-mode BatchNorm whatever the module's mode

    def __init__(self, bn: nn.Module):
        super().__init__()
        self.eps = bn.eps
        share_state(self, bn)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # As FrozenBatchNorm2d: a BatchNorm2d checkpoint's num_batches_tracked is dropped.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def num_features(self) -> int:
        return self.running_mean.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


FOLDED = (FoldedBatchNorm2d, FoldedSyncBatchNorm, FoldedFrozenBatchNorm2d)  # the norms a FusedConv2d applies


class _PassThrough:
    """An activation module the ``FusedConv2d`` before it applies: its forward passes the input
    through. Each folded class is a subclass of the stock one it replaces, with the same
    attributes (``inplace``, bounds, slope), so a forward that inspects the slot
    (``if isinstance(self.act, nn.ReLU): x = self.act(x)``) takes the branch it took when
    convert traced it; an ``nn.Identity`` there sent it down the other branch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class FoldedReLU(_PassThrough, nn.ReLU):
    pass


class FoldedReLU6(_PassThrough, nn.ReLU6):
    pass


class FoldedHardtanh(_PassThrough, nn.Hardtanh):
    pass


class FoldedLeakyReLU(_PassThrough, nn.LeakyReLU):
    pass


class FoldedSiLU(_PassThrough, nn.SiLU):
    pass


class FoldedHardswish(_PassThrough, nn.Hardswish):
    pass


class FoldedGELU(_PassThrough, nn.GELU):
    pass


_FOLDED_ACTIVATIONS = {nn.ReLU: FoldedReLU, nn.ReLU6: FoldedReLU6, nn.Hardtanh: FoldedHardtanh,
                       nn.LeakyReLU: FoldedLeakyReLU, nn.SiLU: FoldedSiLU, nn.Hardswish: FoldedHardswish,
                       nn.GELU: FoldedGELU}


def can_fold(module: nn.Module) -> bool:
    """Whether an activation module has a pass-through class to leave in its slot (timm's own
    GELU modules have none: they fold only inside its norm + activation modules)."""
    return type(module) in _FOLDED_ACTIVATIONS


def folded_activation(module: nn.Module) -> nn.Module:
    """The pass-through that takes the slot of ``module`` (a stock activation module whose
    activation a fused conv now applies): its folded class, same attributes."""
    folded = copy.deepcopy(module)
    folded.__class__ = _FOLDED_ACTIVATIONS[type(module)]
    return folded


def timm_norm_act_types() -> dict[str, type]:
    """timm's BatchNorm + activation classes by name, if timm's norm_act module is loaded (a
    model cannot hold one otherwise); looked up, not imported."""
    module = sys.modules.get("timm.layers.norm_act")
    names = ("BatchNormAct2d", "SyncBatchNormAct", "FrozenBatchNormAct2d")
    return {name: getattr(module, name) for name in names if hasattr(module, name)}


def is_frozen_batch_norm(module: nn.Module) -> bool:
    """torchvision's FrozenBatchNorm2d or timm's FrozenBatchNormAct2d: the same arithmetic
    (``reference.frozen_batch_norm``) on buffers that never change."""
    return type(module) in (frozen_batch_norm_type(), timm_norm_act_types().get("FrozenBatchNormAct2d"))


def norm_act_activation(module: nn.Module) -> Activation | None:
    """For one of timm's norm + activation modules (exact class) that a fused conv can stand in
    for, the activation it applies (IDENTITY when none); None for any other module, and for one
    whose activation is not one a fused conv applies (``Activation.from_module``), whose dropout
    is not the identity, or whose parts have hooks. Its normalisation is its base class's
    (BatchNorm2d, SyncBatchNorm, or FrozenBatchNorm2d's arithmetic); then ``act(drop(y))``."""
    if type(module) not in timm_norm_act_types().values() or has_hooks(module):
        return None
    # SyncBatchNormAct gets drop and act from timm's convert_sync_batchnorm, and may lack them.
    drop, act = getattr(module, "drop", None), getattr(module, "act", None)
    if drop is not None and (type(drop) is not nn.Identity or has_hooks(drop)):
        return None
    if act is None:
        return IDENTITY
    return None if has_hooks(act) else Activation.from_module(act)


def norm_features(bn: nn.Module) -> int:
    """The channel count of a plain BatchNorm2d, SyncBatchNorm or frozen BatchNorm."""
    return bn.running_mean.shape[0] if is_frozen_batch_norm(bn) else bn.num_features


class FusedConv2d(nn.Conv2d):
    """``act(bn(conv(x)) [+ residual])`` as one op. The activation: ``act=`` (an
    ``ops.activation.Activation`` or a stock activation module: ``nn.SiLU()``, ``nn.ReLU6()``, ...)
    or ``relu=`` (True: ReLU, False: none); neither: ReLU; both: a ValueError. In training, an
    activation other than ReLU/none cannot follow a residual (training.py says why)."""

    def __init__(self, conv: nn.Conv2d, bn: FoldedBatchNorm2d, relu: bool | None = None, backend: str = "auto", *,
                 act: Activation | nn.Module | None = None):
        if not isinstance(bn, FOLDED):
            raise TypeError("FusedConv2d needs the FoldedBatchNorm2d/FoldedSyncBatchNorm/FoldedFrozenBatchNorm2d that "
                            "now holds the BatchNorm's state")
        padding = numeric_padding(conv)
        if padding is None:
            raise ValueError("FusedConv2d supports zero padding that is the same on both sides (numbers, 'valid', or "
                             f"'same' with an odd dilated kernel), not padding={conv.padding!r}, "
                             f"padding_mode={conv.padding_mode!r}")
        if bn.num_features != conv.out_channels:
            raise ValueError(f"BatchNorm2d has {bn.num_features} features but the conv has {conv.out_channels} outputs")
        backends.check_backend_name(backend)
        activation = resolve(act, relu, "FusedConv2d")
        super().__init__(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, padding,
            conv.dilation, conv.groups, conv.bias is not None, device="meta",
        )
        self.weight = conv.weight
        self.bias = conv.bias
        self.train(conv.training)
        # timm's Conv2dSame: the input is padded by its size first (pad_same), as it did.
        self.same_padding = type(conv) is timm_same_conv_type()
        # A plain attribute, not a submodule: the BatchNorm's state is registered (and saved)
        # once, in its original slot.
        object.__setattr__(self, "folded_bn", bn)
        self.act = activation
        self.backend = backend
        # Set when a block's add + ReLU ride in this conv's epilogue; residual_in_place when
        # that add was in place (``out += identity``), which keeps the conv output's dtype.
        self.residual_fused = False
        self.residual_in_place = False

    @property
    def relu(self) -> bool:
        """Whether the activation is ReLU (convert's view: it fuses ReLU or nothing); setting it
        sets ``act`` to ReLU or to the identity."""
        return self.act.kind == Kind.RELU

    @relu.setter
    def relu(self, value: bool) -> None:
        self.act = RELU if value else IDENTITY

    def __setstate__(self, state):
        # A module pickled before activations existed holds relu, not act.
        if "act" not in state:
            state["act"] = RELU if state.pop("relu", True) else IDENTITY
        state.setdefault("same_padding", False)
        super().__setstate__(state)

    def extra_repr(self) -> str:
        base = super().extra_repr() + (", same_padding=True" if self.same_padding else "")
        if self.act.kind in (Kind.IDENTITY, Kind.RELU):
            return f"{base}, relu={self.relu}, backend={self.backend!r}"
        return f"{base}, act={self.act}, backend={self.backend!r}"

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(x, fx.Proxy) or isinstance(residual, fx.Proxy):
            return self._record(x, residual)
        if self.same_padding:
            from timm.layers.padding import pad_same  # the Conv2dSame it replaced came from there

            x = pad_same(x, self.kernel_size, self.stride, self.dilation)
        bn = self.folded_bn
        weight, bias = self.weight, self.bias
        if torch.is_autocast_enabled(x.device.type):
            # What autocast does to the unfused conv: inputs cast to its dtype; the BatchNorm
            # then runs on that dtype with its own (fp32) parameters, statistics in fp32.
            dtype = torch.get_autocast_dtype(x.device.type)
            x, weight = _autocast(x, dtype), _autocast(weight, dtype)
            bias = _autocast(bias, dtype) if bias is not None else None
        if isinstance(residual, torch.Tensor) and self.residual_in_place and residual.dtype != x.dtype != torch.float64:
            residual = residual.to(x.dtype)  # an in-place add does not promote
        backend = backends.resolve(self.backend, x.device)  # raises where a named backend cannot run
        if backends.get(backend).is_reference or not self._fusable(x, weight, residual):
            return reference.conv_bn_act_modules(x, self, bn, residual, self.act, self.residual_in_place)
        if isinstance(bn, FoldedFrozenBatchNorm2d):
            # Eval-mode BatchNorm in every mode; its buffers take no gradient and no update.
            training, momentum, tracked, track = False, 0.0, None, True
        else:
            training, momentum, track = bn.training, bn.momentum, bn.track_running_stats
            tracked = bn.num_batches_tracked if track else None
        # The live parameters and buffers on every call: nothing folded ahead of time, so an
        # optimizer step, a load_state_dict or a write through .data is always seen.
        stride, padding, dilation = list(self.stride), list(self.padding), list(self.dilation)
        per_channel = {"bias": bias, "bn_weight": bn.weight, "bn_bias": bn.bias,
                       "running_mean": bn.running_mean, "running_var": bn.running_var}
        functional.check_conv_bn_act(x, weight, per_channel, bn.eps, residual, stride, padding, dilation, self.groups)
        if self._tunes():
            backend = self.measured_backend(x, weight, residual, backend)
            if backends.get(backend).is_reference:  # the unfused ops measured faster here
                return reference.conv_bn_act_modules(x, self, bn, residual, self.act, self.residual_in_place)
        return functional.run_unit(
            x, weight, bn.running_mean, bn.running_var, training, momentum, bn.eps, bias, bn.weight, bn.bias,
            tracked, track, residual, stride,
            padding, dilation, self.groups, self.act, backend, isinstance(bn, FoldedSyncBatchNorm),
            getattr(bn, "process_group", None),
        )

    def _tunes(self) -> bool:
        """Whether this call's backend is measured (tuning.py): "auto", eager, and not a
        SyncBatchNorm training unit across processes (ranks could time different winners)."""
        if self.backend != "auto" or torch.compiler.is_compiling() or not tuning.enabled():
            return False
        bn = self.folded_bn
        return not (isinstance(bn, FoldedSyncBatchNorm) and bn.training and sync_group_size(bn.process_group) > 1)

    def measured_backend(self, x: torch.Tensor, weight: torch.Tensor, residual=None, fallback: str | None = None) -> str:
        """The backend ``backend="auto"`` runs a call on ``x`` with (autocast-cast) ``weight`` and
        ``residual`` with: the unit's recorded choice, or the fastest candidate, timed now
        (tuning.py); ``fallback`` (default: the device rule) where no candidate could run it.
        ``resnet-fused bench --per-layer`` shows it per unit."""
        frozen = isinstance(self.folded_bn, FoldedFrozenBatchNorm2d)
        recording = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, weight, self.bias, self.folded_bn.weight,
                                                        self.folded_bn.bias, residual))
        mode = ("train" if self.folded_bn.training and not frozen else "eval") + ("+grad" if recording else "")
        if isinstance(self.folded_bn, FoldedSyncBatchNorm) and torch.distributed.is_available() \
                and torch.distributed.is_initialized():
            mode += "+sync"  # a process group's statistics: other code (torch's own refuses CPU tensors)
        key = tuning.unit_key(x, weight, residual, self.stride, self.padding, self.dilation, self.groups,
                              self.act.kind.name, mode)
        fallback = fallback or backends.resolve("auto", x.device)
        return tuning.choose(key, x.device, lambda name: self._trial(name, x, residual, recording), fallback)

    def _trial(self, backend: str, x: torch.Tensor, residual, recording: bool) -> None:
        """One call of this unit on ``backend`` as the model would make it, changing nothing the
        model holds or the caller sees: the running statistics live in clones (a shallow copy
        of the module and of its folded BatchNorm; the parameters are shared, never copied, as
        they may be non-leaf tensors of ``torch.func.functional_call`` or sit beside a process
        group); the backward is ``torch.autograd.grad`` (no ``.grad`` accumulates); ``forward``,
        not ``__call__``, so no module hook fires; and the tensors autograd saves bypass the
        caller's saved-tensor hooks (non-reentrant checkpointing counts them)."""
        unit = copy.copy(self)
        unit.backend = backend
        bn = copy.copy(self.folded_bn)
        object.__setattr__(bn, "_buffers", {name: None if b is None else b.clone()
                                            for name, b in self.folded_bn._buffers.items()})
        object.__setattr__(unit, "folded_bn", bn)
        x = x.detach().requires_grad_(x.requires_grad)
        if isinstance(residual, torch.Tensor):
            residual = residual.detach().requires_grad_(residual.requires_grad)
        tuning.call_once(lambda: unit.forward(x, residual), [x, unit.weight, unit.bias, bn.weight, bn.bias, residual],
                         recording)

    def _record(self, x, residual) -> fx.Proxy:
        """While torch.fx traces a model: this call as one ``call_module`` node, as a tracer
        records a leaf module (the fused op dispatches on device and dtype, which a Proxy does
        not have), then the folded BatchNorm, an identity, applied to its result. That second
        node keeps the BatchNorm (its parameters and buffers, in its original slot) in a
        GraphModule built from the trace, which holds only the modules its nodes name."""
        tracer = (x if isinstance(x, fx.Proxy) else residual).tracer
        path = tracer.path_of_module(self)
        if not path:
            raise RuntimeError("a FusedConv2d cannot be the root of an fx trace: trace the model that holds it")
        out = tracer.create_proxy("call_module", path, (x,), {} if residual is None else {"residual": residual})
        try:
            bn_path = tracer.path_of_module(self.folded_bn)
        except NameError:
            return out  # a BatchNorm registered nowhere in the traced model: it goes along as our attribute
        return tracer.create_proxy("call_module", bn_path, (out,), {})

    def _fusable(self, x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None) -> bool:
        """Whether a fused op computes what the unfused modules would here."""
        if torch.float64 in (x.dtype, weight.dtype):
            return False  # no fused kernel; other dtype errors are reported by functional.py
        if isinstance(self.folded_bn, FoldedFrozenBatchNorm2d) and self.folded_bn.weight.dtype != x.dtype:
            # FrozenBatchNorm2d's x * scale + shift promotes to its buffers' dtype (fp32 under
            # autocast), where the fused op keeps the conv's: the unfused modules keep that dtype.
            return False
        if residual is None:
            return True
        if not isinstance(residual, torch.Tensor):
            return False  # a Python number (``out + x.size(1)``): the unfused add takes it
        # The unfused add promotes (an fp32 residual lifts an autocast bf16 block output to fp32)
        # and broadcasts (a per-channel residual); the fused ops take the output's dtype and shape.
        p, q = (output_size(size, k, s, pad, d) for size, k, s, pad, d in
                zip(x.shape[2:], self.kernel_size, self.stride, self.padding, self.dilation))
        return residual.dtype == x.dtype and residual.shape == (x.shape[0], self.out_channels, p, q)


def _autocast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # autocast casts floating tensors other than float64 (cached_cast's eligibility rule).
    return t.to(dtype) if t.is_floating_point() and t.dtype != torch.float64 else t


_HOOK_DICTS = (
    "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
    "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
)


def has_hooks(module: nn.Module) -> bool:
    """Any per-module hook: a fused replacement would not call it (or not at the same point)."""
    return any(getattr(module, name, None) for name in _HOOK_DICTS)


def numeric_padding(conv: nn.Conv2d) -> tuple[int, int] | None:
    """The conv's zero padding as numbers: ``padding='valid'`` is 0, and ``'same'`` (stride 1,
    PyTorch's rule) is half the dilated kernel's reach where that is even on both sides; None
    where the padding is asymmetric ('same' with an even reach) or not zeros."""
    if conv.padding_mode != "zeros":
        return None
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        reach = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        return None if any(r % 2 for r in reach) else (reach[0] // 2, reach[1] // 2)
    return tuple(conv.padding)


def is_plain_conv(module: nn.Module) -> bool:
    return type(module) is nn.Conv2d and numeric_padding(module) is not None and not has_hooks(module)


def timm_same_conv_type() -> type | None:
    """timm's Conv2dSame (TensorFlow's "SAME": padded by the input's size on each call, the extra
    row or column at the end) if timm's module is loaded; looked up, not imported."""
    return getattr(sys.modules.get("timm.layers.conv2d_same"), "Conv2dSame", None)


def is_fusible_conv(module: nn.Module) -> bool:
    """A plain conv, or timm's Conv2dSame (exactly; zero padding, no hooks), whose forward is
    ``pad_same`` then a conv without padding: ``FusedConv2d(same_padding=True)``."""
    if type(module) is not nn.Conv2d and type(module) is not timm_same_conv_type():
        return False
    return numeric_padding(module) is not None and not has_hooks(module)


def is_plain_batch_norm(module: nn.Module) -> bool:
    """Exactly one of the norms whose semantics the fused ops reproduce: nn.BatchNorm2d,
    nn.SyncBatchNorm and torchvision's FrozenBatchNorm2d, without hooks."""
    plain = type(module) in (nn.BatchNorm2d, nn.SyncBatchNorm) or type(module) is frozen_batch_norm_type()
    return plain and not has_hooks(module)


def is_fusible_norm(module: nn.Module) -> bool:
    """A plain BatchNorm, or one of timm's norm + activation modules whose activation a fused
    conv applies (``norm_act_activation``)."""
    return is_plain_batch_norm(module) or norm_act_activation(module) is not None


def fuse_conv_bn(conv: nn.Conv2d, bn: nn.Module, relu: bool | None = None, backend: str = "auto", *,
                 act: Activation | nn.Module | None = None) -> tuple[FusedConv2d, nn.Module]:
    """The pair of modules that replace ``conv`` and ``bn`` (a fusible norm) in their slots; the
    activation as in FusedConv2d. A timm norm + activation module's own activation must be the
    one passed: its folded stand-in keeps the state, not the activation."""
    activation = resolve(act, relu, "fuse_conv_bn")
    own = norm_act_activation(bn)
    if own not in (None, IDENTITY) and activation != own:
        raise ValueError(f"{type(bn).__name__} applies {own}: fuse it with act={own}, not {activation}")
    folded = (FoldedSyncBatchNorm if isinstance(bn, nn.SyncBatchNorm)
              else FoldedFrozenBatchNorm2d if is_frozen_batch_norm(bn) else FoldedBatchNorm2d)(bn)
    return FusedConv2d(conv, folded, backend=backend, act=activation), folded


def _fuse_downsample(downsample: nn.Module | None, backend: str) -> nn.Module | None:
    """torchvision's shortcut is Sequential(conv1x1, bn): fused in place, keys kept."""
    if downsample is None:
        return None
    if (
        type(downsample) is nn.Sequential
        and not has_hooks(downsample)
        and len(downsample) == 2
        and is_plain_conv(downsample[0])
        and is_plain_batch_norm(downsample[1])
        and norm_features(downsample[1]) == downsample[0].out_channels
    ):
        conv, bn = fuse_conv_bn(downsample[0], downsample[1], relu=False, backend=backend)
        return nn.Sequential(conv, bn)
    return downsample  # anything else runs as it is


class FusedBasicBlock(nn.Module):
    """torchvision BasicBlock: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))`` as two
    fused convs, the residual add and final ReLU riding in the second one's epilogue."""

    def __init__(self, block: nn.Module, backend: str = "auto"):
        super().__init__()
        self.conv1, self.bn1 = fuse_conv_bn(block.conv1, block.bn1, relu=True, backend=backend)
        self.relu = block.relu
        self.conv2, self.bn2 = fuse_conv_bn(block.conv2, block.bn2, relu=True, backend=backend)
        self.conv2.residual_fused = self.conv2.residual_in_place = True  # torchvision: out += identity
        self.downsample = _fuse_downsample(block.downsample, backend)
        self.stride = block.stride
        self.training = block.training  # not .train(): children keep their own modes (frozen BNs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return self.conv2(self.conv1(x), residual=identity)


class FusedBottleneck(nn.Module):
    """torchvision Bottleneck: 1×1 → 3×3 → 1×1 fused convs; the residual add and final ReLU
    ride in the last one's epilogue."""

    def __init__(self, block: nn.Module, backend: str = "auto"):
        super().__init__()
        self.conv1, self.bn1 = fuse_conv_bn(block.conv1, block.bn1, relu=True, backend=backend)
        self.conv2, self.bn2 = fuse_conv_bn(block.conv2, block.bn2, relu=True, backend=backend)
        self.conv3, self.bn3 = fuse_conv_bn(block.conv3, block.bn3, relu=True, backend=backend)
        self.conv3.residual_fused = self.conv3.residual_in_place = True
        self.relu = block.relu
        self.downsample = _fuse_downsample(block.downsample, backend)
        self.stride = block.stride
        self.training = block.training  # not .train(): children keep their own modes (frozen BNs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return self.conv3(self.conv2(self.conv1(x)), residual=identity)
