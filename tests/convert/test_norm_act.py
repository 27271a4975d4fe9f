"""timm's BatchNorm + activation modules (BatchNormAct2d, SyncBatchNormAct, FrozenBatchNormAct2d),
recognised by exact class: fused when their dropout is the identity and their activation one a
fused conv applies (the activation then rides in it), left alone with the report's reason
otherwise. Eval output, a training step against float64, state_dict, and the report."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import resnet_fused
from helpers import CountOps, max_rel_error
from resnet_fused import FoldedBatchNorm2d, FoldedFrozenBatchNorm2d, FusedConv2d, _extension
from resnet_fused.bench.zoo import randomize_batch_norms, step_ratio

timm_layers = pytest.importorskip("timm.layers")
BatchNormAct2d, FrozenBatchNormAct2d = timm_layers.BatchNormAct2d, timm_layers.FrozenBatchNormAct2d

class ConvNormAct(nn.Module):
    """timm's ConvNormAct shape: a conv, then a norm module that applies its own activation."""

    def __init__(self, cin: int, cout: int, stride: int, norm: nn.Module):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn = norm

    def forward(self, x):
        return self.bn(self.conv(x))


def _net(norm: type, act: type | None = nn.ReLU, **kwargs) -> nn.Module:
    layers = [ConvNormAct(3, 8, 1, norm(8, act_layer=act, **kwargs)),
              ConvNormAct(8, 6, 2, norm(6, apply_act=False, **kwargs))]
    return randomize_batch_norms(nn.Sequential(*layers), torch.Generator().manual_seed(3))


@pytest.mark.backends(reference=True)  # every backend that runs here; triton under the interpreter
@pytest.mark.parametrize("norm", [BatchNormAct2d, FrozenBatchNormAct2d])
def test_relu_and_identity_activations_fuse_and_match_in_eval(norm, backend):
    model = _net(norm).eval()
    converted, report = resnet_fused.convert(model, backend=backend, report=True)
    assert report.unfused == [] and report.convs_fused == 2 and report.activations_fused == {"ReLU": 1}
    assert [converted[i].conv.relu for i in (0, 1)] == [True, False]
    folded = FoldedFrozenBatchNorm2d if norm is FrozenBatchNormAct2d else FoldedBatchNorm2d
    assert all(type(converted[i].bn) is folded for i in (0, 1))
    assert list(converted.state_dict()) == list(model.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(converted.state_dict()[key], value), key
    x = torch.randn(2, 3, 13, 11)
    with torch.no_grad():
        expected = model(x)
        if backend == "cpu":
            with CountOps() as counter:
                out = converted(x)
            assert counter.counts["conv_bn_act"] == 2 and "relu" not in counter.counts, counter.counts
        else:
            out = converted(x)
    assert max_rel_error(out, expected) < 1e-5


# Asked of the build: available_backends() would query the GPU at collection.
@pytest.mark.skipif(not _extension.has_cpu_ops(), reason=f"extension not built: {_extension.LOAD_ERROR}")
@pytest.mark.parametrize("norm", [BatchNormAct2d, FrozenBatchNormAct2d])
def test_a_training_step_matches_the_original_against_float64(norm):
    """Batch statistics and the running-statistics update of BatchNormAct2d (nn.BatchNorm2d's
    semantics, momentum None included); a frozen norm's buffers never change. Median over
    three draws: a ReLU mask flip on a 1e-7 difference moves a gradient."""
    model = _net(norm, momentum=None) if norm is BatchNormAct2d else _net(norm)
    model.train()
    converted = resnet_fused.convert(model, backend="cpu").train()
    assert all(isinstance(converted[i].conv, FusedConv2d) for i in (0, 1))
    g = torch.Generator().manual_seed(5)
    ratios = [step_ratio(model, converted, torch.randn(4, 3, 11, 9, generator=g)) for _ in range(3)]
    assert sorted(ratios)[1] <= 1.0, ratios


@pytest.mark.parametrize("act", ["gelu", "gelu_tanh"])
def test_timm_gelu_modules_ride_in_the_fused_conv(act):
    """timm's own GELU and GELUTanh (what act_layer="gelu" makes) by exact class, as the fused
    conv's GELU (exact or tanh form)."""
    model = _net(BatchNormAct2d, act).eval()
    converted, report = resnet_fused.convert(model, backend="cpu" if _extension.has_cpu_ops() else "reference",
                                             report=True)
    assert type(model[0].bn.act).__module__ == "timm.layers.activations"
    assert report.unfused == [] and report.activations_fused == {"GELU": 1}
    assert converted[0].conv.act.kind.name == act.upper()
    x = torch.randn(2, 3, 9, 10)
    with torch.no_grad():
        exact = copy.deepcopy(model).double()(x.double())
        assert max_rel_error(converted(x), exact) <= max(2 * max_rel_error(model(x), exact), 1e-5)


def test_other_activations_and_dropout_stay_with_the_reason():
    model = nn.Sequential(ConvNormAct(3, 8, 1, BatchNormAct2d(8, act_layer=nn.Mish)),
                          ConvNormAct(8, 8, 1, BatchNormAct2d(8, drop_layer=nn.Dropout)))
    model = randomize_batch_norms(model, torch.Generator().manual_seed(4)).eval()
    converted, report = resnet_fused.convert(model, backend="reference", report=True)
    assert report.convs_fused == 0
    reasons = dict(report.unfused)
    assert reasons["0.bn"] == ("BatchNormAct2d applies Mish (a fused conv applies nn.ReLU, ReLU6, Hardtanh, "
                               "LeakyReLU, SiLU, Hardswish, GELU or nothing)")
    assert reasons["1.bn"] == "BatchNormAct2d applies Dropout before its activation"
    x = torch.randn(2, 3, 7, 7)
    with torch.no_grad():
        assert torch.equal(converted(x), model(x))


def test_a_hooked_activation_keeps_its_norm_unfused():
    model = _net(BatchNormAct2d).eval()
    calls = []
    model[0].bn.act.register_forward_hook(lambda *_: calls.append(1))
    converted, report = resnet_fused.convert(model, backend="reference", report=True)
    assert type(converted[0].bn) is BatchNormAct2d and isinstance(converted[1].conv, FusedConv2d)
    assert dict(report.unfused)["0.bn"] == "BatchNormAct2d has hooks (on itself, its drop or its act)"
    with torch.no_grad():
        converted(torch.randn(1, 3, 6, 6))
    assert calls == [1]


def test_a_subclass_is_not_recognised():
    class Custom(BatchNormAct2d):
        def forward(self, x):
            return super().forward(x) * 2

    model = _net(Custom).eval()
    converted, report = resnet_fused.convert(model, backend="reference", report=True)
    assert report.convs_fused == 0
    x = torch.randn(1, 3, 6, 6)
    with torch.no_grad():
        assert torch.equal(converted(x), model(x))


def test_timm_regnet_runs_fully_fused():
    timm = pytest.importorskip("timm")
    model = randomize_batch_norms(timm.create_model("regnetx_002"), torch.Generator().manual_seed(0)).eval()
    converted, report = resnet_fused.convert(copy.deepcopy(model), backend="reference", report=True)
    assert report.unfused == [] and report.convs_fused > 40
    x = torch.randn(1, 3, 48, 40)
    with torch.no_grad():
        assert max_rel_error(converted(x), model(x)) < 1e-5


def test_sync_batch_norm_act_folds_into_a_folded_sync_batch_norm():
    """timm's convert_sync_batchnorm turns BatchNormAct2d into SyncBatchNormAct (drop and act
    carried over); eval needs no process group."""
    model = timm_layers.convert_sync_batchnorm(_net(BatchNormAct2d)).eval()
    assert type(model[0].bn) is timm_layers.SyncBatchNormAct
    converted, report = resnet_fused.convert(model, backend="reference", report=True)
    assert report.unfused == [] and [converted[i].conv.relu for i in (0, 1)] == [True, False]
    assert all(type(converted[i].bn) is resnet_fused.FoldedSyncBatchNorm for i in (0, 1))
    x = torch.randn(2, 3, 9, 7)
    with torch.no_grad():
        assert max_rel_error(converted(x), model(x)) < 1e-5
