"""``resnet_fused::bn_act_train`` and ``FusedBatchNormAct2d``: a BatchNorm2d and its activation
with no conv, as one unit (norm_act.py), against the unfused modules, on every backend that runs
here (conftest's ``backend`` parametrization: Triton under its interpreter, tiny shapes, and the
C++ ops; with ``device``, the same on CUDA tensors, marked ``gpu``).

fp32 is judged against float64 (1e-5 relative, as the unfused modules are), gradients by
gradcheck in float64 on the reference backend and, for the fused kernels, against float64 within
2x the unfused fp32 error (plus a floor); bf16 by the 2x rule of assert_low_precision_close.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from helpers import assert_low_precision_close, max_rel_error
from resnet_fused import FusedBatchNormAct2d, tuning
from resnet_fused.norm_act import bn_act_train
from resnet_fused.ops.activation import Activation, Kind

ACTS = [Activation(Kind.RELU), Activation(Kind.SILU), Activation(Kind.HARDTANH, -0.5, 1.5),
        Activation(Kind.LEAKY_RELU, 0.1), Activation(Kind.HARDSWISH), Activation(Kind.GELU)]


def batch_norm(k: int, seed: int, momentum=0.1, affine=True, track=True) -> nn.BatchNorm2d:
    """Randomized statistics and affine parameters: never the defaults 0/1."""
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(k, eps=1e-3, momentum=momentum, affine=affine, track_running_stats=track)
    with torch.no_grad():
        if affine:
            bn.weight.copy_(torch.rand(k, generator=g) + 0.5)
            bn.bias.copy_(torch.randn(k, generator=g) * 0.3)
        if track:
            bn.running_mean.copy_(torch.randn(k, generator=g) * 0.5)
            bn.running_var.copy_(torch.rand(k, generator=g) + 0.5)
    return bn


def inputs(shape, seed, dtype=torch.float32, channels_last=False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 1.5 + 0.2
    x = x.to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def unfused(bn: nn.Module, act: Activation, x: torch.Tensor) -> torch.Tensor:
    return act.to_module()(bn(x))


def run_both(backend, act, x, training, seed=0, **bn_options):
    """(fused output, fused module, unfused output, unfused module, float64 output, float64 module)."""
    bn = batch_norm(x.shape[1], seed, **bn_options).train(training).to(x.device)
    exact_bn = copy.deepcopy(bn).double()
    fused = FusedBatchNormAct2d(copy.deepcopy(bn), act, backend)
    return (fused(x), fused, unfused(bn, act, x), bn, unfused(exact_bn, act, x.double()), exact_bn)


@pytest.mark.parametrize("act", ACTS, ids=str)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_forward_and_running_statistics_match(backend, device, act, training, channels_last):
    x = inputs((3, 5, 7, 6), seed=1, channels_last=channels_last).to(device)
    out, fused, ref, bn, exact, exact_bn = run_both(backend, act, x, training)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert max_rel_error(out, exact) < 1e-5
    for name in ("running_mean", "running_var"):
        assert max_rel_error(getattr(fused, name), getattr(exact_bn, name)) < 1e-5
    assert int(fused.num_batches_tracked) == int(bn.num_batches_tracked)


@pytest.mark.parametrize("options", [dict(momentum=None), dict(affine=False), dict(track=False)],
                         ids=["cumulative", "no-affine", "untracked"])
def test_batch_norm_options_follow_nn_batch_norm(backend, options):
    """momentum=None (cumulative average over two steps), no affine parameters, no running
    statistics (batch statistics in eval too)."""
    x, x2 = inputs((4, 3, 5, 5), seed=2), inputs((4, 3, 5, 5), seed=3)
    for training in (True, False):
        bn = batch_norm(3, 2, **options).train(training)
        fused = FusedBatchNormAct2d(copy.deepcopy(bn), Activation(Kind.RELU), backend)
        for batch in (x, x2):
            assert max_rel_error(fused(batch), torch.relu(bn(batch))) < 1e-5
        assert fused.state_dict().keys() == bn.state_dict().keys()
        for key, value in bn.state_dict().items():
            assert max_rel_error(fused.state_dict()[key].double(), value.double()) < 1e-6, key


@pytest.mark.parametrize("act", ACTS, ids=str)
@pytest.mark.parametrize("training", [False, True], ids=["frozen", "train"])
def test_gradients_within_twice_the_unfused_error(backend, device, act, training):
    """Input, γ and β gradients of a loss with random weights, fused and unfused fp32 each
    against float64 (frozen: eval with autograd recording, running statistics constant)."""
    x = inputs((4, 6, 5, 7), seed=4).to(device)
    weights = torch.randn((4, 6, 5, 7), generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(device)
    results = []
    for make in ("fused", "unfused", "exact"):
        bn = batch_norm(6, seed=6).train(training).to(device)
        data = x.detach().clone()
        if make == "exact":
            bn, data = bn.double(), data.double()
        module = FusedBatchNormAct2d(bn, act, backend) if make == "fused" else nn.Sequential(bn, act.to_module())
        data.requires_grad_(True)
        loss = (module(data) * weights.to(data.dtype)).sum()
        results.append([t.double() for t in torch.autograd.grad(loss, [data, bn.weight, bn.bias])])
    fused, plain, exact = results
    for f, p, e in zip(fused, plain, exact):
        assert max_rel_error(f, e) <= max(2 * max_rel_error(p, e), 1e-5)


@pytest.mark.parametrize("training", [False, True], ids=["frozen", "train"])
@pytest.mark.parametrize("act", [Activation(Kind.RELU), Activation(Kind.SILU)], ids=str)
def test_gradcheck_float64_reference_backend(training, act):
    y = inputs((3, 2, 3, 4), seed=7, dtype=torch.float64).requires_grad_(True)
    gamma = (torch.rand(2, dtype=torch.float64) + 0.5).requires_grad_(True)
    beta = torch.randn(2, dtype=torch.float64).requires_grad_(True)
    mean, var = (None, None) if training else (torch.randn(2, dtype=torch.float64), torch.rand(2, dtype=torch.float64) + 0.5)

    def f(y, gamma, beta):
        return bn_act_train(y, gamma, beta, mean, var, 1e-3, *act.args, "reference")[0]

    assert torch.autograd.gradcheck(f, (y, gamma, beta))


@pytest.mark.backends("cpu")
def test_bf16_within_twice_the_unfused_error(backend):
    x = inputs((4, 8, 6, 6), seed=8, dtype=torch.bfloat16)
    for training in (False, True):
        out, _, ref, _, _, _ = run_both(backend, Activation(Kind.SILU), x, training)
        bn = batch_norm(8, 0).train(training).double()
        exact = torch.nn.functional.silu(bn(x.double()))
        assert out.dtype == torch.bfloat16
        assert_low_precision_close(out, ref, exact)


def test_opcheck():
    y = inputs((2, 3, 4, 4), seed=9)
    gamma, beta = torch.rand(3) + 0.5, torch.randn(3)
    for mean, var in ((None, None), (torch.randn(3), torch.rand(3) + 0.5)):
        torch.library.opcheck(bn_act_train, (y.requires_grad_(True), gamma.requires_grad_(True), beta, mean, var,
                                             1e-5, int(Kind.RELU), 0.0, 0.0, "reference"))


def test_falls_back_to_the_unfused_modules_where_no_kernel_applies():
    """float64, a 3-d input (BatchNorm2d's own error), autocast: the unfused computation."""
    bn = batch_norm(3, 10).double().eval()
    fused = FusedBatchNormAct2d(copy.deepcopy(bn), Activation(Kind.RELU), "auto")
    x = inputs((2, 3, 4, 4), seed=11, dtype=torch.float64)
    assert torch.equal(fused(x), torch.relu(bn(x)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(fused.float()(x.float()), torch.relu(bn.float()(x.float())))
    with pytest.raises(ValueError, match="expected 4D input"):
        fused(torch.randn(2, 3, 4))


def test_refuses_what_it_cannot_replace():
    with pytest.raises(TypeError, match="replaces a BatchNorm2d"):
        FusedBatchNormAct2d(nn.SyncBatchNorm(3), Activation(Kind.RELU))
    with pytest.raises(ValueError, match="not a fusable activation"):
        FusedBatchNormAct2d(nn.BatchNorm2d(3), nn.Mish())
    with pytest.raises(ValueError, match="unknown backend"):
        FusedBatchNormAct2d(nn.BatchNorm2d(3), nn.ReLU(), "cudnn")


def test_auto_times_the_unfused_ops_too(monkeypatch):
    """backend="auto": the first call of a kind times the fused backends and the unfused ops on
    copies (no running statistic moves), then runs the fastest; a fused kernel made slow loses."""
    tuning.reset()
    monkeypatch.setenv("RESNET_FUSED_TUNE", "on")
    monkeypatch.delenv("RESNET_FUSED_TUNE_CACHE", raising=False)
    bn = batch_norm(4, 12)
    fused = FusedBatchNormAct2d(copy.deepcopy(bn), Activation(Kind.RELU), "auto").train()
    import resnet_fused.norm_act as norm_act

    real = norm_act.bn_act_train

    def slow(*args):
        import time
        time.sleep(0.05)
        return real(*args)

    monkeypatch.setattr(norm_act, "bn_act_train", slow)
    x = inputs((3, 4, 5, 5), seed=13)
    out = fused(x)
    assert max_rel_error(out, torch.relu(bn.train()(x))) < 1e-5
    assert int(fused.num_batches_tracked) == 1  # the trials moved nothing
    assert max_rel_error(fused.running_mean, bn.running_mean) < 1e-6
    assert list(tuning.choices().values()) == ["reference"]
    tuning.reset()
