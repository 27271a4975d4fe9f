"""Residual add + ReLU fused in blocks of any class (residual.py), the conversion report, and the
model families of the issue: converted vs original, and no BatchNorm/add/ReLU op left where
the pattern is fusible (aten ops counted with a dispatch mode)."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import resnet_fused
from helpers import CountOps, TextbookBlock, max_rel_error, pickle_round_trip, randomize_batch_norms, textbook_resnet
from resnet_fused import FoldedBatchNorm2d, FusedConv2d
from resnet_fused.convert.residual import ResidualForward
from resnet_fused.convert.tracing import SequentialsTraced
from resnet_fused.ops.activation import Activation, Kind


def check_converted(model, x, backend="cpu", leftover=None, tol=1e-5, counts=None):
    """Converted vs original on ``x``; the aten ops of the converted forward go to ``counts``."""
    model = randomize_batch_norms(model, torch.Generator().manual_seed(0)).eval()
    converted = resnet_fused.convert(model, backend=backend)
    with torch.no_grad(), CountOps() as ops:
        out = converted(x)
    if counts is not None:
        counts.update(ops.counts)
    with torch.no_grad():
        assert max_rel_error(out, model(x)) < tol
    if leftover is not None:
        assert ops.leftover() == leftover
    return converted


class Block(nn.Module):
    """Parametrized textbook-style block: how the add and the ReLU are written."""

    def __init__(self, add: str, relu: str, shortcut_after: bool = False, noop: bool = False):
        super().__init__()
        self.branch = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                                    nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6), *([nn.Identity()] if noop else []))
        self.shortcut = nn.Sequential(nn.Conv2d(6, 6, 1, bias=False), nn.BatchNorm2d(6))
        self.act = nn.ReLU(inplace=relu == "module-inplace")
        self.add, self.relu, self.shortcut_after = add, relu, shortcut_after

    def forward(self, x):
        if not self.shortcut_after:
            identity = self.shortcut(x)
        out = self.branch(x)
        if self.shortcut_after:
            identity = self.shortcut(x)
        if self.add == "iadd":
            out += identity
        elif self.add == "add_":
            out = out.add_(identity)
        elif self.add == "torch.add":
            out = torch.add(out, identity)
        else:
            out = identity + out
        if self.relu.startswith("module"):
            return self.act(out)
        return {"F.relu": F.relu, "torch.relu": torch.relu, "relu_": torch.relu_}[self.relu](out)


@pytest.mark.parametrize("add,relu", [("iadd", "module"), ("add_", "module-inplace"), ("torch.add", "F.relu"),
                                      ("plus-reversed", "torch.relu"), ("iadd", "relu_")])
def test_every_way_to_write_the_residual(add, relu):
    converted = check_converted(Block(add, relu), torch.randn(2, 6, 7, 5), leftover={})
    assert type(converted) is Block and isinstance(converted.forward, ResidualForward)
    # Either conv may carry the add (relu(a + b) is symmetric): the first operand's is tried first.
    carriers = [m for m in (converted.branch[3], converted.shortcut[0]) if m.residual_fused]
    assert len(carriers) == 1 and carriers[0].relu


def test_shortcut_after_the_conv_and_a_noop_before_the_add():
    check_converted(Block("iadd", "module", shortcut_after=True, noop=True), torch.randn(2, 6, 5, 5), leftover={})


class SqueezeExcite(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.fc = nn.Conv2d(c, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc(x.mean((2, 3), keepdim=True)))


class SEBlock(TextbookBlock):
    def __init__(self):
        super().__init__(6, 6)
        self.se = SqueezeExcite(6)

    def forward(self, x):
        out = self.se(self.conv2(self.conv1(x)))
        out += x
        return self.relu(out)


class ModeDependent(TextbookBlock):
    def forward(self, x):
        out = self.conv2(self.conv1(x))
        if self.training:
            out = out * 1.0
        out += x
        return self.relu(out)


class HookedRelu(TextbookBlock):
    def __init__(self):
        super().__init__(6, 6)
        self.relu.register_forward_hook(lambda m, a, out: out * 2)


@pytest.mark.parametrize("factory", [SEBlock, lambda: ModeDependent(6, 6), HookedRelu], ids=["se", "mode", "hook"])
def test_unfusible_residuals_stay_exact(factory):
    converted = check_converted(factory(), torch.randn(2, 6, 6, 7))
    assert "forward" not in converted.__dict__
    assert not converted.conv2[0].relu


class WritesConvInputBeforeAdd(TextbookBlock):
    """The fused call runs where the add was: a write into the conv's input in between must
    keep the residual unfused (the conv would read the written tensor)."""

    def __init__(self, how):
        super().__init__(6, 6)
        self.how = how
        self.act = nn.ReLU(inplace=True)
        self.truthy = nn.ReLU(1)  # in place: torch tests the flag for truth
        self.doubler = Doubler()

    def forward(self, x):
        y = self.conv1(x)
        out = self.conv2(y)
        if self.how == "iadd":
            y += x
        elif self.how == "method":
            y.mul_(2.0)
        elif self.how == "inplace-module":
            y = self.act(y)
        elif self.how == "truthy-inplace":
            y = self.truthy(y)
        elif self.how == "user-module":
            y = self.doubler(y)
        elif self.how == "out-kwarg":
            torch.mul(y, 2.0, out=y)
        else:
            torch.ops.aten.mul_.Tensor(y, y)
        out += y
        return self.relu(out)


class Doubler(nn.Module):
    """No ``inplace`` attribute, yet writes into its input."""

    def forward(self, t):
        return t.mul_(2.0)


class NumberResidual(TextbookBlock):
    def forward(self, x):
        return self.relu(self.conv2(self.conv1(x)) + x.size(1))


class AugmentedAssignments(TextbookBlock):
    """``+=`` on an int from the shape must not change the int's other uses; ``*=`` on a view and
    ``-=`` on the block input write into the caller's tensor as the original does; a
    per-channel residual broadcasts."""

    def forward(self, x):
        channels = x.shape[1]
        end = channels
        end += 1
        view = x[:, :2]
        view *= 2.0
        out = self.conv2(self.conv1(x))
        out += x.mean((2, 3), keepdim=True)
        out = self.relu(out)
        x -= 1.0
        return out * channels + end


WRITES = ["iadd", "method", "inplace-module", "truthy-inplace", "user-module", "out-kwarg", "aten-overload"]


@pytest.mark.parametrize("factory", [*(lambda how=how: WritesConvInputBeforeAdd(how) for how in WRITES),
                                     lambda: AugmentedAssignments(6, 6), lambda: NumberResidual(6, 6)],
                         ids=[*WRITES, "augmented", "number-residual"])
def test_in_place_writes_keep_their_meaning(factory):
    block = randomize_batch_norms(factory(), torch.Generator().manual_seed(5)).eval()
    converted = resnet_fused.convert(block, backend="cpu")
    # Only the broadcast and the number residuals fuse: their shape and type are checked at run
    # time, and these take the exact path.
    assert converted.conv2[0].relu == isinstance(block, (AugmentedAssignments, NumberResidual))
    x = torch.randn(2, 6, 5, 7)
    x_original, x_converted = x.clone(), x.clone()
    with torch.no_grad():
        expected, out = block(x_original), converted(x_converted)
    assert max_rel_error(out, expected) < 1e-5
    assert torch.equal(x_converted, x_original)  # the caller's input, written the same way


class AssignsAttributes(TextbookBlock):
    def __init__(self):
        super().__init__(6, 6)
        self.calls, self.features = 0, None

    def forward(self, x):
        self.calls += 1
        out = self.conv2(self.conv1(x))
        self.features = out
        out += x
        return self.relu(out)


def test_forward_that_assigns_attributes_is_left_alone_and_untouched():
    """Generated code would drop ``self.features = out`` and ``self.calls += 1``, and tracing
    ran them with Proxies: the block is left as it was, and neither convert nor the report
    leaves a trace of tracing in it."""
    block = randomize_batch_norms(AssignsAttributes(), torch.Generator().manual_seed(6)).eval()
    converted, report = resnet_fused.convert(block, backend="cpu", report=True)
    assert "forward" not in converted.__dict__ and (converted.calls, converted.features) == (0, None)
    assert report.residuals_fused == 0
    x = torch.randn(2, 6, 5, 4)
    with torch.no_grad():
        assert max_rel_error(converted(x), block(x)) < 1e-5
    assert converted.calls == 1 and max_rel_error(converted.features, block.features) < 1e-5


class Thrice(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(self.inner(self.inner(x)))


def test_nested_shortcut_modules_are_traced_once_each(monkeypatch):
    """Deciding that a user's shortcut module writes nothing traces each module once per mode,
    not once per call (5 levels of modules calling their child 3 times: 3**5 calls)."""
    shortcut = nn.Identity()
    for _ in range(5):
        shortcut = Thrice(shortcut)
    block = Block("+", "module")
    block.shortcut, block.shortcut_after = shortcut, True
    traces = []
    real = SequentialsTraced.trace
    monkeypatch.setattr(SequentialsTraced, "trace", lambda self, root, *a, **k: traces.append(root) or real(self, root, *a, **k))
    converted = resnet_fused.convert(block.eval(), backend="cpu")
    assert converted.branch[3].relu and len(traces) < 30, len(traces)


def test_textbook_resnet_has_no_leftover_ops(backend):
    x = torch.randn(2, 3, 9, 8)
    converted = check_converted(textbook_resnet(), x, backend=backend, leftover={})
    converted.train()
    converted(x).sum().backward()  # trains through the rewritten forward
    assert all(p.grad is not None for p in converted.parameters())


def test_block_survives_pickle_deepcopy_and_devices_moves():
    model = randomize_batch_norms(textbook_resnet(), torch.Generator().manual_seed(1)).eval()
    converted = resnet_fused.convert(model, backend="cpu")
    x = torch.randn(2, 3, 9, 8)
    with torch.no_grad():
        expected = model(x)
        for other in (pickle_round_trip(converted), copy.deepcopy(converted), converted.to("cpu").float()):
            with CountOps() as ops:
                assert max_rel_error(other(x), expected) < 1e-5
            assert ops.leftover() == {}
            assert isinstance(other[3], TextbookBlock)
    # checkpoints load both ways
    converted.load_state_dict(model.state_dict())
    model.load_state_dict(converted.state_dict())


def test_compiles_in_one_graph():
    converted = resnet_fused.convert(randomize_batch_norms(textbook_resnet()).eval(), backend="cpu")
    compiled = torch.compile(converted, backend="aot_eager", fullgraph=True)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        assert max_rel_error(compiled(x), converted(x)) < 1e-6


TORCHVISION = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
               "resnext101_32x8d", "wide_resnet50_2"]


@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_families(name):
    torch.manual_seed(2)
    check_converted(getattr(torchvision.models, name)(), torch.randn(1, 3, 35, 33), leftover={}, tol=1e-4)


def test_resnext_grouped_convs_run_in_the_triton_kernel():
    """resnext50_32x4d's blocks (32 groups of 4 to 32 channels) one per stage: every conv, the
    grouped ones included, is a Triton conv_bn_act launch; no ATen convolution, BatchNorm, add or
    ReLU runs."""
    torch.manual_seed(4)
    model = torchvision.models.resnet.ResNet(torchvision.models.resnet.Bottleneck, [1, 1, 1, 1], groups=32,
                                             width_per_group=4)
    converted = check_converted(model, torch.randn(1, 3, 27, 25), backend="triton", leftover={}, tol=1e-4,
                                counts=(counts := Counter()))
    assert counts["conv_bn_act_triton"] == 17 and counts["convolution"] == 0, counts


@pytest.mark.parametrize("name,leftover", [
    ("resnet50", {}), ("resnet26d", {}), ("resnet50d", {}),
    # The SE module sits between bn3 and the add in all 16 blocks: those adds and ReLUs stay;
    # the other ReLUs left are the SE modules' own. (In the 4 projection blocks the add could
    # ride in the shortcut conv, but timm writes ``x += shortcut``, which mutates the SE output
    # and keeps its dtype; a fused conv would return a new tensor in its own dtype.)
    ("seresnet50", {"add_": 16, "relu_": 32}),
])
def test_timm_families(name, leftover):
    timm = pytest.importorskip("timm")
    torch.manual_seed(3)
    check_converted(timm.create_model(name), torch.randn(1, 3, 35, 33), leftover=leftover, tol=1e-4)


def test_report_names_what_stays_and_why():
    timm = pytest.importorskip("timm")
    _, report = resnet_fused.convert(timm.create_model("seresnet50").eval(), backend="cpu", report=True)
    assert (report.convs_fused, report.residuals_fused) == (53, 0)
    text = str(report)
    assert "SEModule between the BatchNorm and the residual add" in text
    assert "the add writes into the other operand in place (x += conv output): add + ReLU stay: layer1.0.downsample.0" in text
    assert len(text.splitlines()) < 25  # one screen

    _, report = resnet_fused.convert(WritesConvInputBeforeAdd("method"), backend="cpu", report=True)
    assert "something between the conv and the add may write in place: add + ReLU stay: conv2.0" in str(report)

    _, report = resnet_fused.convert(textbook_resnet(), backend="cpu", report=True)
    assert (report.convs_fused, report.activations_fused, report.residuals_fused, report.unfused) == (9, {"ReLU": 4}, 3, [])
    assert "nothing left unfused" in str(report)

    class SubclassedBatchNorm2d(nn.BatchNorm2d):
        pass

    _, report = resnet_fused.convert(torchvision.models.resnet18(norm_layer=SubclassedBatchNorm2d), backend="cpu",
                                     report=True)
    assert report.convs_fused == 0
    assert "SubclassedBatchNorm2d not a plain nn.BatchNorm2d" in str(report)


def test_partly_frozen_half_and_ddp(tmp_path):
    """requires_grad_(False) on part of a rewritten model, .half(), and DDP wrapping."""
    converted = resnet_fused.convert(textbook_resnet(), backend="cpu").train()
    converted[3].requires_grad_(False)
    converted(torch.randn(2, 3, 8, 8)).sum().backward()
    assert converted[3].conv1[0].weight.grad is None and converted[0].weight.grad is not None
    half = copy.deepcopy(converted).eval().half()
    assert isinstance(half[3].forward, ResidualForward)
    assert all(m.weight.dtype == torch.float16 for m in half.modules() if isinstance(m, FusedConv2d))

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = randomize_batch_norms(textbook_resnet(), torch.Generator().manual_seed(4)).train()
        ddp = nn.parallel.DistributedDataParallel(resnet_fused.convert(model, backend="cpu"))
        x = torch.randn(3, 3, 8, 8)
        out = ddp(x)
        expected = model(x)
        assert max_rel_error(out, expected) < 1e-5
        out.sum().backward()
        expected.sum().backward()
        assert max_rel_error(ddp.module[0].weight.grad, model[0].weight.grad) < 1e-4
    finally:
        dist.destroy_process_group()


class OptionalShortcut(nn.Module):
    """timm's DLA blocks: ``forward(x, shortcut=None)``. fx traces the default only, so a rewrite
    would bake ``shortcut = x`` into every call, also one that passes its own shortcut."""

    def __init__(self, c=4):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.relu = nn.ReLU()

    def forward(self, x, shortcut=None):
        if shortcut is None:
            shortcut = x
        return self.relu(self.bn(self.conv(x)) + shortcut)


class CallsWithShortcut(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = OptionalShortcut()

    def forward(self, x):
        return self.block(x, torch.zeros_like(x))


def test_a_forward_with_optional_arguments_is_never_rewritten():
    model = randomize_batch_norms(CallsWithShortcut()).eval()
    converted = resnet_fused.convert(model, backend="reference")
    assert "forward" not in converted.block.__dict__
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        assert max_rel_error(converted(x), model(x)) < 1e-6
        assert max_rel_error(converted.block(x), model.block(x)) < 1e-6


class CachingBlock(TextbookBlock):
    """Caches a tensor derived from a parameter per device in a dict, as timm's efficientvit_msra
    attention caches its biases: tracing ran the forward with Proxies and left one in the cache,
    and the converted model then failed to deepcopy or pickle."""

    def __init__(self):
        super().__init__(6, 6)
        self.gain = nn.Parameter(torch.rand(6, 1, 1) + 0.5)
        self.cache = {}

    def forward(self, x):
        key = str(x.device)
        if key not in self.cache:
            self.cache[key] = self.gain.detach() * 2.0
        out = self.conv2(self.conv1(x)) * self.cache[key]
        out += x
        return self.relu(out)


def test_forward_that_writes_into_module_containers_is_left_alone_and_untouched():
    block = randomize_batch_norms(CachingBlock(), torch.Generator().manual_seed(9)).eval()
    converted, report = resnet_fused.convert(block, backend="cpu", report=True)
    assert converted.cache == {}  # nothing tracing wrote is left
    # The Sequentials' own chains fuse; the block's forward, which writes its cache, is kept.
    assert converted.conv1[0].relu and "forward" not in converted.__dict__ and report.residuals_fused == 0
    x = torch.randn(2, 6, 5, 4)
    with torch.no_grad():
        assert max_rel_error(converted(x), block(x)) < 1e-6
        for other in (copy.deepcopy(converted), pickle_round_trip(converted)):
            assert max_rel_error(other(x), block(x)) < 1e-6


@pytest.mark.parametrize("restore", ["deepcopy", "pickle"])
def test_a_hook_added_after_convert_unfuses_the_copied_block_instead_of_failing(restore):
    """A copied or loaded block redoes its rewrite on its first call; a hook added since
    convert (here on the final ReLU, as the zoo's BatchNorm counter hooked timm's RepGhostModule)
    makes the pass refuse. The block then runs its class forward with the residual unfused --
    same answer, the hook fires -- where it raised RuntimeError."""
    block = randomize_batch_norms(TextbookBlock(6, 6), torch.Generator().manual_seed(2)).eval()
    converted, report = resnet_fused.convert(block, backend="cpu", report=True)
    assert report.residuals_fused == 1
    other = copy.deepcopy(converted) if restore == "deepcopy" else pickle_round_trip(converted)
    calls = []
    other.relu.register_forward_hook(lambda *_: calls.append(1))
    x = torch.randn(2, 6, 7, 5)
    with torch.no_grad(), pytest.warns(UserWarning, match="residual fusion of a TextbookBlock could not be redone"):
        out = other(x)
    with torch.no_grad():
        assert max_rel_error(out, block(x)) < 1e-6 and calls == [1]
        assert max_rel_error(other(x), block(x)) < 1e-6 and calls == [1, 1]
    assert "forward" not in other.__dict__ and not other.conv2[0].residual_fused and not other.conv2[0].relu


class ActivatedConvBlock(nn.Module):
    """relu(silu(bn(conv(x))) + x), conv + BN + SiLU one FusedConv2d built before convert."""

    def __init__(self):
        super().__init__()
        self.bn = FoldedBatchNorm2d(nn.BatchNorm2d(6))
        self.conv = FusedConv2d(nn.Conv2d(6, 6, 3, padding=1), self.bn, act=nn.SiLU(), backend="cpu")
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)) + x)


def test_a_conv_with_another_activation_keeps_it_and_its_add_stays():
    """The residual rewrite takes only convs that apply no activation: it sets ReLU, which would
    replace the SiLU here."""
    converted = check_converted(ActivatedConvBlock(), torch.randn(2, 6, 7, 5))
    assert converted.conv.act == Activation(Kind.SILU) and not converted.conv.residual_fused
