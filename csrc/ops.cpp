// Every resnet_fused op's schema, in one place, and nothing else. Kernels
// register per device in csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu; the fake
// (meta) kernels for torch.compile are registered from Python with
// torch.library.register_fake; the Python module itself (build info, CUTLASS
// plan inspection) is bindings.cpp.
#include <torch/library.h>

TORCH_LIBRARY(resnet_fused, m) {
  // Eval-mode Conv2d -> BatchNorm2d [-> + residual] -> activation in one op:
  //   out = act(conv2d(input, weight) * scale[k] + shift[k] [+ residual])
  //   scale = bn_weight / sqrt(running_var + eps), shift = bn_bias + (bias - running_mean) * scale
  // computed from the raw tensors on every call (nothing is folded or cached, so
  // nothing goes stale). bias is the conv's; bn_weight/bn_bias None mean 1/0.
  // Per-channel tensors: (K,), any floating dtype. residual: the output's shape,
  // input's dtype. The output keeps input's memory format.
  // The activation, in this op and the ones below, is (act, act_a, act_b):
  // the code of epilogue.h's ActKind (resnet_fused.ops.activation.Kind: 0
  // identity, 1 ReLU, 2 Hardtanh(act_a, act_b), 3 LeakyReLU(act_a), 4 SiLU,
  // 5 Hardswish) and its parameters; an unknown code is an error.
  m.def(
      "conv_bn_act(Tensor input, Tensor weight, Tensor? bias, Tensor? bn_weight, Tensor? bn_bias, "
      "Tensor running_mean, Tensor running_var, float eps, Tensor? residual, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups, int act, float act_a, float act_b) -> Tensor");

  // The pieces of a training-mode BatchNorm [+ residual] + activation unit; the spec
  // is reference.py (bn_stats ... update_running_stats), the driver csrc/bn_act.h.
  // Activations (y, out, grad_out, residual): (N, K, H, W), one floating dtype;
  // outputs keep y's dtype and memory format (channels_last iff y is
  // channels_last-contiguous and not NCHW-contiguous). Per-channel outputs are
  // (K,) in the accumulation type (float32, float64 for float64 y); per-channel
  // inputs are (K,) of any floating dtype.
  //
  // Per-channel batch mean and *biased* variance over (N, H, W); deterministic
  // and numerically stable (chunked two-pass moments merged with Chan's formula).
  // Empty input: NaN, as torch.var_mean.
  m.def("bn_stats(Tensor y) -> (Tensor mean, Tensor var)");
  // out = act((y - mean) / sqrt(var + eps) * gamma + beta [+ residual]); gamma/beta None mean 1/0.
  m.def(
      "bn_act_apply(Tensor y, Tensor mean, Tensor var, Tensor? gamma, Tensor? beta, float eps, "
      "Tensor? residual, int act, float act_a, float act_b) -> Tensor");
  // sum_g = sum(g), sum_g_xhat = sum(g * xhat) per channel (dbeta and dgamma), with
  // g = dL/dz = act'(z) * grad_out and xhat = (y - mean) / sqrt(var + eps). ReLU's
  // act' reads out (out > 0); the other kinds past the identity read z =
  // xhat * gamma + beta, recomputed from y (no residual in it: callers refuse
  // those kinds with a residual under autograd, training.py).
  m.def(
      "bn_act_backward_reduce(Tensor grad_out, Tensor out, Tensor y, Tensor mean, Tensor var, Tensor? gamma, "
      "Tensor? beta, float eps, int act, float act_a, float act_b) -> (Tensor sum_g, Tensor sum_g_xhat)");
  // dy = gamma * invstd * (g - sum_g / count - xhat * sum_g_xhat / count) in training, gamma * invstd * g
  // in eval (the sums are then not read); g as above; d_residual = g, or an empty (0,) tensor unless
  // residual_grad. count: values per channel behind the batch statistics (N*H*W, or more under SyncBatchNorm).
  m.def(
      "bn_act_backward_apply(Tensor grad_out, Tensor out, Tensor y, Tensor mean, Tensor var, Tensor? gamma, "
      "Tensor? beta, float eps, Tensor sum_g, Tensor sum_g_xhat, int count, bool training, int act, float act_a, "
      "float act_b, bool residual_grad) -> (Tensor dy, Tensor d_residual)");
  // In place, as nn.BatchNorm2d in training: running_mean = (1 - momentum) * running_mean + momentum * mean,
  // running_var = (1 - momentum) * running_var + momentum * var * count / (count - 1); count > 1.
  m.def(
      "bn_update_running_stats_(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor mean, Tensor var, "
      "int count, float momentum) -> ()");
}
