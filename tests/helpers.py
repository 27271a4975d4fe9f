"""Model builders and tolerance checks shared by the test files."""

from __future__ import annotations

import io
from collections import Counter

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from resnet_fused.ops.activation import IDENTITY, RELU


def act_args(relu: bool) -> tuple[int, float, float]:
    """The ops' (act, act_a, act_b) arguments of ReLU (``relu``) or no activation."""
    return (RELU if relu else IDENTITY).args


def randomize_batch_norms(model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Give every BatchNorm non-default running stats and affine parameters, so a fused path
    that ignored any of them could not pass."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                if module.running_mean is not None:
                    module.running_mean.copy_(torch.randn(n, generator=generator) * 0.3)
                    module.running_var.copy_(torch.rand(n, generator=generator) * 1.5 + 0.5)
                if module.weight is not None:
                    module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                if module.bias is not None:
                    module.bias.copy_(torch.randn(n, generator=generator) * 0.3)
    return model


def max_rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a − e| / max |e|: one number per tensor, insensitive to near-zero elements."""
    assert not torch.isnan(actual).any(), "NaN in the result"
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max().clamp_min(1e-30)).item()


def assert_grads_close(actual: list[torch.Tensor], expected: list[torch.Tensor], tol: float):
    """Each gradient within ``tol`` of the largest expected gradient entry: a gradient that is
    exactly 0 in theory (a conv bias before batch statistics) is then held to rounding noise
    rather than to a relative error of noise against noise."""
    scale = max(e.double().abs().max().item() for e in expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.shape == e.shape, i
        err = (a.double() - e.double()).abs().max().item()
        assert err <= tol * scale, f"gradient {i}: error {err:.3g} > {tol} x {scale:.3g}"


def assert_low_precision_close(fused: torch.Tensor, unfused: torch.Tensor, exact: torch.Tensor, factor: float = 2.0):
    """The fused result's error against an fp64 ``exact`` is at most ``factor`` × the error of
    the unfused PyTorch computation in the same dtype (plus one ulp-scale floor for the cases
    where the unfused path happens to be exact)."""
    fused_err = (fused.double() - exact).abs().max().item()
    unfused_err = (unfused.double() - exact).abs().max().item()
    floor = torch.finfo(fused.dtype).eps * exact.abs().max().item()
    assert not torch.isnan(fused).any(), "NaN in the fused result"
    assert fused_err <= factor * unfused_err + floor, f"fused error {fused_err:.3g} > {factor} x unfused {unfused_err:.3g}"


def assert_output_close(out: torch.Tensor, exact: torch.Tensor, unfused: torch.Tensor, dtype: torch.dtype,
                        channels_last: bool | None = None):
    """An op's output against the fp64 ``exact`` result: dtype and shape kept, the input's
    memory format kept (when ``channels_last`` is given), fp32 (IEEE) within 1e-5, lower
    precisions by the 2x rule against the ``unfused`` computation in the same dtype."""
    assert out.dtype == dtype and out.shape == exact.shape
    if channels_last is not None:
        assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    if dtype == torch.float32:
        assert max_rel_error(out, exact) < 1e-5
    else:
        assert_low_precision_close(out, unfused, exact)


def pickle_round_trip(module: nn.Module) -> nn.Module:
    """``module`` saved whole with torch.save and loaded back."""
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


class TextbookBlock(nn.Module):
    """The residual block as tutorials write it: Sequentials for conv+BN(+ReLU), the add and
    the final ReLU in the block's own forward."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=True), nn.BatchNorm2d(c_out), nn.ReLU())
        self.conv2 = nn.Sequential(nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out))
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
        self.relu = nn.ReLU()

    def forward(self, x):
        residual = x if self.downsample is None else self.downsample(x)
        out = self.conv2(self.conv1(x))
        out += residual
        return self.relu(out)


def textbook_resnet(width: int = 8, num_classes: int = 5) -> nn.Module:
    """A small ResNet of TextbookBlocks: stem, three stages (the last two strided), head."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
        TextbookBlock(width, width), TextbookBlock(width, 2 * width, 2), TextbookBlock(2 * width, 4 * width, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, num_classes),
    )


# The ops a fused residual unit replaces (what convert must leave none of where it fuses).
LEFTOVER = ("native_batch_norm", "batch_norm", "add", "add_", "relu", "relu_", "threshold")


class CountOps(TorchDispatchMode):
    """The aten ops a block of code dispatches, by name."""

    def __init__(self):
        super().__init__()
        self.counts = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    def leftover(self) -> dict[str, int]:
        return {name: n for name, n in self.counts.items() if name in LEFTOVER}
