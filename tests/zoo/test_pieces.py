"""bench/pieces.py: the pieces a float32 run's piecewise functions took, imposed on its float64
reference (the zoo's training judge)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from resnet_fused import convert
from resnet_fused.bench import pieces
from resnet_fused.bench.zoo import randomize_batch_norms


class EveryPiecewise(nn.Module):
    """Each piecewise function pieces.py knows, called the ways models call them."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.pool = nn.MaxPool2d(3, 2, 1)

    def forward(self, x):
        x = F.relu(self.conv(x), inplace=True)
        x = self.pool(x) - 0.3
        a = torch.relu(x) + x.relu() + F.relu6(4 * x) + F.hardtanh(x, -0.2, 0.4) + F.leaky_relu(x, 0.1)
        b = F.hardswish(8 * x) + F.hardsigmoid(8 * x) + x.clamp(min=-0.1) + torch.clamp(x, -0.1, 0.2)
        c = x.clamp_max(0.1) + torch.clip(x, max=0.05) + F.adaptive_max_pool2d(x, 2).mean()
        d = (x * 1).relu_()
        return a + b + c + d


def _step(model, x, choices=None):
    x = x.clone().requires_grad_()
    with pieces.imposing(choices) if choices is not None else pieces.recording() as chosen:
        out = model(x)
    out.backward(torch.ones_like(out))
    return out.detach(), x.grad, chosen


def test_imposing_a_runs_own_pieces_changes_nothing():
    torch.manual_seed(0)
    model = EveryPiecewise().double()
    x = torch.randn(2, 3, 9, 7, dtype=torch.float64)
    out, grad, chosen = _step(model, x)
    assert [c.function for c in chosen] == [
        "relu", "max_pool", "relu", "relu", "bounded", "bounded", "leaky_relu", "hardswish", "hardsigmoid",
        "bounded", "bounded", "bounded", "bounded", "max_pool", "relu"]
    imposed_out, imposed_grad, _ = _step(model, x, chosen)
    # The pieces' formulas round as ATen's up to float64 ulps (hardswish: x(x + 3)/6), but for
    # hardsigmoid's derivative: ATen's float64 kernel multiplies by 1/6 rounded to float32.
    assert torch.allclose(imposed_out, out, rtol=1e-13, atol=1e-13)
    assert (imposed_grad - grad).abs().max() <= 1e-7 * grad.abs().max()


def test_imposed_pieces_decide_where_the_inputs_would_not():
    """Each element takes the recorded piece even where the imposing run's input lies on the other
    side of the jump: the gradient then follows the recorded piece."""
    x = torch.tensor([-1.0, -1e-9, 1e-9, 2.0], dtype=torch.float64)
    with pieces.recording() as chosen:
        F.relu(x)
        F.hardtanh(x, -1e-9 / 2, 1.0)
        F.max_pool2d(x.view(1, 1, 2, 2), 2)
    flipped = (-x).requires_grad_()
    with pieces.imposing(chosen):
        out = F.relu(flipped).sum() + F.hardtanh(flipped, -1e-9 / 2, 1.0).sum() + F.max_pool2d(flipped.view(1, 1, 2, 2), 2)
    out.sum().backward()
    # ReLU: the recorded mask [0, 0, 1, 1]; hardtanh: recorded pieces below, below, inside, above
    # (2 > 1); max pool: the recorded pick, element 3.
    assert flipped.grad.tolist() == [0.0 + 0 + 0, 0 + 0 + 0, 1 + 1 + 0, 1 + 0 + 1]


def test_a_fused_op_records_the_pieces_of_the_activation_it_absorbed():
    """The converted model's fused units record their activation's pieces from their outputs, in
    the order the original calls those activations: the original in float64 can take them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU6(), nn.MaxPool2d(2),
                          nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.LeakyReLU(0.2), nn.Conv2d(8, 4, 1),
                          nn.BatchNorm2d(4), nn.Hardswish(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.SiLU())
    model = randomize_batch_norms(model, torch.Generator().manual_seed(1))
    fused = convert(model, backend="reference").train()
    model.train()
    x = torch.randn(4, 3, 11, 9)
    _, _, from_original = _step(copy.deepcopy(model), x)
    _, _, from_fused = _step(copy.deepcopy(fused), x)
    assert [c.function for c in from_fused] == [c.function for c in from_original] == [
        "bounded", "max_pool", "leaky_relu", "hardswish"]
    for a, b in zip(from_fused, from_original):
        assert torch.equal(a.chosen, b.chosen)
    exact = copy.deepcopy(model).double()
    _step(exact, x.double(), from_fused)  # meets every choice, call for call


def test_choices_of_another_model_are_refused():
    x = torch.randn(2, 4)
    with pieces.recording() as chosen:
        F.relu(x)
    with pytest.raises(pieces.PieceMismatch, match="relu of shape"):
        with pieces.imposing(chosen):
            F.relu6(x)
    with pytest.raises(pieces.PieceMismatch, match="shape"):
        with pieces.imposing(chosen):
            F.relu(torch.randn(3, 4))
    with pytest.raises(pieces.PieceMismatch, match="1 of 1 recorded choices were not met"):
        with pieces.imposing(chosen):
            torch.sigmoid(x)
    with pytest.raises(pieces.PieceMismatch, match="past the 1 recorded"):
        with pieces.imposing(chosen):
            F.relu(x)
            F.relu(x)
