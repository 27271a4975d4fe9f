"""convert's norm-activation pass (convert/norm_act.py): a BatchNorm2d that no conv absorbs,
followed by an activation -- pre-activation networks (BatchNorm → ReLU → conv on a concat or a
residual sum), timm's BatchNormAct2d after a concat -- becomes one FusedBatchNormAct2d, and the
activation's module a pass-through. Where the forward does not show that pairing in both modes,
or the activation would be applied twice, nothing changes. Eval outputs, a training step
against float64, state_dict, and the report's counts."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import resnet_fused
from helpers import max_rel_error
from resnet_fused import FusedBatchNormAct2d, FusedConv2d, _extension
from resnet_fused.bench.zoo import randomize_batch_norms, step_ratio
from resnet_fused.ops.activation import Activation, Kind

needs_extension = pytest.mark.skipif(not _extension.has_cpu_ops(), reason=f"extension not built: {_extension.LOAD_ERROR}")


class DenseLayer(nn.Module):
    """DenseNet's layer: BatchNorm → ReLU → 1x1 conv on the concat of its inputs, then
    BatchNorm → ReLU → 3x3 conv; the output joins the concat."""

    def __init__(self, channels: int, growth: int, act: nn.Module):
        super().__init__()
        self.norm1, self.act1 = nn.BatchNorm2d(channels), copy.deepcopy(act)
        self.conv1 = nn.Conv2d(channels, 2 * growth, 1, bias=False)
        self.norm2, self.act2 = nn.BatchNorm2d(2 * growth), copy.deepcopy(act)
        self.conv2 = nn.Conv2d(2 * growth, growth, 3, padding=1, bias=False)

    def forward(self, x):
        return torch.cat([x, self.conv2(self.act2(self.norm2(self.conv1(self.act1(self.norm1(x))))))], 1)


class PreActBlock(nn.Module):
    """He et al. 2016's pre-activation block: x + conv(relu(bn(conv(relu(bn(x))))))."""

    def __init__(self, channels: int):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(channels), nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(channels), nn.Conv2d(channels, channels, 3, padding=1, bias=False)

    def forward(self, x):
        out = self.conv1(F.relu(self.bn1(x)))
        return x + self.conv2(F.relu(self.bn2(out)))


def dense_net(act: nn.Module) -> nn.Module:
    # No bias in the stem: every path from it ends in a BatchNorm, so its gradient is 0 in exact
    # arithmetic and what either model computes is noise alone.
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), DenseLayer(6, 4, act), DenseLayer(10, 4, act),
                         nn.BatchNorm2d(14), copy.deepcopy(act))


def _randomized(build, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_batch_norms(build(), torch.Generator().manual_seed(seed))


@pytest.mark.backends(reference=True)
@pytest.mark.parametrize("act", [nn.ReLU(inplace=True), nn.SiLU(), nn.LeakyReLU(0.2)], ids=lambda m: type(m).__name__)
def test_batch_norms_on_a_concat_pair_with_their_activation(act, backend):
    model = _randomized(lambda: dense_net(act)).eval()
    converted, report = resnet_fused.convert(copy.deepcopy(model), backend=backend, report=True)
    # Each layer's norm1 (on the concat) and the final norm pair with their activation; each
    # norm2 folds into conv1 as before.
    assert report.norm_acts_fused == 3 and report.convs_fused == 2 and report.unfused == [
        (name, reason) for name, reason in report.unfused if type(model.get_submodule(name)) is nn.Conv2d]
    assert isinstance(converted[1].norm1, FusedBatchNormAct2d) and isinstance(converted[3], FusedBatchNormAct2d)
    assert converted[1].norm1.act == Activation.from_module(act)
    assert isinstance(converted[1].act1, type(act)) and type(converted[1].act1) is not type(act)
    assert isinstance(converted[1].conv1, FusedConv2d)
    assert list(converted.state_dict()) == list(model.state_dict())
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(2, 3, 7, 9, generator=g) * 2
        with torch.no_grad():
            exact = copy.deepcopy(model).double()(x.double())
            assert max_rel_error(converted(x), exact) <= max(2 * max_rel_error(model(x), exact), 1e-5)


@needs_extension
@pytest.mark.parametrize("act", [nn.ReLU(), nn.SiLU()], ids=lambda m: type(m).__name__)
def test_a_training_step_matches_against_float64(act):
    """Loss, gradients and BatchNorm buffers of one step (zoo.step_ratio: fused and unfused fp32
    each against float64), median over five draws; the running statistics move once."""
    model = _randomized(lambda: dense_net(act), 2).train()
    converted = resnet_fused.convert(copy.deepcopy(model), backend="cpu").train()
    g = torch.Generator().manual_seed(3)
    ratios = [step_ratio(model, converted, torch.randn(4, 3, 9, 11, generator=g)) for _ in range(5)]
    assert sorted(ratios)[2] <= 1.0, ratios


@needs_extension
def test_a_pre_activation_block_with_functional_relu():
    """F.relu after a BatchNorm folds with the function left to run (relu(relu(y)) == relu(y))."""
    model = _randomized(lambda: nn.Sequential(PreActBlock(5), PreActBlock(5)), 4)
    converted, report = resnet_fused.convert(copy.deepcopy(model), backend="cpu", report=True)
    assert isinstance(converted[0].bn1, FusedBatchNormAct2d) and converted[0].bn1.act.kind == Kind.RELU
    assert isinstance(converted[0].conv1, FusedConv2d) and converted[0].conv1.act.kind == Kind.RELU
    assert report.norm_acts_fused == 2 and report.convs_fused == 2
    x = torch.randn(3, 5, 6, 6, generator=torch.Generator().manual_seed(5))
    for training in (False, True):
        model.train(training), converted.train(training)
        with torch.no_grad():
            exact = copy.deepcopy(model).double()(x.double())
            assert max_rel_error(converted(x), exact) <= max(2 * max_rel_error(copy.deepcopy(model)(x), exact), 1e-5)


class NotPaired(nn.Module):
    """BatchNorms whose activation may not pair with them: an output used twice, an in-place
    functional ReLU (it would overwrite the output autograd keeps for the mask), a SiLU applied
    as a function or by a module called twice (applied twice it changes the answer), a mode
    switch, a SyncBatchNorm."""

    def __init__(self):
        super().__init__()
        self.bn_used_twice, self.bn_inplace, self.bn_functional = nn.BatchNorm2d(4), nn.BatchNorm2d(4), nn.BatchNorm2d(4)
        self.bn_shared, self.bn_mode, self.bn_sync = nn.BatchNorm2d(4), nn.BatchNorm2d(4), nn.SyncBatchNorm(4)
        self.silu, self.relu = nn.SiLU(), nn.ReLU()

    def forward(self, x):
        y = self.bn_used_twice(x)
        x = torch.relu(y) + y
        x = F.relu(self.bn_inplace(x), inplace=True)
        x = F.silu(self.bn_functional(x))
        x = self.silu(self.silu(self.bn_shared(x)))
        x = self.bn_mode(x)
        x = self.relu(x) if self.training else x
        return self.bn_sync(x).relu()


def test_pairs_the_forward_does_not_show_in_both_modes_stay():
    model = _randomized(NotPaired, 6).eval()
    converted, report = resnet_fused.convert(copy.deepcopy(model), backend="reference", report=True)
    assert report.norm_acts_fused == 0
    assert not any(isinstance(m, FusedBatchNormAct2d) for m in converted.modules())
    reasons = dict(report.unfused)
    assert "no activation follows it that a fused op applies" in reasons["bn_mode"]
    assert "synchronized or frozen" in reasons["bn_sync"]


def test_timm_batch_norm_act_after_a_concat():
    """timm's BatchNormAct2d applies its own activation: replaced without a trace, also where
    its parent's forward cannot be traced; its drop must be the identity."""
    norm_act = pytest.importorskip("timm.layers.norm_act")

    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = norm_act.BatchNormAct2d(6, act_layer=nn.SiLU)
            self.dropped = norm_act.BatchNormAct2d(6, act_layer=nn.ReLU, drop_layer=nn.Dropout)
            self.conv = nn.Conv2d(6, 6, 1)

        def forward(self, x):
            if x.sum() > 1e9:  # data-dependent control flow: fx cannot trace it
                return x
            x = torch.cat([x, x.flip(1)], 1)
            return self.conv(self.dropped(self.norm(x)))

    model = _randomized(Untraceable, 7).eval()
    converted, report = resnet_fused.convert(copy.deepcopy(model), backend="reference", report=True)
    assert isinstance(converted.norm, FusedBatchNormAct2d) and converted.norm.act.kind == Kind.SILU
    assert type(converted.dropped) is norm_act.BatchNormAct2d and report.norm_acts_fused == 1
    assert list(converted.state_dict()) == list(model.state_dict())
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        assert max_rel_error(converted(x), model(x)) < 1e-5


class Taps(nn.Module):
    """A forward that calls its Sequential's layers one by one and keeps every output (feature
    taps, perceptual losses): the Sequential alone shows BN → ReLU and conv → BN → ReLU chains,
    but the BatchNorm's and the conv's own outputs are used too."""

    def __init__(self, features: nn.Sequential):
        super().__init__()
        self.features = features

    def forward(self, x):
        outs = []
        for layer in self.features:
            x = layer(x)
            outs.append(x)
        return outs


@pytest.mark.parametrize("features", [
    lambda: nn.Sequential(nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 4, 3)),
    lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()),
], ids=["bn-relu", "conv-bn-relu"])
def test_an_enclosing_forward_that_calls_the_layers_itself_keeps_them(features):
    model = _randomized(lambda: Taps(features()), 8).eval()
    converted, report = resnet_fused.convert(copy.deepcopy(model), backend="reference", report=True)
    assert not any(isinstance(m, (FusedBatchNormAct2d, FusedConv2d)) for m in converted.modules())
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        for a, b in zip(model(x), converted(x)):
            assert torch.equal(a, b)


class InPlaceByMode(nn.Module):
    """A different in-place ReLU module after the BatchNorm in each mode: both stay and run,
    and neither may then overwrite the fused output autograd keeps for the ReLU mask."""

    def __init__(self, conv: bool):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1) if conv else nn.Identity()
        self.bn, self.relu_train, self.relu_eval = nn.BatchNorm2d(4), nn.ReLU(inplace=True), nn.ReLU(inplace=True)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return self.relu_train(y) if self.training else self.relu_eval(y)


@needs_extension
@pytest.mark.parametrize("conv", [False, True], ids=["bn", "conv-bn"])
def test_in_place_relus_that_differ_by_mode_are_not_folded(conv):
    model = _randomized(lambda: InPlaceByMode(conv), 9).train()
    converted = resnet_fused.convert(copy.deepcopy(model), backend="cpu").train()
    assert not isinstance(converted.bn, FusedBatchNormAct2d)
    if conv:
        assert converted.conv.act.kind == Kind.IDENTITY
    x = torch.randn(3, 4, 5, 5)
    grads = [torch.autograd.grad(m(x.clone().requires_grad_()).sum(), m.bn.weight)[0] for m in (model, converted)]
    assert max_rel_error(grads[1], grads[0]) < 1e-5
