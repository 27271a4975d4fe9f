"""resnet_fused.freeze: a frozen CPU-inference snapshot that matches the original model.

Equivalence (fp32 to 1e-4 relative; bf16 by the 2x rule against fp64), the snapshot contract
(later parameter changes unseen, no train mode, no autograd, no moves or copies), in-place
accumulation never touching memory the caller can see, and the exact fallback when the private
oneDNN ops are missing.
"""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock

import resnet_fused
from resnet_fused import FusedConv2d
from helpers import assert_low_precision_close, max_rel_error, randomize_batch_norms, textbook_resnet

freeze_module = importlib.import_module("resnet_fused.freeze")


def _model(name: str) -> nn.Module:
    g = torch.Generator().manual_seed(1)
    model = textbook_resnet() if name == "textbook" else getattr(torchvision.models, name)()
    return randomize_batch_norms(model, g).eval()


def _input(n: int = 2, size: int = 64) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(2))


@pytest.fixture
def packed_or_skip():
    if not freeze_module.mkldnn_usable(torch.float32):
        pytest.skip(f"oneDNN path unavailable here: {freeze_module.PROBE_FAILURES.get(torch.float32)}")


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "textbook"])
def test_fp32_matches_original(name):
    model = _model(name)
    x = _input(1 if name == "resnet50" else 2)
    frozen = resnet_fused.freeze(model)
    assert frozen.packed == freeze_module.mkldnn_usable(torch.float32)
    with torch.no_grad():
        expected = model(x)
        assert max_rel_error(frozen(x), expected) <= 1e-4
        # A second call (weights packed for this shape by the first) and another batch size.
        assert max_rel_error(frozen(x), expected) <= 1e-4
        assert max_rel_error(frozen(x[:1]), model(x[:1])) <= 1e-4
        if name == "resnet18":  # 1x1 outputs in the last stage (an ambiguous layout for oneDNN)
            small = _input(1, 32)
            assert max_rel_error(frozen(small), model(small)) <= 1e-4


@pytest.mark.parametrize("name", ["resnet18", "textbook"])
def test_bf16_within_twice_unfused_error(name):
    model = _model(name)
    x = _input()
    frozen = resnet_fused.freeze(model, dtype=torch.bfloat16)
    with torch.no_grad():
        exact = copy.deepcopy(model).double()(x.double())
        unfused = copy.deepcopy(model).bfloat16()(x.bfloat16())
        out = frozen(x)
    assert out.dtype == torch.bfloat16
    assert_low_precision_close(out, unfused, exact)


def test_the_weights_are_folded_and_packed(packed_or_skip):
    frozen = resnet_fused.freeze(_model("resnet18"))
    convs = [m for m in frozen.modules() if isinstance(m, freeze_module.FrozenConv2d)]
    assert len(convs) == 20  # every conv of resnet18, shortcuts included
    assert not any(isinstance(m, (nn.BatchNorm2d, FusedConv2d)) for m in frozen.modules())
    assert sum(isinstance(m, freeze_module.FrozenBlock) for m in frozen.modules()) == 8
    with torch.no_grad():
        frozen(_input())
    assert all(len(c._packed) == 1 and next(iter(c._packed.values())).is_mkldnn for c in convs)


def test_snapshot_ignores_later_changes_and_says_so():
    model = _model("textbook")
    x = _input()
    frozen = resnet_fused.freeze(model)
    with torch.no_grad():
        before = frozen(x)
        for p in model.parameters():
            p.mul_(1.5)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.add_(1.0)
        assert torch.equal(frozen(x), before)
    text = repr(frozen)
    assert "snapshot" in text and "not seen" in text
    assert "not seen" in resnet_fused.freeze.__doc__ and "snapshot" in resnet_fused.FrozenModel.__doc__.lower()


def test_refuses_a_model_in_training_mode():
    model = _model("textbook").train()
    with pytest.raises(RuntimeError, match=r"eval mode.*model\.eval\(\)"):
        resnet_fused.freeze(model)
    model.eval()
    model[3].conv1[1].train()  # one BatchNorm left in training mode
    with pytest.raises(RuntimeError, match=r"in training mode: 3\.conv1\.1"):
        resnet_fused.freeze(model)


def test_refuses_train_autograd_moves_and_copies():
    frozen = resnet_fused.freeze(_model("textbook"))
    with pytest.raises(RuntimeError, match="cannot train.*freeze"):
        frozen.train()
    with pytest.raises(RuntimeError, match="cannot train"):
        frozen.model[3].conv1[0].train()
    frozen.eval()  # train(False) is allowed
    with pytest.raises(RuntimeError, match="autograd"):
        frozen.requires_grad_()
    with pytest.raises(RuntimeError, match="does not support autograd.*detach"):
        frozen(_input().requires_grad_())
    with pytest.raises(RuntimeError, match="cannot be moved or cast"):
        frozen.to(torch.float64)
    with pytest.raises(TypeError, match="cannot be copied or pickled"):
        copy.deepcopy(frozen)
    # Grad mode alone is fine: nothing is recorded.
    out = frozen(_input())
    assert not out.requires_grad
    with torch.no_grad():
        frozen(_input().requires_grad_())  # no grad recorded: allowed


def test_bad_arguments():
    with pytest.raises(TypeError, match="nn.Module"):
        resnet_fused.freeze(torch.zeros(1))
    with pytest.raises(ValueError, match="float32 or torch.bfloat16"):
        resnet_fused.freeze(_model("textbook"), dtype=torch.float16)


def test_input_and_retained_outputs_are_never_overwritten(packed_or_skip):
    """Blocks after the first of a stage accumulate into their input; the caller's tensor and
    an output a hook keeps must stay as they were."""
    g = torch.Generator().manual_seed(3)
    model = randomize_batch_norms(nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 8), BasicBlock(8, 8)), g).eval()
    frozen = resnet_fused.freeze(model)
    assert isinstance(frozen.model, freeze_module.FrozenStage)
    x = torch.randn(2, 8, 9, 9, generator=g).contiguous(memory_format=torch.channels_last)
    x_before = x.clone()
    kept = []
    frozen.model[1].register_forward_hook(lambda m, a, out: kept.append((out, out.clone())))
    with torch.no_grad():
        out = frozen(x)
        assert max_rel_error(out, model(x)) <= 1e-4
    assert torch.equal(x, x_before)
    assert torch.equal(kept[0][0], kept[0][1])
    # A global forward hook (here keeping every block's output) turns accumulation off too.
    kept.clear()
    handle = nn.modules.module.register_module_forward_hook(
        lambda m, a, out: kept.append((out, out.clone())) if isinstance(m, freeze_module.FrozenBlock) else None)
    try:
        with torch.no_grad():
            frozen(x)
    finally:
        handle.remove()
    assert len(kept) >= 3 and all(torch.equal(a, b) for a, b in kept)  # 3 blocks (+1 from the hook above)


def test_fallback_when_the_onednn_ops_are_missing(monkeypatch):
    monkeypatch.setattr(freeze_module, "mkldnn_usable", lambda dtype: False)
    model = _model("resnet18")
    x = _input()
    frozen = resnet_fused.freeze(model)
    assert not frozen.packed
    assert "fallback" in repr(frozen) and "snapshot" in repr(frozen)
    fused = [m for m in frozen.modules() if isinstance(m, FusedConv2d)]
    assert fused and not any(isinstance(m, freeze_module.FrozenConv2d) for m in frozen.modules())
    if "cpu" in resnet_fused.available_backends():
        assert {m.backend for m in fused} == {"cpu"}
    with torch.no_grad():
        assert max_rel_error(frozen(x), model(x)) <= 1e-4
        model.fc.weight.mul_(2)  # still a snapshot
        assert max_rel_error(frozen(x), model(x)) > 1e-3
    with pytest.raises(RuntimeError, match="cannot train"):
        frozen.train()
    with pytest.raises(RuntimeError, match="autograd"):
        frozen(x.requires_grad_())


def test_probe_reports_missing_ops(monkeypatch):
    monkeypatch.setattr(freeze_module, "_mkldnn_ops", lambda: None)
    freeze_module._probe.cache_clear()
    try:
        assert not freeze_module.mkldnn_usable(torch.float32)
        assert "missing" in freeze_module.PROBE_FAILURES[torch.float32]
    finally:
        freeze_module._probe.cache_clear()
        freeze_module.PROBE_FAILURES.clear()
