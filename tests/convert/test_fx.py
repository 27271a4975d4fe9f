"""Converted models under torch.fx (symbolic_trace, torchvision's create_feature_extractor),
torch.export and torch.func.functional_call: the fused modules stay single calls that run fused,
and the traced module computes what the original computes and keeps its state."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torchvision
from torch import fx
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import resnet_fused
from helpers import CountOps, max_rel_error, randomize_batch_norms, textbook_resnet
from resnet_fused import FoldedBatchNorm2d, FusedConv2d

BACKEND = "cpu"


def build(factory, seed):
    torch.manual_seed(seed)
    return randomize_batch_norms(factory(), torch.Generator().manual_seed(seed)).eval()


def fused_calls(module: torch.nn.Module) -> list[str]:
    """Names of the FusedConv2d modules a forward of ``module`` calls, in call order."""
    calls = []
    for name, m in module.named_modules():
        if isinstance(m, FusedConv2d):
            m.register_forward_pre_hook(lambda mod, args, name=name: calls.append(name))
    return calls


@pytest.mark.parametrize("factory", [textbook_resnet, torchvision.models.resnet18], ids=["textbook", "resnet18"])
def test_symbolic_trace_keeps_fused_calls_and_equals_the_original(factory):
    model = build(factory, 1)
    converted = resnet_fused.convert(model, backend=BACKEND)
    traced = fx.symbolic_trace(converted)
    targets = [type(traced.get_submodule(n.target)) for n in traced.graph.nodes if n.op == "call_module"]
    assert FusedConv2d in targets and torch.nn.BatchNorm2d not in targets
    # Every fused conv is one call whose result feeds only its folded BatchNorm (an identity
    # that keeps the BatchNorm's state in the GraphModule).
    for node in traced.graph.nodes:
        if node.op == "call_module" and isinstance(traced.get_submodule(node.target), FusedConv2d):
            (user,) = node.users
            assert isinstance(traced.get_submodule(user.target), FoldedBatchNorm2d)
    residual_calls = [n for n in traced.graph.nodes if n.op == "call_module" and "residual" in n.kwargs]
    assert len(residual_calls) == (3 if factory is textbook_resnet else 8)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad(), CountOps() as ops:
        out = traced(x)
    assert max_rel_error(out, model(x)) < 1e-5
    assert ops.counts["native_batch_norm"] + ops.counts["batch_norm"] == 0

    # Training mode: batch statistics (64x64, batch 4: layer4's 2x2 maps give each channel 16
    # values; 1x1 maps at batch 2 would be too ill-conditioned for fp32 itself), the running
    # statistics updated alike.
    x = torch.randn(4, 3, 64, 64)
    original_train, traced_train = copy.deepcopy(model).train(), copy.deepcopy(traced).train()
    assert max_rel_error(traced_train(x), original_train(x)) < 1e-4
    state = traced_train.state_dict()
    for key, value in original_train.state_dict().items():
        assert max_rel_error(state[key].float(), value.float()) < 1e-4, key


def test_traced_state_dict_is_the_traced_originals():
    model = build(torchvision.models.resnet18, 2)
    ours, theirs = fx.symbolic_trace(resnet_fused.convert(model, backend=BACKEND)), fx.symbolic_trace(model)
    a, b = ours.state_dict(), theirs.state_dict()
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in b)
    ours.load_state_dict(b)  # checkpoints load both ways
    theirs.load_state_dict(a)


@pytest.mark.parametrize("factory", [torchvision.models.resnet18, torchvision.models.resnet50], ids=["resnet18", "resnet50"])
def test_create_feature_extractor_runs_fused(factory):
    model = build(factory, 3)
    nodes = {"layer2": "c3", "layer4": "c5"}
    ours = create_feature_extractor(resnet_fused.convert(model, backend=BACKEND), nodes)
    theirs = create_feature_extractor(model, nodes)
    x = torch.randn(2, 3, 32, 32)
    calls = fused_calls(ours)
    with torch.inference_mode():
        with CountOps() as ops:
            features = ours.eval()(x)
        expected = theirs.eval()(x)
    assert features.keys() == expected.keys() == {"c3", "c5"}
    for key in features:
        assert max_rel_error(features[key], expected[key]) < 1e-4, key
    # Every conv ran fused; no BatchNorm ran on its own.
    assert len(calls) == sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    assert not [name for name in ops.counts if "batch_norm" in name], ops.counts

    ours.train(), theirs.train()
    x = torch.randn(4, 3, 64, 64)  # 2x2 maps in layer4 (see the symbolic_trace test)
    train_features, train_expected = ours(x), theirs(x)
    for key in train_features:
        assert max_rel_error(train_features[key], train_expected[key]) < 1e-4, key


def test_feature_names_of_the_fused_model():
    """Module-level names resolve as in the original. A fused call is named after its conv (its
    folded-BatchNorm node after it, ``<conv>_1``); the BatchNorm and ReLU outputs it absorbed
    are no longer nodes, so asking for them fails instead of returning another tensor."""
    model = build(torchvision.models.resnet18, 4)
    converted = resnet_fused.convert(model, backend=BACKEND)
    train_names, eval_names = get_graph_node_names(converted)
    assert train_names == eval_names
    assert {"layer2", "layer4", "fc"} <= {name.split(".")[0] for name in eval_names}
    assert {"layer1.0.conv1", "layer1.0.conv1_1", "layer2.0.downsample.0", "layer4.1.conv2"} <= set(eval_names)
    for fused_away in ("layer1.0.bn1", "layer1.0.relu"):
        assert fused_away in get_graph_node_names(model)[1] and fused_away not in eval_names
        with pytest.raises(ValueError, match=fused_away):
            create_feature_extractor(converted, [fused_away])


def test_export_in_eval():
    model = build(textbook_resnet, 6)
    converted = resnet_fused.convert(model, backend=BACKEND)
    x = torch.randn(2, 3, 16, 16)
    exported = torch.export.export(converted, (x,))
    with torch.no_grad():
        assert max_rel_error(exported.module()(x), model(x)) < 1e-5
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert not any("batch_norm" in t for t in targets), targets


def test_functional_call_reads_the_given_batch_norm_state():
    model = build(torchvision.models.resnet18, 7)
    converted = resnet_fused.convert(model, backend=BACKEND)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["layer1.0.bn2.running_var"] *= 4.0
    state["bn1.bias"] += 0.5
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = torch.func.functional_call(model, state, (x,))
        out = torch.func.functional_call(converted, state, (x,))
        assert max_rel_error(out, expected) < 1e-4
        assert max_rel_error(converted(x), model(x)) < 1e-4  # the module's own state is back
        assert max_rel_error(out, model(x)) > 1e-2  # (the changed state mattered)


def test_traced_model_survives_deepcopy_and_pickle():
    model = build(torchvision.models.resnet18, 8)
    traced = fx.symbolic_trace(resnet_fused.convert(model, backend=BACKEND))
    x = torch.randn(1, 3, 32, 32)
    buffer = io.BytesIO()
    torch.save(traced, buffer)
    buffer.seek(0)
    with torch.no_grad():
        expected = model(x)
        for other in (copy.deepcopy(traced), torch.load(buffer, weights_only=False)):
            assert list(other.state_dict()) == list(traced.state_dict())
            assert max_rel_error(other(x), expected) < 1e-4
            # The copy's fused convs read the copy's BatchNorms, not the traced module's.
            other.get_submodule("layer1.0.bn1").running_mean += 1.0
            assert max_rel_error(other(x), expected) > 1e-3
            assert max_rel_error(traced(x), expected) < 1e-4


def test_a_fused_conv_cannot_be_the_trace_root():
    conv, _ = resnet_fused.nn.fuse_conv_bn(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), True, BACKEND)
    with pytest.raises(RuntimeError, match="root"):
        fx.symbolic_trace(conv)
