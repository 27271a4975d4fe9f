"""GPU checks of the fused training unit (Triton and CUDA kernels compiled for the device):
outputs, gradients and running statistics against fp64, by the low-precision rule. Marked
``gpu``: skipped without CUDA or under TRITON_INTERPRET=1 (see conftest)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet50

import resnet_fused
from helpers import assert_low_precision_close, max_rel_error, randomize_batch_norms
from resnet_fused.nn import fuse_conv_bn

pytestmark = pytest.mark.gpu

# (N, C, H, W, K, kernel, stride, padding): ResNet-50 shapes at a small batch, plus odd sizes.
SHAPES = {
    "stem": (2, 3, 40, 40, 64, 7, 2, 3),
    "3x3-64": (4, 64, 20, 20, 64, 3, 1, 1),
    "1x1-256-64": (4, 256, 14, 14, 64, 1, 1, 0),
    "3x3-128-stride2": (2, 128, 15, 15, 128, 3, 2, 1),
    "odd": (3, 5, 9, 7, 67, 3, 1, 1),
}


class Unit(nn.Module):
    """relu(bn(conv(x)) [+ residual]); fused with ``backend``, else the unfused modules."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, backend: str | None = None):
        super().__init__()
        if backend is not None:
            conv, bn = fuse_conv_bn(conv, bn, relu=True, backend=backend)
        self.conv, self.bn, self.fused = conv, bn, backend is not None

    def forward(self, x, residual=None):
        if self.fused:
            return self.conv(x, residual=residual)
        y = self.bn(self.conv(x))
        return torch.relu(y if residual is None else y + residual)


def unit(name, residual: bool, frozen: bool = False):
    """Fresh modules (randomized BN) and operands on the GPU; ``make(backend)`` builds a Unit."""
    n, c, h, w, k, ks, stride, padding = SHAPES[name]
    torch.manual_seed(3)
    conv = nn.Conv2d(c, k, ks, stride, padding, bias=False).cuda()
    bn = randomize_batch_norms(nn.Sequential(nn.BatchNorm2d(k)), torch.Generator().manual_seed(3))[0].cuda()
    bn.train(not frozen)
    x = torch.randn(n, c, h, w, device="cuda")
    res = torch.randn(conv(x).shape, device="cuda") if residual else None

    def make(backend=None):
        return Unit(copy.deepcopy(conv), copy.deepcopy(bn), backend)

    return make, x, res


def run(model, x, residual, grad):
    x = x.clone().requires_grad_()
    residual = None if residual is None else residual.clone().requires_grad_()
    out = model(x, residual)
    out.backward(grad.to(out.dtype))
    grads = [x.grad, *(p.grad for p in model.parameters()), *([residual.grad] if residual is not None else [])]
    return out, grads, [b.clone() for b in model.buffers()]


@pytest.mark.parametrize("frozen", [False, True], ids=["train", "frozen-bn"])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", SHAPES)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_unit_matches_fp64(backend, name, dtype, residual, frozen):
    make, x, res = unit(name, residual, frozen)
    grad = torch.randn(make().conv(x).shape, device="cuda")
    cast = lambda t, d: None if t is None else t.to(d)  # noqa: E731
    results = [run(make(b).to(d), x.to(d), cast(res, d), grad)
               for b, d in ((backend, dtype), (None, dtype), (None, torch.float64))]
    (out_f, grads_f, bufs_f), (out_u, grads_u, bufs_u), (out_e, grads_e, bufs_e) = results
    assert_low_precision_close(out_f, out_u, out_e)
    for gf, gu, ge in zip(grads_f, grads_u, grads_e):
        assert_low_precision_close(gf, gu, ge)
    for bf, bu, be in zip(bufs_f, bufs_u, bufs_e):
        if be.is_floating_point():  # running statistics
            assert (bf.double() - be).abs().max() <= 2 * (bu.double() - be).abs().max() + 1e-3 * be.abs().max()


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_unit_fp32_ieee(backend):
    torch.backends.cudnn.allow_tf32 = False
    try:
        make, x, res = unit("3x3-64", True)
        grad = torch.randn(make().conv(x).shape, device="cuda")
        out_f, grads_f, _ = run(make(backend), x, res, grad)
        out_e, grads_e, _ = run(make().double(), x.double(), res.double(), grad)
        assert max_rel_error(out_f, out_e) < 1e-5
        for gf, ge in zip(grads_f, grads_e):
            assert max_rel_error(gf, ge) < 1e-4
    finally:
        torch.backends.cudnn.allow_tf32 = True


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_resnet50_amp_training_steps(backend):
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
