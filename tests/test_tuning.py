"""``backend="auto"`` measured per unit (tuning.py), on the CPU: the cpu backend against the
unfused ops. A path made slow is not chosen; the trials change nothing the model holds; the
choices persist in RESNET_FUSED_TUNE_CACHE; RESNET_FUSED_TUNE=off is the device rule."""

from __future__ import annotations

import copy
import json
import time

import pytest
import torch
from torch import nn

import resnet_fused
from helpers import max_rel_error
from resnet_fused import _extension, backends, tuning
from resnet_fused.bench.zoo import randomize_batch_norms
from resnet_fused.ops import reference

pytestmark = pytest.mark.skipif(not _extension.has_cpu_ops(), reason=f"extension not built: {_extension.LOAD_ERROR}")

SLOW = 0.2  # seconds added to every call of the path made slow: far above the noise of tiny convs, and
# of a loaded 2-core machine (at 0.02 s, CI with other jobs running once timed the unfused path slower)


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    monkeypatch.delenv("RESNET_FUSED_TUNE_CACHE", raising=False)
    monkeypatch.delenv("RESNET_FUSED_TUNE", raising=False)
    tuning.reset()
    yield
    tuning.reset()


def _model() -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
              nn.Conv2d(8, 6, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(6), nn.SiLU()]
    return randomize_batch_norms(nn.Sequential(*layers), torch.Generator().manual_seed(1))


def _x() -> torch.Tensor:
    return torch.randn(2, 3, 11, 9, generator=torch.Generator().manual_seed(2))


def _slowed(function):
    def slow(*args, **kwargs):
        time.sleep(SLOW)
        return function(*args, **kwargs)

    return slow


@pytest.mark.parametrize("slow_path", ["cpu", "unfused"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_a_path_made_slow_is_not_chosen(slow_path, mode, monkeypatch):
    if slow_path == "cpu":
        record = backends.REGISTRY["cpu"]
        kernels = record.kernels()
        slowed = type(kernels)(**{f: _slowed(getattr(kernels, f)) for f in kernels.__dataclass_fields__})
        monkeypatch.setitem(backends.REGISTRY, "cpu", backends.Backend(
            "cpu", record.runs_on, record.why_not, _slowed(record.inference), lambda: slowed))
    else:
        monkeypatch.setattr(reference, "conv_bn_act_modules", _slowed(reference.conv_bn_act_modules))
    model = _model().train(mode == "train")
    converted = resnet_fused.convert(copy.deepcopy(model))
    with torch.set_grad_enabled(mode == "train"):
        out = converted(_x())
    assert max_rel_error(out, model(_x())) < 1e-5
    chosen = set(tuning.choices().values())
    assert chosen == {"reference" if slow_path == "cpu" else "cpu"}, tuning.choices()
    assert len(tuning.choices()) == 2  # one per unit
    assert all(json.loads(key)[-1] == ("train+grad" if mode == "train" else "eval") for key in tuning.choices())


def test_the_trials_change_nothing_the_model_holds():
    """One training step of the measured model moves the running statistics once and
    accumulates each gradient once: what the original's step does."""
    model = _model().train()
    converted = resnet_fused.convert(copy.deepcopy(model))
    for m in (model, converted):
        m(_x()).square().sum().backward()
    assert len(tuning.choices()) == 2
    for (name, a), b in zip(model.named_buffers(), converted.buffers()):
        assert torch.equal(a, b) if name.endswith("num_batches_tracked") else max_rel_error(b, a) < 1e-5, name
    for (name, a), b in zip(model.named_parameters(), converted.parameters()):
        assert max_rel_error(b.grad, a.grad) < 1e-4, name


def test_choices_persist_in_the_cache_file(tmp_path, monkeypatch):
    path = tmp_path / "tune.json"
    monkeypatch.setenv("RESNET_FUSED_TUNE_CACHE", str(path))
    converted = resnet_fused.convert(_model()).eval()
    with torch.no_grad():
        expected = converted(_x())
    stored = json.loads(path.read_text())
    assert stored == tuning.choices() and len(stored) == 2
    # A new process (a fresh table) reads the file and times nothing.
    tuning.reset()
    monkeypatch.setattr(tuning, "_median_time", lambda *_: pytest.fail("a cached unit was timed again"))
    with torch.no_grad():
        assert torch.equal(converted(_x()), expected)
    assert tuning.choices() == stored


def test_a_bad_cache_file_is_reported_and_measured_over(tmp_path, monkeypatch):
    path = tmp_path / "tune.json"
    path.write_text("{not json")
    monkeypatch.setenv("RESNET_FUSED_TUNE_CACHE", str(path))
    converted = resnet_fused.convert(_model()).eval()
    with pytest.warns(UserWarning, match="RESNET_FUSED_TUNE_CACHE=.*cannot be used"), torch.no_grad():
        converted(_x())
    assert json.loads(path.read_text()) == tuning.choices() and len(tuning.choices()) == 2


def test_a_cached_choice_that_cannot_run_here_is_measured_again(tmp_path, monkeypatch):
    """A file written on another machine may name a backend this one lacks (a GPU backend)."""
    path = tmp_path / "tune.json"
    monkeypatch.setenv("RESNET_FUSED_TUNE_CACHE", str(path))
    converted = resnet_fused.convert(_model()).eval()
    with torch.no_grad():
        converted(_x())
    path.write_text(json.dumps({key: "cuda" for key in tuning.choices()}))
    tuning.reset()
    with torch.no_grad():
        converted(_x())
    assert set(tuning.choices().values()) <= {"cpu", "reference"}


def test_tuning_off_is_the_device_rule(monkeypatch):
    monkeypatch.setenv("RESNET_FUSED_TUNE", "off")
    monkeypatch.setattr(tuning, "_median_time", lambda *_: pytest.fail("timed with RESNET_FUSED_TUNE=off"))
    converted = resnet_fused.convert(_model()).eval()
    with torch.no_grad():
        converted(_x())
    assert tuning.choices() == {}
    monkeypatch.setenv("RESNET_FUSED_TUNE", "maybe")
    with pytest.raises(ValueError, match="RESNET_FUSED_TUNE='maybe'"), torch.no_grad():
        converted(_x())


def test_a_named_backend_is_never_measured(monkeypatch):
    monkeypatch.setattr(tuning, "_median_time", lambda *_: pytest.fail("a named backend was timed"))
    converted = resnet_fused.convert(_model(), backend="cpu").eval()
    with torch.no_grad():
        converted(_x())
    assert tuning.choices() == {}


def test_the_trials_call_no_hook_and_keep_checkpointing_working():
    """Trials run the module's forward, not its __call__: a hook added after convert fires once
    per call; and their saved tensors bypass the caller's saved-tensor hooks, which
    non-reentrant checkpointing uses to match the recomputation with the forward."""
    model = _model().train()
    converted = resnet_fused.convert(copy.deepcopy(model))
    calls = []
    converted[0].register_forward_hook(lambda *_: calls.append("forward"))
    converted[0].register_full_backward_hook(lambda *_: calls.append("backward"))
    x = _x().requires_grad_()
    out = torch.utils.checkpoint.checkpoint(converted, x, use_reentrant=False)
    assert calls == ["forward"]
    out.square().sum().backward()
    expected = x.detach().clone().requires_grad_()
    model(expected).square().sum().backward()
    assert max_rel_error(x.grad, expected.grad) < 1e-4
    assert len(tuning.choices()) == 2


def test_non_leaf_parameters_and_a_failing_candidate(monkeypatch):
    """torch.func.functional_call hands the module non-leaf parameters, which cannot be deep-
    copied: the trials share them. A candidate whose trial raises is dropped."""
    model = _model().eval()
    converted = resnet_fused.convert(copy.deepcopy(model))
    record = backends.REGISTRY["cpu"]

    def broken(*args):
        raise RuntimeError("this kernel cannot run here")

    monkeypatch.setitem(backends.REGISTRY, "cpu", backends.Backend(
        "cpu", record.runs_on, record.why_not, broken, record.kernels))
    params = {name: p * 1.0 for name, p in converted.named_parameters()}
    with torch.no_grad():
        out = torch.func.functional_call(converted, params, (_x(),))
        assert max_rel_error(out, model(_x())) < 1e-5
    assert set(tuning.choices().values()) == {"reference"}


def test_when_no_candidate_runs_the_call_raises_its_own_error():
    """One value per channel in training: every candidate refuses, nothing is remembered, and
    the call raises torch's own message."""
    converted = resnet_fused.convert(_model()).train()
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        converted(torch.randn(1, 3, 1, 1))
    assert tuning.choices() == {}
