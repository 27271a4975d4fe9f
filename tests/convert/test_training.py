"""Models converted by convert() train like the unfused originals (the modules built on the
training op; the op itself: ops/test_conv_bn_act_train.py): gradients, running statistics,
nn.BatchNorm2d's options, whole training runs, frozen-BN fine-tuning, autocast, torch.compile;
on the GPU (marked ``gpu``) AMP training steps of a ResNet-50 per backend."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet18, resnet50
from torchvision.models.resnet import Bottleneck, ResNet

import resnet_fused
from helpers import (
    TextbookBlock, assert_grads_close, assert_low_precision_close, max_rel_error, randomize_batch_norms,
    textbook_resnet,
)
from resnet_fused import FusedConv2d
from resnet_fused.ops import reference

def build(factory, seed, **kwargs):
    torch.manual_seed(seed)
    return randomize_batch_norms(factory(**kwargs), torch.Generator().manual_seed(seed))


def sgd_steps(model, inputs, targets, steps):
    """``steps`` SGD-with-momentum steps; the losses."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.002, momentum=0.9, weight_decay=1e-4)
    losses = []
    for step in range(steps):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(inputs[step]), targets[step])
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def assert_same_training(original, converted, steps, input_shape, classes, tol):
    """``steps`` SGD steps of the converted model and of the original, each judged against the
    same steps of a float64 copy of the original (fp32 against fp32 compares two roundings, and a
    max pool's argmax or a ReLU's mask flips on a 1e-7 difference, after which either fp32 run
    drifts): per loss and per state entry, the converted model's error at most 2x the original's,
    or ``tol`` (relative). Both start from the same weights."""
    exact = copy.deepcopy(original).double()
    g = torch.Generator().manual_seed(20)
    inputs = [torch.randn(input_shape, generator=g) for _ in range(steps)]
    targets = [torch.randint(0, classes, (input_shape[0],), generator=g) for _ in range(steps)]
    expected = sgd_steps(exact, [x.double() for x in inputs], targets, steps)
    plain = sgd_steps(original, inputs, targets, steps)
    losses = sgd_steps(converted, inputs, targets, steps)
    for fused_loss, plain_loss, exact_loss in zip(losses, plain, expected):
        assert abs(fused_loss - exact_loss) <= max(2 * abs(plain_loss - exact_loss), tol * abs(exact_loss)), (
            losses, plain, expected)
    a, b, e = original.state_dict(), converted.state_dict(), exact.state_dict()
    assert list(a) == list(b)
    for key in a:
        if a[key].is_floating_point():
            assert max_rel_error(b[key], e[key]) <= max(2 * max_rel_error(a[key], e[key]), tol), key
        else:
            assert torch.equal(a[key], b[key]), key  # num_batches_tracked


@pytest.mark.backends("cpu")
def test_resnet18_training_steps(backend):
    model = build(resnet18, 4, num_classes=7).train()
    converted = resnet_fused.convert(model, backend=backend)
    assert sum(isinstance(m, FusedConv2d) for m in converted.modules()) == 20
    assert_same_training(model, converted, 5, (4, 3, 48, 45), 7, 1e-3)


def test_textbook_resnet_training_steps(backend):
    model = build(textbook_resnet, 5).train()
    converted = resnet_fused.convert(model, backend=backend)
    assert sum(isinstance(m, FusedConv2d) for m in converted.modules()) == 9
    # Small images under the Triton interpreter, which runs every program in numpy.
    assert_same_training(model, converted, 5, (3, 3, 11, 10) if backend == "cpu" else (2, 3, 7, 6), 5, 1e-4)


def toy_resnext(num_classes=5):
    """Two torchvision ResNeXt Bottlenecks (4 groups of 4 channels; the second strided, with a
    projection shortcut) behind a 3x3 stem: small enough for the Triton interpreter."""
    projection = nn.Sequential(nn.Conv2d(16, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
        Bottleneck(16, 4, groups=4, base_width=64),
        Bottleneck(16, 4, stride=2, downsample=projection, groups=4, base_width=64),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes),
    )


def test_resnext_training_steps(backend):
    """Grouped 3x3 convs (4-wide groups, packed 4 to a tile by the Triton kernel) train like the
    original: torchvision's ResNeXt-50 layout at toy width on the CPU, two of its blocks under
    the interpreter."""
    if backend == "cpu":
        model = build(ResNet, 8, block=Bottleneck, layers=[1, 1, 1, 1], groups=4, width_per_group=4, num_classes=5)
        # Batch 4 at 40x38: layer4 still sees 4 values per channel (at batch 2 the BN statistics
        # of its 1x1 map make 3 SGD steps chaotic, with or without groups).
        shape, grouped = (4, 3, 40, 38), 4
    else:
        model, shape, grouped = build(toy_resnext, 8), (4, 3, 9, 8), 2
    converted = resnet_fused.convert(model.train(), backend=backend)
    assert sum(isinstance(m, FusedConv2d) and m.groups == 4 for m in converted.modules()) == grouped
    assert_same_training(model, converted, 3, shape, 5, 1e-4)


def test_frozen_batch_norm_fine_tuning(backend):
    """Backbone BatchNorms in eval inside a training model (detection-style fine-tuning): running
    statistics fixed, gradients through them, conv weights and BN affine parameters learn."""
    model = build(textbook_resnet, 6).train()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eval()
    converted = resnet_fused.convert(model, backend=backend)
    for module in converted.modules():
        if isinstance(module, nn.BatchNorm2d):
            assert not module.training
    assert_same_training(model, converted, 4, (2, 3, 9, 9), 5, 1e-4)


BN_OPTIONS = {
    "default": {},
    "eps-momentum": {"eps": 1e-2, "momentum": 0.3},
    "momentum-none": {"momentum": None},
    "no-affine": {"affine": False},
    "no-running-stats": {"track_running_stats": False},
}


@pytest.mark.parametrize("mode", ["train", "eval", "eval-grad"])
@pytest.mark.parametrize("option", BN_OPTIONS)
def test_batch_norm_options(option, mode):
    """Every nn.BatchNorm2d constructor option, in every mode, over three calls (momentum=None
    averages over calls): outputs, gradients and the whole state_dict."""
    kwargs = BN_OPTIONS[option]
    model = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5, **kwargs), nn.ReLU())
    model = randomize_batch_norms(model, torch.Generator().manual_seed(7)).train(mode == "train")
    converted = resnet_fused.convert(model, backend="cpu")
    assert isinstance(converted[0], FusedConv2d)
    g = torch.Generator().manual_seed(8)
    for _ in range(3):
        x = torch.randn(1, 3, 6, 5, generator=g) * 2 + 0.5  # batch of one, spatial size > 1
        grad_mode = torch.enable_grad() if mode != "eval" else torch.no_grad()
        with grad_mode:
            outs = [m(x) for m in (model, converted)]
        assert max_rel_error(outs[1], outs[0]) < 1e-5
        if mode != "eval":
            expected, actual = [torch.autograd.grad(out.sum(), list(m.parameters())) for out, m in zip(outs, (model, converted))]
            assert_grads_close(actual, expected, 1e-5)
    a, b = model.state_dict(), converted.state_dict()
    assert list(a) == list(b)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)


def test_batch_norm_without_bias():
    """nn.BatchNorm2d(bias=False) (newer torch) has a weight and no bias."""
    try:
        bn = nn.BatchNorm2d(4, bias=False)
    except TypeError:
        pytest.skip("this torch's BatchNorm2d has no bias argument")
    model = randomize_batch_norms(nn.Sequential(nn.Conv2d(3, 4, 1), bn), torch.Generator().manual_seed(9))
    converted = resnet_fused.convert(model, backend="cpu")
    assert list(converted.state_dict()) == list(model.state_dict())
    x = torch.randn(2, 3, 5, 5)
    for training in (True, False):
        model.train(training), converted.train(training)
        with torch.no_grad():
            assert max_rel_error(converted(x), model(x)) < 1e-5


def test_single_value_per_channel_in_training_is_refused_like_torch():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    converted = resnet_fused.convert(model, backend="cpu")
    x = torch.randn(1, 3, 3, 3)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training") as theirs:
        model(x)
    state = copy.deepcopy(converted.state_dict())
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training") as ours:
        converted(x)
    assert str(ours.value) == str(theirs.value)
    # num_batches_tracked is incremented before the check in torch too
    assert torch.equal(converted[1].num_batches_tracked, model[1].num_batches_tracked)
    assert torch.equal(converted[1].running_mean, state["1.running_mean"])


def test_empty_batch_in_training():
    model = randomize_batch_norms(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), torch.Generator().manual_seed(10)).train()
    converted = resnet_fused.convert(model, backend="cpu")
    x = torch.randn(0, 3, 5, 5)
    out, expected = converted(x), model(x)
    assert out.shape == expected.shape == (0, 4, 3, 3)
    for key, value in model.state_dict().items():
        assert torch.equal(converted.state_dict()[key], value), key


def test_nan_input_propagates(backend):
    x = torch.randn(2, 3, 5, 5)
    x[1, 0, 2, 2] = float("nan")
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).train()
    converted = resnet_fused.convert(model, backend=backend)
    out, expected = converted(x), model(x)
    assert torch.equal(torch.isnan(out), torch.isnan(expected)) and torch.isnan(out).any()
    assert torch.isnan(converted[1].running_mean).any()


def test_autocast_bf16_training_step():
    """Under CPU autocast the fused unit computes in the unfused modules' dtypes (conv in bf16,
    statistics in fp32, bf16 out) and its error against fp64 stays within 2x theirs."""
    model = build(textbook_resnet, 11).train()
    converted = resnet_fused.convert(model, backend="cpu")
    exact_model = copy.deepcopy(model).double()
    x = torch.randn(4, 3, 10, 9, generator=torch.Generator().manual_seed(12))
    with torch.autocast("cpu", torch.bfloat16):
        fused_out, unfused_out = converted(x), model(x)
    exact = exact_model(x.double())
    assert fused_out.dtype == unfused_out.dtype
    assert_low_precision_close(fused_out, unfused_out, exact)
    for m in (converted, model, exact_model):
        m.zero_grad()
    fused_out.float().square().sum().backward()
    unfused_out.float().square().sum().backward()
    exact.square().sum().backward()
    for (name, p_fused), p_unfused, p_exact in zip(converted.named_parameters(), model.parameters(),
                                                   exact_model.parameters()):
        assert_low_precision_close(p_fused.grad, p_unfused.grad, p_exact.grad.double(), factor=2.0)
    for (key, v), v_exact in zip(converted.state_dict().items(), model.state_dict().values()):
        if v.is_floating_point():
            assert (v - v_exact).abs().max() <= 2e-2 * v_exact.abs().max() + 1e-3, key


def test_compiled_training_step_in_one_graph():
    """torch.compile(fullgraph=True) traces forward, backward (register_autograd) and the
    in-place running-stat updates of a converted model."""
    model = build(textbook_resnet, 13).train()
    converted = resnet_fused.convert(model, backend="cpu")
    compiled = torch.compile(converted, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 3, 8, 8)
    out = compiled(x)
    out.sum().backward()
    expected = model(x)
    expected.sum().backward()
    assert max_rel_error(out, expected) < 1e-4
    assert_grads_close([q.grad for q in converted.parameters()], [p.grad for p in model.parameters()], 1e-5)
    for (key, v), w in zip(model.state_dict().items(), converted.state_dict().values()):
        torch.testing.assert_close(w, v, rtol=1e-5, atol=1e-6)


def test_double_backward_is_refused_not_wrong():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).train()
    converted = resnet_fused.convert(model, backend="cpu")
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    (grad,) = torch.autograd.grad(converted(x).square().sum(), x)  # first order: fine
    assert max_rel_error(grad, torch.autograd.grad(model(x).square().sum(), x)[0]) < 1e-4
    with pytest.raises(RuntimeError, match="not differentiable.*backend='reference'"):
        torch.autograd.grad(converted(x).square().sum(), x, create_graph=True)


def test_frozen_batch_norms_inside_torchvision_blocks_stay_frozen():
    model = build(resnet18, 14, num_classes=7).train()
    model.layer1[0].bn1.eval()
    converted = resnet_fused.convert(model, backend="cpu")
    assert not converted.layer1[0].bn1.training and converted.layer1[0].bn2.training
    assert_same_training(model, converted, 2, (4, 3, 48, 45), 7, 1e-3)


def test_empty_batch_backward():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).train()
    converted = resnet_fused.convert(model, backend="cpu")
    x = torch.randn(0, 3, 5, 5, requires_grad=True)
    converted(x).sum().backward()
    assert x.grad.shape == x.shape and converted[0].weight.grad.abs().max() == 0


def test_eps_zero_in_training_is_refused_like_torch():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, eps=0.0)).train()
    converted = resnet_fused.convert(model, backend="cpu")
    with pytest.raises(ValueError, match="batch_norm eps must be positive during training"):
        converted(torch.randn(2, 3, 5, 5))


def test_autocast_keeps_the_dtype_of_an_in_place_residual_add():
    """torchvision's ``out += identity`` keeps the bf16 block output even when the identity is
    fp32 (the block's input under autocast)."""
    block = build(resnet18, 16).layer1[0].eval()
    converted = resnet_fused.convert(block, backend="cpu")
    x = torch.randn(2, 64, 9, 9)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        out, expected = converted(x), block(x)
    assert out.dtype == expected.dtype == torch.bfloat16
    assert_low_precision_close(out, expected, block.double()(x.double()))


class OutOfPlaceBlock(TextbookBlock):
    def forward(self, x):
        return self.relu(self.conv2(self.conv1(x)) + x)


@pytest.mark.parametrize("block_class", [TextbookBlock, OutOfPlaceBlock], ids=["out+=x", "out+x"])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "autograd"])
def test_autocast_dtype_of_a_generic_block_add(block_class, grad):
    """A block of a class convert has never seen, its input fp32 under autocast: ``out += x``
    keeps the bf16 conv output's dtype, ``out + x`` promotes to fp32, and the converted block
    gives the same dtype for each. The in-place add runs fused (the trace records ``+=`` as
    in-place); the promoting one takes the exact unfused path (the kernels write x's dtype)."""
    torch.manual_seed(18)
    block = randomize_batch_norms(block_class(6, 6), torch.Generator().manual_seed(18)).eval()
    converted = resnet_fused.convert(block, backend="cpu")
    assert converted.conv2[0].residual_fused
    x = torch.randn(2, 6, 7, 5, requires_grad=grad)
    calls = []
    real = reference.conv_bn_act_modules
    with pytest.MonkeyPatch.context() as patch, torch.set_grad_enabled(grad), torch.autocast("cpu", torch.bfloat16):
        patch.setattr(reference, "conv_bn_act_modules", lambda *a, **k: calls.append(1) or real(*a, **k))
        out, expected = converted(x), block(x)
    assert out.dtype == expected.dtype == (torch.bfloat16 if block_class is TextbookBlock else torch.float32)
    assert bool(calls) == (block_class is OutOfPlaceBlock)
    assert_low_precision_close(out.float(), expected.float(), block.double()(x.double()))


def test_compiles_with_dynamic_shapes():
    converted = resnet_fused.convert(build(textbook_resnet, 17).train(), backend="cpu")
    compiled = torch.compile(converted, backend="aot_eager", fullgraph=True, dynamic=True)
    for size in (8, 9):
        compiled(torch.randn(2, 3, size, size)).sum().backward()


@pytest.mark.backends(devices=("cuda",))
def test_resnet50_amp_training_steps(backend, device):
    """Three AMP (fp16 autocast) SGD steps of a channels_last ResNet-50, converted vs eager:
    the losses agree to fp16 accuracy and the parameters stay close."""
    torch.manual_seed(4)
    model = randomize_batch_norms(resnet50(num_classes=10), torch.Generator().manual_seed(4)).cuda()
    model = model.to(memory_format=torch.channels_last).train()
    converted = resnet_fused.convert(model, backend=backend)
    losses = {}
    for name, m in (("eager", model), ("fused", converted)):
        optimizer = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
        g = torch.Generator(device="cuda").manual_seed(5)
        losses[name] = []
        for _ in range(3):
            x = torch.randn(8, 3, 96, 96, device="cuda", generator=g).contiguous(memory_format=torch.channels_last)
            target = torch.randint(0, 10, (8,), device="cuda", generator=g)
            optimizer.zero_grad()
            with torch.autocast("cuda", torch.float16):
                loss = F.cross_entropy(m(x), target)
            loss.backward()
            optimizer.step()
            losses[name].append(loss.item())
    assert losses["fused"] == pytest.approx(losses["eager"], rel=2e-2)
    for (key, a), b in zip(model.state_dict().items(), converted.state_dict().values()):
        if a.is_floating_point():
            assert max_rel_error(b, a) < 5e-2, key
