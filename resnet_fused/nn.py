"""Fused modules that stand in for Conv2d → BatchNorm2d (→ ReLU) chains and ResNet blocks.

State stays where the original model kept it, so ``state_dict()`` keys and values do not change:
``FusedConv2d`` *is* an ``nn.Conv2d`` (same ``weight``/``bias``), and the BatchNorm it absorbs
stays registered in its old slot as a ``FoldedBatchNorm2d``: same parameters and buffers, but its
forward passes the input through, because the fused conv has already applied it.

In eval mode with running statistics, and with no gradient to record, the fused op runs. In
every other case (training, ``track_running_stats=False``, autograd recording) the module
computes exactly what the unfused modules compute, through ``reference`` — the seam where the
fused training op will slot in.
"""

from __future__ import annotations

import torch
from torch import nn

from . import backends, functional, reference
from .ops.conv_bn_act import output_memory_format


class FoldedBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d whose normalisation is applied by the ``FusedConv2d`` before it.

    Holds the very same parameter and buffer tensors as the BatchNorm2d it replaces.
    """

    def __init__(self, bn: nn.BatchNorm2d):
        super().__init__(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, device="meta")
        for name, tensor in [*bn.named_parameters(recurse=False), *bn.named_buffers(recurse=False)]:
            setattr(self, name, tensor)
        self.train(bn.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class FusedConv2d(nn.Conv2d):
    """``act(bn(conv(x)) [+ residual])`` as one op; ``act`` is ReLU when ``relu`` is set."""

    def __init__(self, conv: nn.Conv2d, bn: FoldedBatchNorm2d, relu: bool, backend: str = "auto"):
        if not isinstance(bn, FoldedBatchNorm2d):
            raise TypeError("FusedConv2d needs the FoldedBatchNorm2d that now holds the BatchNorm's state")
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("FusedConv2d supports zero padding given as numbers, not padding_mode/'same'")
        if bn.num_features != conv.out_channels:
            raise ValueError(f"BatchNorm2d has {bn.num_features} features but the conv has {conv.out_channels} outputs")
        backends.check_backend_name(backend)
        super().__init__(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
            conv.dilation, conv.groups, conv.bias is not None, device="meta",
        )
        self.weight = conv.weight
        self.bias = conv.bias
        self.train(conv.training)
        # A plain attribute, not a submodule: the BatchNorm's state is registered (and saved)
        # once, in its original slot.
        object.__setattr__(self, "folded_bn", bn)
        self.relu = relu
        self.backend = backend
        self._fold_cache: tuple | None = None

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, relu={self.relu}, backend={self.backend!r}"

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        bn = self.folded_bn
        batch_stats = bn.training or bn.running_mean is None
        recording = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, residual, self.weight, self.bias, bn.weight, bn.bias)
        )
        if batch_stats or recording or x.dtype == torch.float64:
            return reference.conv_bn_act_modules(x, self, bn, residual, self.relu)
        backend = backends.resolve(self.backend, x.device)
        if backend == "reference":
            return reference.conv_bn_act_modules(x, self, bn, residual, self.relu)
        weight, scale, shift = self._folded(backend, output_memory_format(x))
        return functional.conv_bn_act(
            x, weight, scale, shift, residual, stride=self.stride, padding=self.padding,
            dilation=self.dilation, groups=self.groups, relu=self.relu, backend=backend,
        )

    def _folded(
        self, backend: str, memory_format: torch.memory_format
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(weight, scale, shift) in the form ``backend`` wants, recomputed only when a
        parameter or BN buffer has changed (version counter or storage) or the activations'
        memory format has: oneDNN and cuDNN want the weight in the input's layout, and would
        otherwise copy it on every call."""
        if torch.compiler.is_compiling():
            # Under torch.compile the fold is part of the graph (no cache lookups, which
            # Dynamo cannot trace); Inductor fuses it into a few small kernels.
            return self._fold(backend, memory_format)
        bn = self.folded_bn
        sources = (self.weight, self.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
        present = [t for t in sources if t is not None]
        if any(t.is_inference() for t in present):  # inference tensors have no version counter
            return self._fold(backend, memory_format)
        key = (backend, memory_format, bn.eps, *((t._version, t.data_ptr(), t.device, t.dtype) for t in present))
        if self._fold_cache is None or self._fold_cache[0] != key:
            self._fold_cache = (key, self._fold(backend, memory_format))
        return self._fold_cache[1]

    def _fold(self, backend: str, memory_format: torch.memory_format):
        bn = self.folded_bn
        with torch.no_grad():
            scale, shift = functional.fold_batch_norm(
                self.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps
            )
            if backend == "triton":
                # The kernel reads the reduction dimension C contiguously from (K, R, S, C).
                return self.weight.contiguous(memory_format=torch.channels_last), scale, shift
            weight = (self.weight.float() * scale.view(-1, 1, 1, 1)).to(self.weight.dtype)
            return weight.contiguous(memory_format=memory_format), None, shift


def fuse_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d, relu: bool, backend: str) -> tuple[FusedConv2d, FoldedBatchNorm2d]:
    """The pair of modules that replace ``conv`` and ``bn`` in their slots."""
    folded = FoldedBatchNorm2d(bn)
    return FusedConv2d(conv, folded, relu, backend), folded


def _fuse_downsample(downsample: nn.Module | None, backend: str) -> nn.Module | None:
    """torchvision's shortcut is Sequential(conv1x1, bn): fused in place, keys kept."""
    if downsample is None:
        return None
    if (
        isinstance(downsample, nn.Sequential)
        and len(downsample) == 2
        and type(downsample[0]) is nn.Conv2d
        and type(downsample[1]) is nn.BatchNorm2d
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
        self.downsample = _fuse_downsample(block.downsample, backend)
        self.stride = block.stride
        self.train(block.training)

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
        self.relu = block.relu
        self.downsample = _fuse_downsample(block.downsample, backend)
        self.stride = block.stride
        self.train(block.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return self.conv3(self.conv2(self.conv1(x)), residual=identity)
