"""The backend registry: every caller asks it, a new record is a new backend, and one forward
of a fused module validates its arguments and resolves its backend once."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import resnet_fused
from helpers import randomize_batch_norms
from resnet_fused import _extension, backends, functional
from resnet_fused.tuning import fused_candidates
from resnet_fused.ops import reference


def _model() -> nn.Module:
    return randomize_batch_norms(nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU()))


def test_extension_is_built():
    # The README's install command builds it; a silent build failure must not pass as a skip
    # (the cpu backend's tests are generated only when it is built: conftest).
    assert _extension.has_cpu_ops(), _extension.LOAD_ERROR


def test_registry_lists_every_backend_once():
    assert backends.BACKENDS == ("triton", "cuda", "cpu", "reference")
    assert backends.FUSED_BACKENDS == ("triton", "cuda", "cpu")
    assert resnet_fused.BACKENDS == backends.BACKENDS
    assert "reference" in backends.available_backends()


def _counting_backend(calls: list[str]) -> backends.Backend:
    """A new backend made of the reference's pieces, recording each call: what adding one takes."""
    base = backends.REGISTRY["reference"]

    def inference(*args):
        calls.append("inference")
        return base.inference(*args)

    def kernels():
        calls.append("kernels")
        return base.kernels()

    return backends.Backend("counting", lambda device: device.type == "cpu", "CPU only", inference, kernels)


@pytest.fixture
def counting(monkeypatch):
    """The registry with one more record (and nothing else changed)."""
    calls: list[str] = []
    registry = {**backends.REGISTRY, "counting": _counting_backend(calls)}
    monkeypatch.setattr(backends, "REGISTRY", registry)
    monkeypatch.setattr(backends, "BACKENDS", tuple(registry))
    monkeypatch.setattr(backends, "FUSED_BACKENDS", (*backends.FUSED_BACKENDS, "counting"))
    return calls


def test_one_record_adds_a_backend_to_convert_functional_training_and_bench(counting):
    model = _model()
    converted = resnet_fused.convert(model, backend="counting")
    x = torch.randn(2, 3, 9, 7)
    with torch.no_grad():
        torch.testing.assert_close(converted.eval()(x), model.eval()(x), rtol=1e-5, atol=1e-5)
    assert counting == ["inference"]
    model.train(), converted.train()
    torch.testing.assert_close(converted(x), model(x), rtol=1e-5, atol=1e-5)
    assert "kernels" in counting
    assert "counting" in fused_candidates(torch.device("cpu"))
    assert "counting" not in fused_candidates(torch.device("meta"))


def test_a_reference_record_runs_the_unfused_modules(monkeypatch):
    """``is_reference`` (not the name) decides that the module runs its unfused forward."""
    calls = []
    record = dataclasses.replace(backends.REGISTRY["reference"], name="oracle")
    monkeypatch.setattr(backends, "REGISTRY", {**backends.REGISTRY, "oracle": record})
    monkeypatch.setattr(reference, "conv_bn_act_modules",
                        lambda *a, **k: calls.append(1) or torch.zeros(1))
    converted = resnet_fused.convert(_model().eval(), backend="oracle")
    with torch.no_grad():
        converted(torch.randn(1, 3, 5, 5))
    assert calls == [1]


def test_one_eval_forward_validates_and_resolves_once(monkeypatch):
    counts = {"check": 0, "resolve": 0}
    check, resolve = functional.check_conv_bn_act, backends.resolve

    def counted_check(*args):
        counts["check"] += 1
        return check(*args)

    def counted_resolve(*args):
        counts["resolve"] += 1
        return resolve(*args)

    monkeypatch.setattr(functional, "check_conv_bn_act", counted_check)
    monkeypatch.setattr(backends, "resolve", counted_resolve)
    converted = resnet_fused.convert(_model().eval(), backend="reference" if "cpu" not in
                                     backends.available_backends() else "cpu")
    with torch.no_grad():
        converted(torch.randn(2, 3, 8, 8))
    assert counts == {"check": 1, "resolve": 1}
    counts.update(check=0, resolve=0)
    converted.train()(torch.randn(2, 3, 8, 8))  # the training op: still once each
    assert counts == {"check": 1, "resolve": 1}


def test_public_functional_entry_points_still_validate():
    x, w = torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3, 3)
    mean, var = torch.zeros(4), torch.ones(4)
    with pytest.raises(ValueError, match="expected input with 3 channels"):
        functional.conv_bn_act(x[:, :2], w, mean, var, backend="reference")
    with pytest.raises(ValueError, match="expected input with 3 channels"):
        functional.conv_batch_norm_act(x[:, :2], w, mean, var, training=True, backend="reference")


def test_the_cpp_extension_loads_without_triton():
    """Loading the extension (and the shape rules and fakes it registers) imports no Triton: a
    fresh interpreter that imports them has no ``triton`` module."""
    import subprocess
    import sys

    code = ("import sys; import resnet_fused._extension, resnet_fused.ops.fakes, resnet_fused.functional; "
            "print('triton' in sys.modules)")
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "False", out.stderr
