"""The sm80 CUTLASS kernels' BN-scaled filter (csrc/epilogue.h), computed on the CPU.

The sm80 kernels multiply the BN scale into a 16-bit copy of the filter, w * scale[k]. A channel
with a tiny running variance has a large scale, and the product can pass float16's 65504: inf, and
0 * inf = NaN where a dead input channel meets it, while eager PyTorch (conv, then BN in fp32)
stays finite. The copy therefore holds w * scale[k] * 2^-e with the smallest e that keeps it finite,
and the epilogue multiplies the fp32 accumulators by 2^e. ``_C.cuda_sm80_scaled_filter`` runs the
functions of epilogue.h that the CUDA op's filter passes run; the tests here rebuild the kernel's
output from it in float64 and hold it to the low-precision rule. ops/test_conv_bn_act.py runs the
same case (cases.tiny_variance_case) through the CUDA op.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cases import tiny_variance_case
from helpers import assert_low_precision_close
from resnet_fused import _extension
from resnet_fused.ops import reference

pytestmark = pytest.mark.skipif(not _extension.has_cpu_ops(), reason=f"extension not built: {_extension.LOAD_ERROR}")

if _extension.has_cpu_ops():
    from resnet_fused import _C

EPS = 1e-5  # nn.BatchNorm2d's default


def bn_scale_shift(bn: dict, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """bn_fold (epilogue.h) in fp32: scale = gamma / sqrt(var + eps), shift = beta - mean * scale."""
    scale = bn["bn_weight"].float() / torch.sqrt(bn["running_var"].float() + eps)
    return scale, bn["bn_bias"].float() - bn["running_mean"].float() * scale


def scaled_filter(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    """The kernel's filter, (K, C, R, S) float64 holding the 16-bit values, and its exponent e."""
    k, c, r, s = weight.shape
    krsc = weight.float().permute(0, 2, 3, 1).reshape(-1).tolist()
    out = _C.cuda_sm80_scaled_filter(krsc, scale.tolist(), str(dtype).removeprefix("torch."))
    values = torch.tensor(out["values"], dtype=torch.float64).view(k, r, s, c).permute(0, 3, 1, 2)
    return values, out["exponent"]


def sm80_output(x, filt, exponent, shift, dtype, relu=True, **conv_args):
    """act(conv(x, filter) * 2^e + shift), the sm80 epilogue, in float64 (the GPU accumulates in
    fp32), rounded to dtype once at the end as the kernel's store does."""
    acc = F.conv2d(x.double(), filt, **conv_args)
    out = acc * 2.0**exponent + shift.double()[None, :, None, None]
    return (out.clamp_min(0) if relu else out).to(dtype)


def test_tiny_running_variance_stays_finite_and_accurate():
    x, weight, bn = tiny_variance_case()
    dtype = torch.float16
    scale, shift = bn_scale_shift(bn, EPS)
    conv_args = dict(padding=1)
    x16, w16 = x.to(dtype), weight.to(dtype)

    # The hazard is real: w * scale in float16 is inf, and the dead channel makes it NaN.
    naive = (w16.float() * scale[:, None, None, None]).to(dtype)
    assert torch.isinf(naive[0]).any()
    assert torch.isnan(sm80_output(x16, naive.double(), 0, shift, dtype, **conv_args)).any()

    filt, e = scaled_filter(w16, scale, dtype)
    assert e == 1  # max |w * scale| ~8e4: one halving fits it under 65504
    assert torch.isfinite(filt).all()
    out = sm80_output(x16, filt, e, shift, dtype, **conv_args)

    exact = reference.conv_bn_act(x16.double(), w16.double(), None, *(t.double() for t in bn.values()), eps=EPS,
                                  **conv_args)
    unfused = reference.conv_bn_act(x16, w16, None, *bn.values(), eps=EPS, **conv_args)
    assert torch.isfinite(unfused).all()
    assert torch.isfinite(out).all()
    assert_low_precision_close(out, unfused, exact)


def test_ordinary_filters_are_unchanged():
    """e = 0 for every filter without the hazard, and each value is w * scale rounded as before
    (fp32 product, then the cast), so the usual case keeps its arithmetic bit for bit."""
    x, weight, bn = tiny_variance_case()
    bn["running_var"][0] = 0.7
    weight[0, 0] = 0.3
    for dtype in (torch.float16, torch.bfloat16):
        w = weight.to(dtype)
        scale, _ = bn_scale_shift(bn, EPS)
        filt, e = scaled_filter(w, scale, dtype)
        assert e == 0
        expected = (w.float() * scale[:, None, None, None]).to(dtype).double()
        assert torch.equal(filt, expected)


def test_bfloat16_range_needs_no_exponent():
    # bfloat16 reaches ~3.4e38: the same tiny-variance filter fits as it is.
    _, weight, bn = tiny_variance_case()
    scale, _ = bn_scale_shift(bn, EPS)
    filt, e = scaled_filter(weight.to(torch.bfloat16), scale, torch.bfloat16)
    assert e == 0 and torch.isfinite(filt).all()


def test_exponent_edges():
    half_max = torch.finfo(torch.float16).max
    assert _C.cuda_sm80_scaled_filter([half_max], [1.0])["exponent"] == 0
    assert _C.cuda_sm80_scaled_filter([half_max], [1.0001])["exponent"] == 1
    assert _C.cuda_sm80_scaled_filter([3e38], [1.0])["exponent"] == 112  # 3e38 * 2^-112 ~ 57780
    # var + eps == 0 gives scale inf: no exponent helps, and the result is non-finite as eager's.
    out = _C.cuda_sm80_scaled_filter([1.0, 0.0], [math.inf])
    assert out["exponent"] == 0 and math.isinf(out["values"][0]) and math.isnan(out["values"][1])
    assert _C.cuda_sm80_scaled_filter([1.0, math.nan], [2.0])["exponent"] == 0


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="dtype must be float16 or bfloat16"):
        _C.cuda_sm80_scaled_filter([1.0], [1.0], "float32")
    with pytest.raises(ValueError, match="weight must hold len\\(scale\\) = 2 equal rows"):
        _C.cuda_sm80_scaled_filter([1.0, 2.0, 3.0], [1.0, 1.0])
