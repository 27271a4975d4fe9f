"""Every activation (identity, ReLU, Hardtanh/ReLU6, LeakyReLU, SiLU, Hardswish, GELU exact and
tanh) in every fused op
and backend, against the unfused PyTorch modules: the spec (ops/activation.py), inference and
training on reference / triton (interpreter) / cpu, float64 gradcheck, fp16/bf16 by the 2x rule,
NaN propagation, the fused module, and the cuda backend's plan (which kinds a CUTLASS epilogue
applies). The Triton kernels' sm_90 compilation is codegen/test_activations_sm90.py. The
backends are conftest's ``backend`` parametrization (triton under the interpreter, cpu when the
extension is built, the reference where a test asks for it).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import assert_grads_close, assert_low_precision_close, max_rel_error, randomize_batch_norms
from resnet_fused import FusedConv2d, _extension, functional
from resnet_fused.nn import FoldedBatchNorm2d
from resnet_fused.ops import reference
from resnet_fused.ops.activation import IDENTITY, RELU, Activation, Kind, check_code, resolve
from resnet_fused.training import conv_bn_act_train

MODULES = {
    "identity": nn.Identity(),
    "relu": nn.ReLU(),
    "relu6": nn.ReLU6(),
    "hardtanh": nn.Hardtanh(-0.4, 0.9),
    "leaky": nn.LeakyReLU(0.2),
    "leaky-neg": nn.LeakyReLU(-0.3),  # a negative slope: the output no longer tells z's sign
    "silu": nn.SiLU(),
    "hardswish": nn.Hardswish(),
    "gelu": nn.GELU(),
    "gelu-tanh": nn.GELU(approximate="tanh"),
}
ACTS = {name: Activation.from_module(module) for name, module in MODULES.items()}
WITH_RESIDUAL = [name for name, act in ACTS.items() if not act.needs_preactivation]
# (N, C, H, W, K, kernel, stride, padding): odd sizes, a strided 3x3 and a 1x1.
SHAPES = {"3x3": (2, 5, 7, 6, 6, 3, 1, 1), "1x1-stride2": (3, 4, 9, 5, 7, 1, 2, 0)}


def operands(shape, dtype=torch.float32, seed=0, residual=False, requires_grad=False):
    """Conv input and weight, randomized BN statistics and affine parameters, a residual."""
    n, c, h, w, k, r, stride, pad = shape
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(c, k, r, stride, pad, bias=True)
    bn = nn.BatchNorm2d(k)
    randomize_batch_norms(bn, g)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) / (c * r * r) ** 0.5)
        conv.bias.copy_(torch.randn(k, generator=g) * 0.2)
    x = torch.randn(n, c, h, w, generator=g) * 1.5  # spreads z over every kink (Hardswish's ±3)
    out_hw = ((h + 2 * pad - r) // stride + 1, (w + 2 * pad - r) // stride + 1)
    res = torch.randn(n, k, *out_hw, generator=g) if residual else None
    tensors = [t.to(dtype) if t is not None else None for t in (x, conv.weight.detach(), conv.bias.detach(), res)]
    if requires_grad:
        tensors = [t.requires_grad_() if t is not None else None for t in tensors]
    x, weight, bias, res = tensors
    conv_args = dict(stride=stride, padding=pad)
    return x, weight, bias, bn, res, conv_args


def bn_tensors(bn, dtype=torch.float32, requires_grad=False):
    params = [bn.weight.detach().to(dtype).clone(), bn.bias.detach().to(dtype).clone()]
    if requires_grad:
        params = [p.requires_grad_() for p in params]
    return (*params, bn.running_mean.clone().to(dtype), bn.running_var.clone().to(dtype))


# ------------------------------------------------------------------------------------------ the spec


def test_from_module_recognizes_exact_types_only():
    assert ACTS["relu6"] == Activation(Kind.HARDTANH, 0.0, 6.0) == Activation.from_module(nn.Hardtanh(0.0, 6.0))
    assert ACTS["leaky"] == Activation(Kind.LEAKY_RELU, 0.2)
    assert Activation.from_module(nn.ReLU(inplace=True)) == RELU
    assert Activation.from_module(nn.GELU(approximate="tanh")) == Activation(Kind.GELU_TANH)
    assert Activation.from_module(nn.Mish()) is None
    assert Activation.from_module(type("MyReLU", (nn.ReLU,), {})()) is None  # a subclass may compute anything
    hooked = nn.SiLU()
    hooked.register_forward_hook(lambda *a: None)
    assert Activation.from_module(hooked) is None


@pytest.mark.parametrize("name", MODULES)
def test_to_module_round_trips_and_computes_the_same(name):
    act = ACTS[name]
    module = act.to_module()
    assert Activation.from_module(module) == act
    z = torch.linspace(-8, 8, 161, dtype=torch.float64)
    torch.testing.assert_close(module(z), MODULES[name](z), rtol=0, atol=0)
    torch.testing.assert_close(reference.activate(z, act), MODULES[name](z), rtol=0, atol=0)


def test_spec_is_immutable_and_normalized():
    assert Activation(Kind.SILU, 1.0, 2.0) == Activation(Kind.SILU) and hash(Activation(Kind.SILU, 3.0)) == hash(
        Activation(Kind.SILU))
    assert Activation(4).kind is Kind.SILU and Activation(Kind.HARDTANH, 0, 6).args == (2, 0.0, 6.0)
    with pytest.raises(AttributeError):
        RELU.kind = Kind.SILU
    with pytest.raises(ValueError, match=r"Hardtanh needs min_val < max_val, got \(1.0, 1.0\)"):
        Activation(Kind.HARDTANH, 1, 1)
    with pytest.raises(ValueError, match=r"unknown activation code 9; known: 0 \(IDENTITY\), 1 \(RELU\)"):
        Activation(9)
    with pytest.raises(ValueError, match="unknown activation code True"):
        check_code(True)


def test_relu_and_act_side_by_side():
    assert resolve(None, None, "f") == RELU and resolve(None, False, "f") == IDENTITY
    assert resolve(nn.SiLU(), None, "f") == Activation(Kind.SILU)
    with pytest.raises(ValueError, match="f: give relu= or act=, not both"):
        resolve(nn.SiLU(), True, "f")
    with pytest.raises(TypeError, match="f: relu must be a bool"):
        resolve(None, 1, "f")
    with pytest.raises(ValueError, match="f: Mish is not a fusable activation"):
        resolve(nn.Mish(), None, "f")
    with pytest.raises(TypeError, match="f: act must be an Activation"):
        resolve("silu", None, "f")


@pytest.mark.parametrize("op", ["conv_bn_act", "bn_act_apply"])
def test_cpp_ops_refuse_an_unknown_code(op):
    x, weight, _, bn, _, _ = operands(SHAPES["3x3"])
    ops = torch.ops.resnet_fused
    unknown = len(Kind)
    with pytest.raises(RuntimeError, match=rf"{op}: unknown activation code {unknown}; known: 0 \(identity\), 1 \(ReLU\)"):
        if op == "conv_bn_act":
            ops.conv_bn_act(x, weight, None, None, None, bn.running_mean, bn.running_var, 1e-5, None, [1, 1], [1, 1],
                            [1, 1], 1, unknown, 0.0, 0.0)
        else:
            ops.bn_act_apply(x, x.mean((0, 2, 3)), x.var((0, 2, 3)), None, None, 1e-5, None, unknown, 0.0, 0.0)


# ------------------------------------------------------------------------------------------ inference


@pytest.mark.parametrize("residual", [False, True], ids=["nores", "res"])
@pytest.mark.parametrize("name", ACTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_inference_matches_reference(shape, backend, name, residual):
    x, weight, bias, bn, res, conv_args = operands(SHAPES[shape], seed=1, residual=residual)
    gamma, beta, mean, var = bn_tensors(bn)
    out = functional.conv_bn_act(x, weight, mean, var, bias=bias, bn_weight=gamma, bn_bias=beta, eps=bn.eps,
                                 residual=res, act=ACTS[name], backend=backend, **conv_args)
    d = lambda t: None if t is None else t.double()  # noqa: E731
    exact = reference.conv_bn_act(d(x), d(weight), d(bias), d(gamma), d(beta), d(mean), d(var), eps=bn.eps,
                                  residual=d(res), act=MODULES[name], **conv_args)
    assert max_rel_error(out, exact) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", ["relu6", "leaky", "silu", "hardswish"])
def test_inference_low_precision_by_the_2x_rule(backend, name, dtype):
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("bf16 math is broken in Triton's interpreter; the sm_90 compile tests cover it")
    x, weight, bias, bn, res, conv_args = operands(SHAPES["3x3"], seed=2, residual=True)
    gamma, beta, mean, var = bn_tensors(bn)
    low = [t.to(dtype) for t in (x, weight, bias, res)]
    out = functional.conv_bn_act(low[0], low[1], mean, var, bias=low[2], bn_weight=gamma, bn_bias=beta,
                                 residual=low[3], act=ACTS[name], backend=backend, **conv_args)
    unfused = reference.conv_bn_act(*low[:3], gamma, beta, mean, var, residual=low[3], act=ACTS[name], **conv_args)
    exact = reference.conv_bn_act(x.double(), weight.double(), bias.double(), gamma.double(), beta.double(),
                                  mean.double(), var.double(), residual=res.double(), act=ACTS[name], **conv_args)
    assert out.dtype == dtype
    assert_low_precision_close(out, unfused, exact)


@pytest.mark.parametrize("name", ACTS)
@pytest.mark.backends(reference=True)
def test_nan_propagates_as_in_torch(backend, name):
    x, weight, _, bn, _, _ = operands(SHAPES["3x3"], seed=3)
    gamma, beta, mean, var = bn_tensors(bn)
    x[0, :, 2, 2] = float("nan")
    out = functional.conv_bn_act(x, weight, mean, var, bn_weight=gamma, bn_bias=beta, padding=1, act=ACTS[name],
                                 backend=backend)
    expected = MODULES[name](F.batch_norm(F.conv2d(x, weight, padding=1), mean, var, gamma, beta))
    assert expected.isnan().any()
    assert torch.equal(out.isnan(), expected.isnan())


# ------------------------------------------------------------------------------------------ training


def train_step(backend, name, residual, dtype=torch.float32, training=True, seed=4, shape="3x3"):
    """One forward and backward of the fused unit (or, for backend None, the unfused modules):
    the output, the gradients of x, weight, bias, γ, β (and the residual) and the running stats."""
    x, weight, bias, bn, res, conv_args = operands(SHAPES[shape], dtype, seed, residual, requires_grad=True)
    # BatchNorm's own tensors stay fp32 under fp16/bf16 activations, as autocast keeps them.
    gamma, beta, mean, var = bn_tensors(bn, torch.float64 if dtype == torch.float64 else torch.float32,
                                        requires_grad=True)
    if backend is None:
        out = reference.conv_bn_act(x, weight, bias, gamma, beta, mean, var, training=training, eps=bn.eps,
                                    residual=res, act=MODULES[name], **conv_args)
    else:
        out = functional.conv_batch_norm_act(x, weight, mean, var, training=training, bias=bias, bn_weight=gamma,
                                             bn_bias=beta, eps=bn.eps, residual=res, act=ACTS[name], backend=backend,
                                             **conv_args)
    leaves = [t for t in (x, weight, bias, gamma, beta, res) if t is not None]
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    grads = torch.autograd.grad(out, leaves, grad)
    return out, grads, (mean, var)


@pytest.mark.parametrize("training", [True, False], ids=["batch-stats", "frozen"])
@pytest.mark.parametrize("name", ACTS)
@pytest.mark.backends(reference=True)
def test_training_matches_reference(backend, name, training):
    for residual in ([False, True] if name in WITH_RESIDUAL else [False]):
        out, grads, running = train_step(backend, name, residual, training=training)
        exact_out, exact_grads, exact_running = train_step(None, name, residual, torch.float64, training=training)
        assert max_rel_error(out, exact_out) < 1e-5
        assert_grads_close(grads, exact_grads, 1e-5)
        for actual, expected in zip(running, exact_running):
            assert max_rel_error(actual, expected) < 1e-6


@pytest.mark.parametrize("name", ["relu6", "leaky-neg", "silu", "hardswish"])
@pytest.mark.backends("reference", "cpu")
def test_gradcheck_float64(backend, name):
    x, weight, bias, bn, _, _ = operands(SHAPES["1x1-stride2"], torch.float64, seed=5, requires_grad=True)
    gamma, beta, mean, var = bn_tensors(bn, torch.float64, requires_grad=True)
    for running in ((None, None), (mean, var)):
        def unit(x, weight, bias, gamma, beta):
            return conv_bn_act_train(x, weight, bias, gamma, beta, *running, 1e-3, None, [2, 2], [0, 0], [1, 1], 1,
                                     *ACTS[name].args, backend, False)[0]

        assert torch.autograd.gradcheck(unit, (x, weight, bias, gamma, beta))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", ["relu6", "leaky-neg", "silu", "hardswish"])
def test_training_low_precision_by_the_2x_rule(backend, name, dtype):
    """fp16/bf16 training by the 2x rule (Triton's: fp16 only under the interpreter).

    The fused backward decides Hardtanh's and Hardswish's kinks on z recomputed in fp32, the
    unfused one on z rounded to the dtype: where an element lies within a rounding of a kink,
    either may take the other side than fp64 does, and one such element moves dx by a whole
    γ·invstd·g. The seeded data here has no element that close to a kink (Hardtanh(-0.4, 0.9)
    at seed 6 in bf16 has one: fused and unfused then differ 4x, by chance, not by accuracy)."""
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("bf16 math is broken in Triton's interpreter; the sm_90 compile tests cover it")
    out, grads, _ = train_step(backend, name, False, dtype, seed=6)
    unfused_out, unfused_grads, _ = train_step(None, name, False, dtype, seed=6)
    exact_out, exact_grads, _ = train_step(None, name, False, torch.float64, seed=6)
    assert_low_precision_close(out, unfused_out, exact_out)
    # Not the conv bias's gradient (index 2): 0 in theory under batch statistics, so both
    # errors are rounding noise, which no ratio rule can hold.
    for i, (actual, unfused, exact) in enumerate(zip(grads, unfused_grads, exact_grads)):
        if i != 2:
            assert_low_precision_close(actual, unfused, exact)


@pytest.mark.parametrize("name", ["hardtanh", "leaky", "silu", "hardswish"])
@pytest.mark.backends("cpu")
def test_preactivation_kinds_refuse_a_residual_under_autograd_only(backend, name):
    x, weight, _, bn, res, conv_args = operands(SHAPES["3x3"], seed=7, residual=True)
    gamma, beta, mean, var = bn_tensors(bn, requires_grad=True)
    tracked = torch.zeros((), dtype=torch.long)
    kwargs = dict(bn_weight=gamma, bn_bias=beta, residual=res, act=ACTS[name], backend=backend,
                  num_batches_tracked=tracked, **conv_args)
    with pytest.raises(ValueError, match="after a residual add is supported in inference only"):
        functional.conv_batch_norm_act(x, weight, mean, var, training=True, **kwargs)
    assert tracked.item() == 0  # refused before anything moved
    with torch.no_grad():  # no backward, nothing to refuse: batch statistics, no gradients
        out = functional.conv_batch_norm_act(x, weight, mean.clone(), var.clone(), training=True, **kwargs)
        expected = reference.conv_bn_act(x, weight, None, gamma, beta, mean.clone(), var.clone(), training=True,
                                         residual=res, act=ACTS[name], **conv_args)
    assert max_rel_error(out, expected) < 1e-5
    with pytest.raises(ValueError, match="after a residual add is supported in inference only"):
        conv_bn_act_train(x, weight, None, gamma, beta, None, None, 1e-5, res, [1, 1], [1, 1], [1, 1], 1,
                          *ACTS[name].args, backend, False)


# ------------------------------------------------------------------------------------------ the module


def fused_pair(name, backend, seed=8):
    """A Conv2d → BatchNorm2d → activation Sequential and its fused twin (a deep copy)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(5, 6, 3, padding=1), nn.BatchNorm2d(6), MODULES[name])
    randomize_batch_norms(model, torch.Generator().manual_seed(seed))
    copy_ = copy.deepcopy(model)
    folded = FoldedBatchNorm2d(copy_[1])
    fused = nn.Sequential(FusedConv2d(copy_[0], folded, act=copy_[2], backend=backend), folded)
    return model, fused


@pytest.mark.parametrize("name", ["relu6", "leaky-neg", "silu", "hardswish"])
def test_fused_module_trains_and_evaluates_as_the_sequential(backend, name):
    model, fused = fused_pair(name, backend)
    x = torch.randn(3, 5, 7, 6)
    for mode in ("train", "eval"):
        getattr(model, mode)(), getattr(fused, mode)()
        grad = torch.randn(3, 6, 7, 6)
        out, expected = fused(x), model(x)
        assert max_rel_error(out, expected) < 1e-5
        out.backward(grad)
        expected.backward(grad)
        assert_grads_close([p.grad for p in fused.parameters()], [p.grad for p in model.parameters()], 1e-5)
        torch.testing.assert_close(fused[1].running_var, model[1].running_var, rtol=1e-6, atol=0)
    with torch.no_grad():
        assert max_rel_error(fused(x), model(x)) < 1e-5


def test_fused_module_activation_attributes():
    _, fused = fused_pair("silu", "cpu")
    conv = fused[0]
    assert conv.act == Activation(Kind.SILU) and conv.relu is False
    assert "act=Activation.SILU" in repr(conv)
    conv.relu = True  # convert's switch: ReLU or nothing
    assert conv.act == RELU and "relu=True" in repr(conv)
    conv.relu = False
    assert conv.act == IDENTITY
    with pytest.raises(ValueError, match="FusedConv2d: give relu= or act=, not both"):
        FusedConv2d(nn.Conv2d(2, 2, 1), FoldedBatchNorm2d(nn.BatchNorm2d(2)), relu=True, act=nn.SiLU())
    assert FusedConv2d(nn.Conv2d(2, 2, 1), FoldedBatchNorm2d(nn.BatchNorm2d(2)), False).act == IDENTITY


@pytest.mark.parametrize("relu", [True, False])
def test_a_module_pickled_before_activations_loads(relu):
    """Its state holds ``relu`` (a plain attribute then), not ``act``."""
    _, fused = fused_pair("silu", "cpu")
    state = dict(fused[0].__dict__)
    del state["act"]
    state["relu"] = relu
    loaded = FusedConv2d.__new__(FusedConv2d)
    loaded.__setstate__(state)
    assert loaded.act == (RELU if relu else IDENTITY) and "relu" not in loaded.__dict__
    assert copy.deepcopy(fused)[0].act == Activation(Kind.SILU)


# ------------------------------------------------------------------------------------------ the cuda plan


@pytest.mark.skipif(not _extension.has_cpu_ops(), reason=f"extension not built: {_extension.LOAD_ERROR}")
@pytest.mark.parametrize("name", ACTS)
def test_cuda_plan_routes_non_clamp_kinds_off_sm90(name):
    """On Hopper the sm90 epilogue is a clamp: identity, ReLU, Hardtanh fuse; LeakyReLU, SiLU and
    Hardswish take cuDNN + the epilogue pass. On Ampere the sm80 epilogue applies every kind."""
    plan = _extension._C.cuda_conv_plan
    args = dict(input_shape=[8, 64, 56, 56], weight_shape=[64, 64, 3, 3], padding=[1, 1], act=ACTS[name].args[0])
    hopper = plan(**args, sm90a=True, sm80_cubins=[80, 90])
    if ACTS[name].kind in (Kind.IDENTITY, Kind.RELU, Kind.HARDTANH):
        assert hopper["kernel"].startswith("sm90_")
    else:
        assert hopper["kernel"] is None
        kind = {Kind.LEAKY_RELU: "LeakyReLU", Kind.SILU: "SiLU", Kind.HARDSWISH: "Hardswish", Kind.GELU: "GELU",
                Kind.GELU_TANH: "GELU (tanh)"}[ACTS[name].kind]
        why = f"activation {kind}: the sm90 epilogue applies clamps only (identity, ReLU, Hardtanh)"
        assert hopper["reason"] == why
    ampere = plan(**args, capability=(8, 0), sm_count=108, sm90a=True, sm80_cubins=[80, 90])
    assert ampere["kernel"].startswith("sm80_")


@pytest.mark.skipif(not _extension.has_cpu_ops(), reason=f"extension not built: {_extension.LOAD_ERROR}")
def test_cuda_plan_refuses_an_unknown_code():
    with pytest.raises(ValueError, match=f"unknown activation code {len(Kind)}"):
        _extension._C.cuda_conv_plan([8, 64, 56, 56], [64, 64, 3, 3], act=len(Kind))
