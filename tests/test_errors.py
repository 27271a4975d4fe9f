"""Bad input gets a clear error naming the problem, from every entry point and backend (the
``backend`` argument: every fused backend that runs here, see conftest)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import resnet_fused
from helpers import act_args
from resnet_fused import backends


def operands(c=4, k=5):
    """input, weight, running_mean, running_var"""
    return torch.randn(2, c, 6, 6), torch.randn(k, c, 3, 3), torch.randn(k), torch.rand(k) + 0.5


def test_wrong_channel_count(backend):
    x, w, mean, var = operands()
    with pytest.raises(ValueError, match="expected input with 4 channels.*got 3"):
        resnet_fused.conv_bn_act(x[:, :3], w, mean, var, backend=backend)


def test_bad_group_counts(backend):
    x, _, mean, var = operands(c=6)
    with pytest.raises(ValueError, match="groups=4 must be a positive int dividing"):
        resnet_fused.conv_bn_act(x, torch.randn(4, 1, 3, 3), mean[:4], var[:4], groups=4, backend=backend)
    with pytest.raises(ValueError, match="groups=3 needs at least 3 output channels"):
        resnet_fused.conv_bn_act(x, torch.randn(0, 2, 3, 3), mean[:0], var[:0], groups=3, backend=backend)


def test_three_dimensional_input(backend):
    x, w, mean, var = operands()
    with pytest.raises(ValueError, match="input must be 4-D.*got 3-D"):
        resnet_fused.conv_bn_act(x[0], w, mean, var, backend=backend)


def test_integer_input(backend):
    x, w, mean, var = operands()
    with pytest.raises(TypeError, match="input dtype torch.int64 is not supported"):
        resnet_fused.conv_bn_act(x.long(), w.long(), mean, var, backend=backend)


def test_mismatched_dtypes(backend):
    x, w, mean, var = operands()
    with pytest.raises(TypeError, match="input dtype torch.float16 does not match weight dtype torch.float32"):
        resnet_fused.conv_bn_act(x.half(), w, mean, var, backend=backend)


def test_mismatched_devices(backend):
    # "meta" stands in for a second device on a machine with one.
    x, w, mean, var = operands()
    with pytest.raises(ValueError, match="weight is on meta but input is on cpu"):
        resnet_fused.conv_bn_act(x, w.to("meta"), mean, var, backend=backend)


def test_bad_residual_and_per_channel_shapes(backend):
    x, w, mean, var = operands()
    with pytest.raises(ValueError, match=r"residual shape \(2, 5, 5, 5\) != output shape \(2, 5, 4, 4\)"):
        resnet_fused.conv_bn_act(x, w, mean, var, residual=torch.randn(2, 5, 5, 5), backend=backend)
    with pytest.raises(ValueError, match="running_var must be a 1-D float tensor of 5 channels"):
        resnet_fused.conv_bn_act(x, w, mean, var[:4], backend=backend)
    with pytest.raises(ValueError, match="eps must be a non-negative number"):
        resnet_fused.conv_bn_act(x, w, mean, var, eps=-1.0, backend=backend)


def test_kernel_larger_than_input():
    x, w, mean, var = operands()
    with pytest.raises(ValueError, match="too small for kernel"):
        resnet_fused.conv_bn_act(x[:, :, :2, :2], w, mean, var, backend="cpu")


def test_cpp_op_checks_its_own_arguments():
    """Direct callers of torch.ops.resnet_fused.conv_bn_act bypass the Python checks."""
    x, w, mean, var = operands()
    op = torch.ops.resnet_fused.conv_bn_act
    with pytest.raises(RuntimeError, match="expected input with 4 channels"):
        op(x[:, :3], w, None, None, None, mean, var, 1e-5, None, [1, 1], [0, 0], [1, 1], 1, *act_args(True))
    with pytest.raises(RuntimeError, match="input must be a 4-D"):
        op(x[0], w, None, None, None, mean, var, 1e-5, None, [1, 1], [0, 0], [1, 1], 1, *act_args(True))
    with pytest.raises(RuntimeError, match="eps must be non-negative"):
        op(x, w, None, None, None, mean, var, -1.0, None, [1, 1], [0, 0], [1, 1], 1, *act_args(True))


def test_unknown_and_unavailable_backends():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        resnet_fused.convert(model, backend="tpu")
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run a tensor on cpu"):
        backends.resolve("cuda", torch.device("cpu"))


def test_converted_model_reports_channel_mismatch():
    model = resnet_fused.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval(), backend="cpu")
    with torch.no_grad(), pytest.raises(ValueError, match="expected input with 3 channels"):
        model(torch.randn(1, 5, 8, 8))


def test_converted_model_reports_dtype_mismatch():
    model = resnet_fused.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval(), backend="cpu")
    with torch.no_grad(), pytest.raises(TypeError, match="does not match weight dtype"):
        model(torch.randn(1, 3, 8, 8, dtype=torch.bfloat16))


def test_convert_rejects_non_modules():
    with pytest.raises(TypeError, match="convert expects an nn.Module"):
        resnet_fused.convert("resnet18")
