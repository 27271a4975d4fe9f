"""torchvision's FrozenBatchNorm2d (the backbone norm of its detection models) fused like a
BatchNorm2d in eval mode, in every mode: eval output, frozen-backbone fine-tuning gradients,
state_dict, the report, and autocast, where its dtype promotion keeps the unfused path."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

import resnet_fused
from helpers import CountOps, max_rel_error
from resnet_fused import FoldedFrozenBatchNorm2d, FusedConv2d, _extension

# The cpu backend runs when the extension is built; asked of the build, not of
# available_backends(), which queries the GPU at collection.
pytestmark = pytest.mark.skipif(not _extension.has_cpu_ops(), reason=f"extension not built: {_extension.LOAD_ERROR}")


def _randomized(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, FrozenBatchNorm2d):
                n = m.weight.shape[0]
                m.running_mean.copy_(torch.randn(n) * 0.3)
                m.running_var.copy_(torch.rand(n) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n) + 0.5)
                m.bias.copy_(torch.randn(n) * 0.3)
                m.eps = 1e-3  # its own eps, not BatchNorm2d's default, must be the one applied
    return model


def test_a_frozen_bn_resnet_runs_only_fused_units_and_matches():
    model = _randomized(torchvision.models.resnet18(norm_layer=FrozenBatchNorm2d)).eval()
    converted, report = resnet_fused.convert(model, backend="cpu", report=True)
    assert report.unfused == [] and report.convs_fused == 20 and report.residuals_fused == 8
    assert sum(type(m) is FoldedFrozenBatchNorm2d for m in converted.modules()) == 20
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in converted.modules())
    assert list(converted.state_dict()) == list(model.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(converted.state_dict()[key], value), key
    x = torch.randn(2, 3, 45, 39)
    with torch.no_grad(), CountOps() as counter:
        out = converted(x)
    assert counter.counts["conv_bn_act"] == 20
    assert not {"mul", "add", "relu", "rsqrt"} & set(counter.counts), counter.counts
    with torch.no_grad():
        assert max_rel_error(out, model(x)) < 1e-5


def _net() -> nn.Module:
    return _randomized(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), FrozenBatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 6, 3, stride=2, bias=False), FrozenBatchNorm2d(6),
    ))


def test_fine_tuning_with_a_frozen_backbone_matches_the_original_against_float64():
    """Train mode changes nothing for a frozen norm: running statistics, no update, no gradient
    for its buffers; the input and conv gradients follow the rule (fused error at most 2x the
    original's against float64), median over three draws (a ReLU mask flip moves a gradient)."""
    model = _net().train()
    converted = resnet_fused.convert(model, backend="cpu").train()
    assert all(isinstance(m, FusedConv2d) for m in (converted[0], converted[3]))
    exact = copy.deepcopy(model).double()
    buffers = [b.clone() for b in converted.buffers()]
    ratios = []
    for _ in range(3):
        x = torch.randn(3, 3, 11, 9)
        grads = []
        for net, dtype in ((model, torch.float32), (converted, torch.float32), (exact, torch.float64)):
            xi = x.to(dtype).detach().clone().requires_grad_()
            net.zero_grad()
            out = net(xi)
            (out * torch.linspace(-1, 1, out.numel(), dtype=dtype).view_as(out)).sum().backward()
            grads.append([xi.grad] + [p.grad for p in net.parameters()] + [out.detach()])
        worst = 0.0
        for a, b, c in zip(*grads):
            floor = torch.finfo(torch.float32).eps * c.abs().max().item()
            worst = max(worst, (b.double() - c).abs().max().item() / (2 * (a.double() - c).abs().max().item() + floor))
        ratios.append(worst)
    assert sorted(ratios)[1] <= 1.0, ratios
    for before, after in zip(buffers, converted.buffers()):
        assert torch.equal(before, after)  # never updated


def test_autocast_keeps_the_promoting_unfused_path():
    """Under autocast FrozenBatchNorm2d's x * scale + shift promotes the bf16 conv output to its
    fp32 buffers' dtype; the fused op would keep bf16, so the exact unfused modules run."""
    model = _net().eval()
    converted = resnet_fused.convert(model, backend="cpu")
    x = torch.randn(2, 3, 10, 10)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected, out = model(x), converted(x)
    assert out.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(out, expected)
