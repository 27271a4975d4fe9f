"""The ``triton`` backend: ``implicit_gemm`` (the convolution mainloop every conv kernel
shares), ``conv_bn_act`` (inference: conv + BN + residual + activation in one launch),
``conv_bn_stats`` (training: conv + batch-statistics epilogue) and ``bn_act`` (the training
unit's apply, backward and running-statistics kernels).

The two entry points import the kernel files on first use, so ``import resnet_fused`` and the
C++ backends never import Triton."""

from __future__ import annotations

from .. import reference
from ..kernels import Kernels


def inference(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps, residual, stride, padding,
              dilation, groups, act, act_a, act_b, allow_tf32):
    from .conv_bn_act import conv_bn_act_triton

    return conv_bn_act_triton(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, float(eps), residual, stride,
                              padding, dilation, groups, act, act_a, act_b, allow_tf32)


def kernels():
    from .bn_act import (bn_act_apply_triton, bn_act_backward_apply_triton, bn_act_backward_reduce_triton,
                         bn_update_running_stats_triton_)
    from .conv_bn_stats import conv_bn_stats_triton

    # A BatchNorm that no conv feeds takes its statistics from ATen's var_mean (one Welford
    # pass over y, as a stats kernel of ours would make); the conv's own come from its epilogue.
    return Kernels(conv_bn_stats_triton, bn_act_apply_triton, bn_act_backward_reduce_triton,
                   bn_act_backward_apply_triton, bn_update_running_stats_triton_, reference.bn_stats)
