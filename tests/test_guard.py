"""The runtime guard (guard.py) on the CPU: a kernel that answers wrong, or raises, is caught on
its first call of a kind, the model's answer stays right, and the warning comes once."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from torch import nn

import resnet_fused
from helpers import assert_grads_close, max_rel_error, randomize_batch_norms
from resnet_fused import backends, guard
from resnet_fused.ops import reference


@pytest.fixture(autouse=True)
def _fresh_verdicts():
    guard.reset()
    yield
    guard.reset()


def _net() -> nn.Module:
    return randomize_batch_norms(nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 5, 1), nn.BatchNorm2d(5),
    ))


def _broken(monkeypatch, **pieces) -> dict[str, int]:
    """A backend 'broken' (the reference's kernels, with ``pieces`` replaced) that the guard
    verifies by default, as a GPU backend; counts the calls of each replaced piece."""
    calls = {name: 0 for name in pieces}

    def counted(name, fn):
        def call(*args):
            calls[name] += 1
            return fn(*args)
        return call

    base = backends.REGISTRY["reference"]
    inference = counted("inference", pieces.pop("inference")) if "inference" in pieces else base.inference

    def kernels():
        k = base.kernels()
        return dataclasses.replace(k, **{name: counted(name, fn) for name, fn in pieces.items()})

    record = backends.Backend("broken", lambda d: d.type == "cpu", "", inference, kernels, verify_by_default=True)
    monkeypatch.setattr(backends, "REGISTRY", {**backends.REGISTRY, "broken": record})
    return calls


def _wrong_inference(*args):
    return reference.inference(*args) * 1.01  # a 1% error: far beyond the rule


def _raising_inference(*args):
    raise RuntimeError("no kernel image is available for execution on the device")


@pytest.mark.parametrize("bad", [_wrong_inference, _raising_inference], ids=["wrong", "raises"])
def test_a_bad_inference_kernel_is_caught_once_and_the_model_stays_right(monkeypatch, bad):
    monkeypatch.delenv("RESNET_FUSED_VERIFY", raising=False)
    calls = _broken(monkeypatch, inference=bad)
    model = _net().eval()
    converted = resnet_fused.convert(model, backend="broken")
    x = torch.randn(2, 3, 9, 7)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        for _ in range(3):
            assert max_rel_error(converted(x), model(x)) < 1e-5
    mismatches = [w for w in caught if issubclass(w.category, guard.FusedKernelMismatch)]
    # Two conv units, two keys: one warning each, then the bad kernel is never called again.
    assert len(mismatches) == 2, [str(w.message) for w in caught]
    assert "broken kernel conv_bn_act" in str(mismatches[0].message)
    assert calls["inference"] == 2


def test_a_bad_training_kernel_is_caught_and_training_stays_right(monkeypatch):
    monkeypatch.setenv("RESNET_FUSED_VERIFY", "first")

    def wrong_apply(y, mean, var, gamma, beta, eps, residual, *act):
        return reference.bn_act_apply(y, mean, var, gamma, beta, eps, residual, *act) + 0.1

    def wrong_update(running_mean, running_var, mean, var, count, momentum):
        reference.update_running_stats(running_mean, running_var, mean, var, count, momentum)
        running_var.mul_(2)

    _broken(monkeypatch, apply=wrong_apply, update_running_stats=wrong_update)
    model = _net().train()
    converted = resnet_fused.convert(model, backend="broken").train()
    x = torch.randn(4, 3, 6, 5)
    with pytest.warns(guard.FusedKernelMismatch, match="broken kernel (apply|update_running_stats)"):
        out = converted(x)
    expected = model(x)
    assert max_rel_error(out, expected) < 1e-5
    weights = torch.randn_like(out)  # a plain sum through train-mode BatchNorm has zero gradient
    (out * weights).sum().backward(), (expected * weights).sum().backward()
    assert_grads_close([p.grad for p in converted.parameters()], [p.grad for p in model.parameters()], 1e-4)
    for a, b in zip(converted.buffers(), model.buffers()):
        torch.testing.assert_close(a, b, msg="running statistics must take the reference's update")


def test_verified_kernels_run_alone_after_the_first_call_and_always_checks_every_call(monkeypatch):
    seen = []

    def spy(*args):
        seen.append(1)
        return reference.inference(*args)

    monkeypatch.setenv("RESNET_FUSED_VERIFY", "first")
    _broken(monkeypatch, inference=spy)
    reference_calls = []
    original = backends.REGISTRY["reference"]
    monkeypatch.setitem(backends.REGISTRY, "reference", dataclasses.replace(
        original, inference=lambda *a: reference_calls.append(1) or original.inference(*a)))
    converted = resnet_fused.convert(randomize_batch_norms(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).eval(),
                                     backend="broken")
    x = torch.randn(1, 3, 6, 6)
    with torch.no_grad():
        for _ in range(3):
            converted(x)
    assert (len(seen), len(reference_calls)) == (3, 2)  # unfused + float64, once
    guard.reset()
    monkeypatch.setenv("RESNET_FUSED_VERIFY", "always")
    with torch.no_grad():
        converted(x), converted(x)
    assert len(reference_calls) == 6


def test_off_by_default_for_cpu_and_a_clear_error_for_a_bad_setting(monkeypatch):
    monkeypatch.delenv("RESNET_FUSED_VERIFY", raising=False)
    assert guard.mode(backends.REGISTRY["cpu"].verify_by_default) == "off"
    assert guard.mode(backends.REGISTRY["triton"].verify_by_default) == "first"
    assert guard.mode(backends.REGISTRY["cuda"].verify_by_default) == "first"
    monkeypatch.setenv("RESNET_FUSED_VERIFY", "sometimes")
    with pytest.raises(ValueError, match="RESNET_FUSED_VERIFY='sometimes'"):
        guard.mode(True)


def test_the_rule_fails_nan_and_shape_and_passes_rounding():
    exact = torch.linspace(-1, 1, 101, dtype=torch.float64)
    unfused = exact.to(torch.float16)
    assert guard.compare(unfused.clone(), unfused, exact)[0]
    nan = unfused.clone()
    nan[3] = float("nan")
    assert not guard.compare(nan, unfused, exact)[0]
    assert not guard.compare(unfused[:100], unfused, exact)[0]
    assert not guard.compare(unfused * 1.05, unfused, exact)[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_real_triton_kernels_pass_their_first_check_without_a_warning(monkeypatch, dtype):
    """The rule is not so tight that a correct kernel falls back: the interpreted Triton kernels,
    eval and a training step (every piece of the unit), under the default policy."""
    monkeypatch.delenv("RESNET_FUSED_VERIFY", raising=False)
    model = _net().to(dtype)
    converted = resnet_fused.convert(model, backend="triton")
    x = torch.randn(2, 3, 6, 5, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error", guard.FusedKernelMismatch)
        with torch.no_grad():
            converted.eval()(x)
        out = converted.train()(x)
        (out.float() * torch.randn(out.shape)).sum().backward()
    assert len(guard._verdicts) >= 6 and all(guard._verdicts.values())


def _one_call(fused, exact_fn, *args, mutated=()):
    call = guard.guarded("piece", "broken", True, fused, exact_fn, mutated)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = call(*args)
    return out, [w for w in caught if issubclass(w.category, guard.FusedKernelMismatch)]


def test_the_rule_is_not_disarmed_by_an_overflowing_reference_nor_fooled_by_inputs(monkeypatch):
    monkeypatch.setenv("RESNET_FUSED_VERIFY", "first")
    x = torch.tensor([60000.0, 2.0], dtype=torch.float16)

    def twice(t):  # in fp16 the first element overflows to inf; in float64 it does not
        return t * 2

    out, warned = _one_call(lambda t: torch.tensor([1234.0, 4.0], dtype=t.dtype), twice, x)
    assert warned and out[1].item() == 4.0  # the reference's answer, not 1234
    guard.reset()

    def writes_input(t):
        t.mul_(3)
        return t / 3 * 2

    y = torch.ones(3)
    out, warned = _one_call(writes_input, twice, y)
    assert warned and "wrote into its input" in str(warned[0].message)
    assert torch.equal(y, torch.ones(3)) and torch.equal(out, torch.full((3,), 2.0))
    guard.reset()
    out, warned = _one_call(lambda t: (t * 2).double(), twice, torch.ones(2))  # wrong dtype
    assert warned and out.dtype == torch.float32


def test_the_first_call_keeps_autograd_and_momentum_none_makes_no_new_keys(monkeypatch):
    monkeypatch.setenv("RESNET_FUSED_VERIFY", "first")
    _broken(monkeypatch)
    bn = nn.BatchNorm2d(4, momentum=None)
    model = randomize_batch_norms(nn.Sequential(nn.Conv2d(3, 4, 3), bn)).train()
    converted = resnet_fused.convert(model, backend="broken").train()
    for step in range(4):
        out = converted(torch.randn(2, 3, 6, 6, requires_grad=True))
        assert out.requires_grad
        if step == 0:
            keys = len(guard._verdicts)
    assert len(guard._verdicts) == keys  # 1/num_batches_tracked changes every step


def test_under_torch_compile_a_rejected_kernel_is_not_traced_in(monkeypatch):
    monkeypatch.setenv("RESNET_FUSED_VERIFY", "first")
    _broken(monkeypatch, inference=_wrong_inference)
    model = _net().eval()
    converted = resnet_fused.convert(model, backend="broken")
    x = torch.randn(1, 3, 6, 6)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted(x)  # eager: rejected
        compiled = torch.compile(converted, backend="aot_eager", fullgraph=True)
        assert max_rel_error(compiled(x), model(x)) < 1e-5
