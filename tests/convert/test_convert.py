"""convert(): model surgery on torchvision ResNets and home-made models, every backend
available here, eval and train mode, state_dict unchanged."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet18, resnet50

import resnet_fused
from helpers import max_rel_error, randomize_batch_norms
from resnet_fused import FoldedBatchNorm2d, FusedBasicBlock, FusedBottleneck, FusedConv2d

def build(factory, seed):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    return randomize_batch_norms(factory(), g).eval()


@pytest.fixture(scope="module")
def models():
    return {"resnet18": build(resnet18, 1), "resnet50": build(resnet50, 2)}


def test_available_backends_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    # Fastest first; Triton only because the tests run it under the interpreter.
    assert resnet_fused.available_backends() == ["triton", "cpu", "reference"]


def assert_same_state(original: nn.Module, converted: nn.Module):
    a, b = original.state_dict(), converted.state_dict()
    assert list(a) == list(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.backends(reference=True)  # every backend that runs here; triton under the interpreter
@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_torchvision_resnet_eval(models, name, backend):
    model = models[name]
    converted = resnet_fused.convert(model, backend=backend)
    assert_same_state(model, converted)
    fused_convs = [m for m in converted.modules() if isinstance(m, FusedConv2d)]
    assert len(fused_convs) == sum(isinstance(m, nn.Conv2d) for m in model.modules())
    blocks = FusedBasicBlock if name == "resnet18" else FusedBottleneck
    assert sum(isinstance(m, blocks) for m in converted.modules()) == (8 if name == "resnet18" else 16)
    x = torch.randn(1, 3, 32, 29, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected, out = model(x), converted(x)
    assert max_rel_error(out, expected) < 1e-4


def test_channels_last_model(models):
    model = models["resnet18"]
    converted = resnet_fused.convert(model, backend="cpu").to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 33, 31).to(memory_format=torch.channels_last)
    with torch.no_grad():
        assert max_rel_error(converted(x), model(x)) < 1e-4


def test_reference_backend_trains_exactly_like_the_original(models):
    """The reference backend runs the unfused modules: outputs, gradients and BN running
    statistics bit for bit (fused training: tests/convert/test_training.py)."""
    model = build(resnet18, 4).train()
    converted = resnet_fused.convert(model, backend="reference")
    x = torch.randn(2, 3, 32, 32)
    out_a, out_b = model(x), converted(x)
    assert torch.equal(out_a, out_b)
    out_a.square().sum().backward()
    out_b.square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), converted.parameters()):
        assert torch.equal(p.grad, q.grad), name
    assert_same_state(model, converted)  # running stats and num_batches_tracked updated alike


def test_eval_with_autograd_recording_is_differentiable(models):
    model = models["resnet18"]
    converted = resnet_fused.convert(model, backend="cpu")
    x = torch.randn(1, 3, 32, 32, requires_grad=True)
    converted(x).sum().backward()
    grad = x.grad.clone()
    x.grad = None
    model(x).sum().backward()
    assert max_rel_error(grad, x.grad) < 1e-4


def test_inplace_flag(models):
    model = build(resnet18, 5)
    copy = resnet_fused.convert(model)
    assert copy is not model and not any(isinstance(m, FusedConv2d) for m in model.modules())
    same = resnet_fused.convert(model, inplace=True)
    assert same is model and any(isinstance(m, FusedConv2d) for m in model.modules())


class HomeMadeBlock(nn.Module):
    """A user's residual block: attribute names of their own, a functional ReLU, a shared
    ReLU module, a BatchNorm whose output is used twice (fused, but no ReLU folded in) and a
    conv whose output is used twice (cannot absorb its BatchNorm)."""

    def __init__(self, c):
        super().__init__()
        self.stem_conv = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.stem_norm = nn.BatchNorm2d(c)
        self.conv_a = nn.Conv2d(c, c, 3, padding=1)
        self.norm_a = nn.BatchNorm2d(c)
        self.conv_b = nn.Conv2d(c, c, 1)
        self.norm_b = nn.BatchNorm2d(c)
        self.conv_c = nn.Conv2d(c, c, 1)
        self.norm_c = nn.BatchNorm2d(c)
        self.act = nn.ReLU()
        self.head = nn.Sequential(nn.Conv2d(c, 4, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU(inplace=True))

    def forward(self, x):
        x = F.relu(self.stem_norm(self.stem_conv(x)))
        y = self.act(self.norm_a(self.conv_a(x)))
        z = self.norm_b(self.conv_b(y))
        c = self.conv_c(z)
        w = self.norm_c(c) + c
        return self.head(self.act(w + x)) + z.mean()


def test_home_made_model_chains():
    model = build(lambda: HomeMadeBlock(6), 6)
    converted = resnet_fused.convert(model, backend="cpu")
    assert_same_state(model, converted)
    assert isinstance(converted.stem_conv, FusedConv2d) and converted.stem_conv.relu
    assert isinstance(converted.stem_norm, FoldedBatchNorm2d)
    assert isinstance(converted.conv_a, FusedConv2d) and converted.conv_a.relu
    assert isinstance(converted.act, nn.ReLU)  # shared: stays, relu(relu(y)) == relu(y)
    assert isinstance(converted.conv_b, FusedConv2d) and not converted.conv_b.relu
    assert type(converted.conv_c) is nn.Conv2d and type(converted.norm_c) is nn.BatchNorm2d
    assert isinstance(converted.head[0], FusedConv2d) and type(converted.head[2]) is resnet_fused.FoldedReLU
    x = torch.randn(2, 3, 11, 13)
    with torch.no_grad():
        assert max_rel_error(converted(x), model(x)) < 1e-5


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return y if y.sum() > 0 else -y  # not traceable: left unfused, still correct


def test_untraceable_parent_is_left_alone():
    model = build(DataDependent, 7)
    converted = resnet_fused.convert(model)
    assert type(converted.conv) is nn.Conv2d
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), model(x))


def test_batch_norm_without_running_stats_uses_batch_statistics():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU()).eval()
    converted = resnet_fused.convert(model, backend="cpu")
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), model(x))


def test_converted_model_saves_and_loads(tmp_path, models):
    converted = resnet_fused.convert(models["resnet18"], backend="cpu")
    torch.save(converted.state_dict(), tmp_path / "w.pt")
    fresh = resnet18()
    fresh.load_state_dict(torch.load(tmp_path / "w.pt"))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert max_rel_error(converted(x), fresh.eval()(x)) < 1e-4


def test_converted_model_compiles_in_one_graph(models, backend):
    """torch.compile sees through the fused modules (custom ops with fake kernels), so there
    is no graph break."""
    converted = resnet_fused.convert(models["resnet18"], backend=backend)
    compiled = torch.compile(converted, backend="aot_eager", fullgraph=True)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert max_rel_error(compiled(x), models["resnet18"](x)) < 1e-4


class StandardizedConv2d(nn.Conv2d):
    """Weight-standardized conv: an nn.Conv2d subclass computing something else."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class SubclassedBatchNorm2d(nn.BatchNorm2d):
    """A subclass may compute something else: never fused, whatever it inherits."""


@pytest.mark.parametrize(
    "variant",
    ["bn-subclass", "standardized-conv", "reflect-padding", "bn-hook"],
)
def test_non_plain_modules_are_never_fused(variant):
    """Blocks built from other modules than nn.Conv2d/nn.BatchNorm2d and the norms fused like it
    (a subclass, weight standardization, padding modes, hooks) stay as they were and compute the
    same. (torchvision's FrozenBatchNorm2d is fused: tests/convert/test_frozen_batch_norm.py.)"""
    kwargs = {"norm_layer": SubclassedBatchNorm2d} if variant == "bn-subclass" else {}
    model = build(lambda: resnet18(**kwargs), 8)
    block = model.layer1[0]
    if variant == "standardized-conv":
        conv = StandardizedConv2d(64, 64, 3, padding=1, bias=False)
        conv.weight.data.copy_(block.conv1.weight)
        block.conv1 = conv
    if variant == "reflect-padding":
        block.conv1.padding_mode = "reflect"
    if variant == "bn-hook":
        block.bn1.register_forward_hook(lambda module, args, out: out.clamp(max=0.5))
    converted = resnet_fused.convert(model, backend="cpu")
    assert not isinstance(converted.layer1[0], FusedBasicBlock)
    assert not isinstance(converted.layer1[0].conv1, FusedConv2d)
    assert_same_state(model, converted)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert max_rel_error(converted(x), model(x)) < 1e-5


class TrainOnlyTap(nn.Module):
    """In training the forward also returns the pre-BN activation: the chain exists only in
    eval mode, so fusing it would change train-mode outputs."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        out = torch.relu(self.bn(y))
        return (out, y) if self.training else out


def test_chain_must_hold_in_train_and_eval_mode():
    model = build(TrainOnlyTap, 9)
    converted = resnet_fused.convert(model)
    assert type(converted.conv) is nn.Conv2d
    # The BatchNorm + ReLU pair holds in both modes: it runs fused without the conv.
    assert isinstance(converted.bn, resnet_fused.FusedBatchNormAct2d)
    x = torch.randn(2, 3, 8, 8)
    for a, b in zip(model.train()(x), converted.train()(x)):
        assert max_rel_error(b, a) < 1e-5


class Aliased(nn.Module):
    """The conv and the BatchNorm are each registered under two names; fx reports the first,
    the forward uses the second. Replacing one slot would lose or double-apply the BN."""

    def __init__(self):
        super().__init__()
        conv, bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.conv_a, self.norm_old = conv, bn
        self.conv, self.bn = conv, bn

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


def test_modules_registered_twice_are_not_fused():
    model = build(Aliased, 10)
    converted = resnet_fused.convert(model, backend="cpu")
    assert not any(isinstance(m, FusedConv2d) for m in converted.modules())
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), model(x))


class Shortcut(nn.Sequential):
    def forward(self, x):
        return super().forward(x) * 0.5


@pytest.mark.parametrize("kind", ["subclass", "hooked"])
def test_shortcut_container_is_kept_when_not_a_plain_sequential(kind):
    model = build(resnet18, 11)
    block = model.layer2[0]
    if kind == "subclass":
        block.downsample = Shortcut(*block.downsample)
    else:
        block.downsample.register_forward_hook(lambda module, args, out: out * 2.0)
    converted = resnet_fused.convert(model, backend="cpu")
    assert isinstance(converted.layer2[0], FusedBasicBlock)
    assert type(converted.layer2[0].downsample) is type(block.downsample)  # its forward and hooks stay
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert max_rel_error(converted(x), model(x)) < 1e-5


def test_modules_with_any_hook_kind_are_not_fused():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    calls = []
    model[0].register_full_backward_pre_hook(lambda module, grad: calls.append("conv"))
    model[2].register_forward_hook(lambda module, args, out: calls.append("relu"))
    converted = resnet_fused.convert(model, backend="cpu")
    assert type(converted[0]) is nn.Conv2d
    x = torch.randn(1, 3, 8, 8, requires_grad=True)
    converted(x).sum().backward()
    assert calls == ["relu", "conv"]


class InspectsItsActivation(nn.Module):
    """A forward that branches on the type of its activation slot, as configurable blocks do."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        x = self.bn(self.conv(x))
        if isinstance(self.act, nn.ReLU):
            return self.act(x)
        return x * 2  # what an Identity in the folded ReLU's slot made it run


def test_a_forward_that_inspects_its_folded_relu_slot_takes_the_same_branch():
    model = randomize_batch_norms(InspectsItsActivation(), torch.Generator().manual_seed(6)).eval()
    converted = resnet_fused.convert(model, backend="cpu")
    assert converted.conv.relu and type(converted.act) is resnet_fused.FoldedReLU and converted.act.inplace
    x = torch.randn(2, 3, 9, 7)
    with torch.no_grad():
        assert max_rel_error(converted(x), model(x)) < 1e-5
        assert max_rel_error(copy.deepcopy(converted)(x), model(x)) < 1e-5


class StringPadding(nn.Module):
    """padding='same' and 'valid': numbers where both sides get the same (a 3x3, a 3x3 with
    dilation 2); 'same' with a 2x2 kernel pads one side only and stays unfused."""

    def __init__(self):
        super().__init__()
        self.same = nn.Sequential(nn.Conv2d(3, 4, 3, padding="same"), nn.BatchNorm2d(4), nn.ReLU())
        self.dilated = nn.Sequential(nn.Conv2d(4, 4, 3, padding="same", dilation=2), nn.BatchNorm2d(4))
        self.valid = nn.Sequential(nn.Conv2d(4, 5, 3, padding="valid"), nn.BatchNorm2d(5))
        self.even = nn.Sequential(nn.Conv2d(5, 5, 2, padding="same"), nn.BatchNorm2d(5))

    def forward(self, x):
        return self.even(self.valid(self.dilated(self.same(x))))


def test_string_padding_fuses_where_it_is_symmetric():
    model = build(StringPadding, 12).eval()
    converted, report = resnet_fused.convert(model, backend="reference", report=True)
    assert [tuple(converted.get_submodule(n)[0].padding) for n in ("same", "dilated", "valid")] == [
        (1, 1), (2, 2), (0, 0)]
    assert all(isinstance(converted.get_submodule(n)[0], FusedConv2d) for n in ("same", "dilated", "valid"))
    assert type(converted.even[0]) is nn.Conv2d
    assert "only zero padding the same on both sides is fused" in dict(report.unfused)["even.0"]
    x = torch.randn(2, 3, 11, 12)
    with torch.no_grad():
        assert max_rel_error(converted(x), model(x)) < 1e-5
        assert max_rel_error(resnet_fused.freeze(model)(x), model(x)) < 1e-4  # frozen with the numbers


def test_timm_same_padding_convs_fuse_with_their_dynamic_padding():
    """timm's Conv2dSame pads by the input's size on each call (TensorFlow's SAME: the odd extra
    row or column after): fused, it pads the same way; odd and even sizes, strides 1 and 2, a
    dilation; and freeze leaves it fused (its padding is not a constant)."""
    conv2d_same = pytest.importorskip("timm.layers.conv2d_same")

    def build_model():
        return nn.Sequential(conv2d_same.Conv2dSame(3, 6, 3, stride=2), nn.BatchNorm2d(6), nn.SiLU(),
                             conv2d_same.Conv2dSame(6, 6, 4, dilation=2, groups=3), nn.BatchNorm2d(6))

    model = build(build_model, 13).eval()
    converted, report = resnet_fused.convert(model, backend="reference", report=True)
    assert report.convs_fused == 2 and converted[0].same_padding and converted[3].same_padding
    assert list(converted.state_dict()) == list(model.state_dict())
    for size in ((11, 12), (16, 16), (7, 9)):
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            assert max_rel_error(converted(x), model(x)) < 1e-5
    frozen = resnet_fused.freeze(model)
    x = torch.randn(2, 3, 11, 12)
    assert isinstance(frozen.model[0], FusedConv2d) and max_rel_error(frozen(x), model(x)) < 1e-4
