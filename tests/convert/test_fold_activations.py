"""convert folds the activation after a conv + BatchNorm into the fused conv: ReLU, ReLU6 and
Hardtanh, LeakyReLU, SiLU, Hardswish, GELU, as a module of their own (which becomes a pass-through of
the same class) or applied by timm's norm + activation modules; a non-ReLU activation applied
as a function, or by a module used twice, runs unfused after the fused conv + BN (applying it
twice would change the answer). Eval output on every backend, a training step against float64,
state_dict, and the report's counts."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import resnet_fused
from helpers import CountOps, max_rel_error
from resnet_fused import FusedConv2d, _extension
from resnet_fused.bench.zoo import randomize_batch_norms, step_ratio
from resnet_fused.ops.activation import Activation, Kind

ACTIVATIONS = [nn.ReLU6(), nn.Hardtanh(-0.5, 1.5), nn.LeakyReLU(0.2), nn.SiLU(inplace=True), nn.Hardswish(), nn.GELU(),
               nn.GELU(approximate="tanh")]


class Chain(nn.Module):
    """conv → BN → act → conv → BN → act: the torchvision Conv2dNormActivation pattern in a
    forward of its own."""

    def __init__(self, act: nn.Module, bias: bool = True):
        super().__init__()
        self.conv1, self.bn1, self.act1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), act
        self.conv2, self.bn2, self.act2 = nn.Conv2d(8, 5, 3, 2, 1, bias=bias), nn.BatchNorm2d(5), copy.deepcopy(act)

    def forward(self, x):
        return self.act2(self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x))))))


def _randomized(build, seed: int = 0) -> nn.Module:
    """``build()`` with seeded weights and randomized BatchNorm statistics and affine parameters."""
    torch.manual_seed(seed)
    return randomize_batch_norms(build(), torch.Generator().manual_seed(seed))


@pytest.mark.backends(reference=True)  # every backend that runs here; triton under the interpreter
@pytest.mark.parametrize("act", ACTIVATIONS, ids=lambda m: type(m).__name__)
def test_an_activation_module_folds_into_the_fused_conv(act, backend):
    model = _randomized(lambda: Chain(act)).eval()
    converted, report = resnet_fused.convert(copy.deepcopy(model), backend=backend, report=True)
    name = type(act).__name__
    assert report.unfused == [] and report.convs_fused == 2 and report.activations_fused == {name: 2}
    assert converted.conv1.act == Activation.from_module(act)
    # The slot keeps a module of the same class and attributes, whose forward passes through.
    assert isinstance(converted.act1, type(act)) and type(converted.act1) is not type(act)
    assert vars(converted.act1).get("inplace") == vars(act).get("inplace")
    assert list(converted.state_dict()) == list(model.state_dict())
    x = torch.randn(2, 3, 13, 11, generator=torch.Generator().manual_seed(1)) * 2
    with torch.no_grad():
        expected = model(x)
        with CountOps() as counter:
            out = converted(x)
    assert max_rel_error(out, expected) < 1e-5
    if backend == "cpu":
        ran = set(counter.counts)
        assert counter.counts["conv_bn_act"] == 2 and not ran & {"silu", "silu_", "hardswish", "hardtanh", "gelu",
                                                                  "leaky_relu", "relu6"}, counter.counts


# Asked of the build: available_backends() would query the GPU at collection.
@pytest.mark.skipif(not _extension.has_cpu_ops(), reason=f"extension not built: {_extension.LOAD_ERROR}")
@pytest.mark.parametrize("act", [nn.SiLU(), nn.Hardswish(), nn.LeakyReLU(0.1), nn.GELU()], ids=lambda m: type(m).__name__)
def test_a_training_step_with_a_folded_activation_matches_against_float64(act):
    """The backward recomputes the pre-activation from the saved conv output; judged with
    zoo.step_ratio (loss, gradients, BatchNorm buffers), median over five draws: the loss is a
    sum that cancels, so one draw's ratio there is rounding noise in either model. No conv bias
    ahead of the BatchNorm: its gradient is 0 in exact arithmetic, and what either model
    computes for it is noise alone."""
    model = _randomized(lambda: Chain(act, bias=False), 2).train()
    converted = resnet_fused.convert(copy.deepcopy(model), backend="cpu").train()
    assert converted.conv1.act.kind != Kind.IDENTITY and converted.conv2.act.kind != Kind.IDENTITY
    g = torch.Generator().manual_seed(3)
    ratios = [step_ratio(model, converted, torch.randn(4, 3, 9, 11, generator=g)) for _ in range(5)]
    assert sorted(ratios)[2] <= 1.0, ratios


class FunctionalAndShared(nn.Module):
    """A functional SiLU and a SiLU module called twice: neither can fold (silu(silu(y)) is not
    silu(y)); the functional ReLU6 neither (only a ReLU, idempotent, folds in that form)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 6, 1), nn.BatchNorm2d(6)
        self.conv3, self.bn3 = nn.Conv2d(6, 6, 1), nn.BatchNorm2d(6)
        self.shared = nn.SiLU()

    def forward(self, x):
        x = F.silu(self.bn1(self.conv1(x)))
        x = self.shared(self.bn2(self.conv2(x)))
        return F.relu6(self.shared(self.bn3(self.conv3(x))))


def test_functional_and_shared_activations_run_after_the_fused_conv():
    model = _randomized(FunctionalAndShared, 4).eval()
    converted, report = resnet_fused.convert(copy.deepcopy(model), backend="cpu", report=True)
    assert report.convs_fused == 3 and not report.activations_fused
    assert all(getattr(converted, f"conv{i}").act.kind == Kind.IDENTITY for i in (1, 2, 3))
    assert type(converted.shared) is nn.SiLU
    x = torch.randn(2, 3, 8, 9)
    with torch.no_grad():
        assert max_rel_error(converted(x), model(x)) < 1e-5


class ModeDependent(nn.Module):
    """A different SiLU module in each mode: folding either would leave the other applying
    SiLU to an output that already went through one."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.train_act, self.eval_act = nn.SiLU(), nn.SiLU()

    def forward(self, x):
        y = self.bn(self.conv(x))
        return self.train_act(y) if self.training else self.eval_act(y)


def test_an_activation_the_two_modes_apply_differently_is_not_folded():
    model = _randomized(ModeDependent, 5)
    converted = resnet_fused.convert(copy.deepcopy(model), backend="cpu")
    assert isinstance(converted.conv, FusedConv2d) and converted.conv.act.kind == Kind.IDENTITY
    assert type(converted.train_act) is nn.SiLU and type(converted.eval_act) is nn.SiLU
    x = torch.randn(2, 3, 7, 7)
    for mode in (False, True):
        model.train(mode), converted.train(mode)
        with torch.no_grad():
            assert max_rel_error(converted(x), model(x)) < 1e-5


def test_timm_norm_act_modules_with_other_activations_fuse():
    timm_layers = pytest.importorskip("timm.layers")
    model = _randomized(lambda: nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False),
                                              timm_layers.BatchNormAct2d(8, act_layer=nn.SiLU),
                                              nn.Conv2d(8, 8, 3, padding=1, bias=False),
                                              timm_layers.BatchNormAct2d(8, act_layer=nn.Hardswish)), 6).eval()
    converted, report = resnet_fused.convert(copy.deepcopy(model), backend="cpu", report=True)
    assert report.unfused == [] and report.activations_fused == {"SiLU": 1, "Hardswish": 1}
    x = torch.randn(2, 3, 10, 9)
    with torch.no_grad():
        assert max_rel_error(converted(x), model(x)) < 1e-5


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "efficientnet_b0"])
def test_torchvision_networks_with_hardswish_and_silu_run_their_chains_fused(name):
    """Conv2dNormActivation with Hardswish/ReLU/SiLU: every conv + BN + activation one op; SE
    blocks, stochastic depth and the classifier stay as they are."""
    torchvision = pytest.importorskip("torchvision")
    model = _randomized(getattr(torchvision.models, name), 7).eval()
    converted, report = resnet_fused.convert(copy.deepcopy(model), backend="cpu", report=True)
    assert all(isinstance(m, resnet_fused.nn.FOLDED) for m in converted.modules() if isinstance(m, nn.BatchNorm2d))
    assert sum(report.activations_fused.values()) > 10
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        assert max_rel_error(converted(x), model(x)) < 1e-4
