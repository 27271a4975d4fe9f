"""A torchvision detector with the frozen-BatchNorm ResNet backbone detection fine-tuning uses
(torchvision builds it so whenever backbone weights are loaded): ``convert`` fuses the whole
backbone, and eval detections and training losses agree with the original by the project's
rule (fused error against float64 at most 2x the original fp32 model's)."""

from __future__ import annotations

import copy

import pytest
import torch
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops import FrozenBatchNorm2d

import resnet_fused
from helpers import CountOps, max_rel_error
from resnet_fused import _extension
from resnet_fused.bench.zoo import randomize_batch_norms

pytestmark = pytest.mark.skipif(not _extension.has_cpu_ops(), reason=f"extension not built: {_extension.LOAD_ERROR}")


def _detector() -> FasterRCNN:
    torch.manual_seed(0)
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, norm_layer=FrozenBatchNorm2d,
                                   trainable_layers=3)
    # Few proposals: with torchvision's 1000 per image its 12544 x 1024 box head dominates the
    # test's time, and the box head has nothing to fuse.
    model = FasterRCNN(backbone, num_classes=4, min_size=96, max_size=96, rpn_pre_nms_top_n_train=200,
                       rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_train=40, rpn_post_nms_top_n_test=40,
                       box_batch_size_per_image=32)
    return randomize_batch_norms(model, torch.Generator().manual_seed(1))


def _images(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, 90, 75, generator=g), torch.rand(3, 67, 96, generator=g)]


def _within_rule(fused: torch.Tensor, original: torch.Tensor, exact: torch.Tensor) -> bool:
    exact = exact.double()
    floor = torch.finfo(torch.float32).eps * exact.abs().max().item()
    return (fused.double() - exact).abs().max().item() <= 2 * (original.double() - exact).abs().max().item() + floor


def test_the_whole_backbone_is_fused_and_the_features_match():
    model = _detector().eval()
    converted, report = resnet_fused.convert(model, backend="cpu", report=True)
    assert report.convs_fused == 20 and report.residuals_fused == 8
    assert not [name for name, _ in report.unfused if name.startswith("backbone.body")], report
    assert list(converted.state_dict()) == list(model.state_dict())
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), CountOps() as counter:
        features = converted.backbone(images)
    assert counter.counts["conv_bn_act"] == 20 and "rsqrt" not in counter.counts, counter.counts
    with torch.no_grad():
        expected = model.backbone(images)
    assert list(features) == list(expected)
    for key in expected:
        assert max_rel_error(features[key], expected[key]) < 1e-5, key


def test_eval_detections_agree_against_float64():
    model = _detector().eval()
    converted = resnet_fused.convert(model, backend="cpu")
    exact = copy.deepcopy(model).double()
    images = _images(3)
    with torch.no_grad():
        original, fused = model(images), converted(images)
        reference = exact([x.double() for x in images])
    for o, f, e in zip(original, fused, reference):
        # Same boxes kept by the score threshold and NMS, in the same order, with the same labels.
        assert torch.equal(f["labels"], o["labels"]) and torch.equal(f["labels"], e["labels"])
        for key in ("boxes", "scores"):
            assert _within_rule(f[key], o[key], e[key]), key


def test_fine_tuning_losses_agree_against_float64():
    """Training forward with targets: the RPN and ROI heads' losses (their box sampling draws
    from torch's generator, reseeded before each model's call)."""
    model = _detector().train()
    converted = resnet_fused.convert(model, backend="cpu").train()
    exact = copy.deepcopy(model).double()
    images = _images(4)
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 50.0, 60.0], [30.0, 5.0, 70.0, 40.0]]),
                "labels": torch.tensor([1, 3])},
               {"boxes": torch.tensor([[5.0, 20.0, 45.0, 66.0]]), "labels": torch.tensor([2])}]
    losses = []
    for net, dtype in ((model, torch.float32), (converted, torch.float32), (exact, torch.float64)):
        torch.manual_seed(5)
        out = net([x.to(dtype) for x in images], [{**t, "boxes": t["boxes"].to(dtype)} for t in targets])
        losses.append(out)
    original, fused, reference = losses
    assert list(fused) == list(original)
    for key in original:
        assert _within_rule(fused[key].detach(), original[key].detach(), reference[key].detach()), key
    total = sum(fused.values())
    total.backward()  # gradients reach the trainable backbone layers through the fused convs
    assert converted.backbone.body.layer4[0].conv1.weight.grad is not None
