// Host-side driver of the training BatchNorm ops (bn_stats, bn_act_apply,
// bn_act_backward_reduce, bn_act_backward_apply, bn_update_running_stats_),
// shared by the CPU and CUDA registrations: argument checks, layout rules and
// output allocation live here once; each device supplies only the kernels
// (BnActKernels). The math is in epilogue.h, the spec in reference.py.
//
// Layout rule (the same as conv_bn_act and the fake kernels in _extension.py):
// y is channels_last iff y.is_contiguous(ChannelsLast) && !y.is_contiguous();
// otherwise it is treated as NCHW (a non-dense y is first copied to NCHW).
// Every other activation operand is copied into y's layout unless it already
// is dense in it, and every activation output is allocated in it. Kernels can
// then walk all activations as one flat array each.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <cmath>
#include <limits>
#include <optional>
#include <tuple>

#include "conv_bn_act.h"  // ChannelParams, detail::to_acc, detail::dtype_name
#include "epilogue.h"

namespace resnet_fused {

// The dense activation every kernel sees: N x K x HW, NCHW (flat index
// ((n*K + k)*HW + p)) or channels_last (flat index ((n*HW + p)*K + k)).
struct BnActView {
  int64_t N, K, HW;
  bool channels_last;
};

// Fixed chunking of a per-channel reduction, chosen from the shape alone so
// that results never depend on the thread or block count (determinism):
//   NCHW:          each (n, k) plane of HW values splits into `per_group`
//                  chunks of `len` values; chunk c = n * per_group + s.
//   channels_last: the N*HW rows split into chunks of `len` rows, each
//                  holding `len` values of every channel.
// Partial results are stored [chunk][channel] and merged in chunk order.
struct Chunking {
  int64_t len;        // values of one channel per full chunk
  int64_t per_group;  // chunks per plane (NCHW); all chunks (channels_last)
  int64_t extent;     // values per plane HW (NCHW); rows N*HW (channels_last)
  int64_t chunks;     // total chunks

  // How many values of a channel chunk c holds (the last one may be short).
  RF_HOST_DEVICE int64_t count(int64_t c) const {
    const int64_t left = extent - (c % per_group) * len;
    return left < len ? left : len;
  }
};

// plane_len: chunk length in NCHW; rows: chunk length in channels_last.
inline Chunking make_chunking(const BnActView& v, int64_t plane_len, int64_t rows) {
  if (v.channels_last) {
    const int64_t total = v.N * v.HW;
    const int64_t chunks = (total + rows - 1) / rows;
    return {rows, chunks, total, chunks};
  }
  const int64_t per_plane = (v.HW + plane_len - 1) / plane_len;
  return {plane_len, per_plane, v.HW, v.N * per_plane};
}

// The per-channel inputs of bn_act_backward_apply, contiguous (K,) in the
// accumulation type; gamma/beta undefined mean 1/0 (beta is read only to
// recompute z, see needs_preactivation), the sums are undefined in eval.
struct BnBackwardInputs {
  at::Tensor mean, var, gamma, beta, sum_g, sum_g_xhat;
  double eps;
  int64_t count;
  bool training;
};

// What a device provides. Inputs are checked and dense (see the layout rule);
// outputs are allocated; numel() > 0. `out` (the forward output) is only read
// for the ReLU mask and is undefined for every other activation.
struct BnActKernels {
  // mean, var: (K,) acc, written.
  void (*stats)(const at::Tensor& y, const BnActView& v, at::Tensor& mean, at::Tensor& var);
  // bn: mean/var in running_mean/running_var, gamma/beta in bn_weight/bn_bias,
  // no conv_bias. residual: undefined when absent.
  void (*apply)(const at::Tensor& y, const ChannelParams& bn, const at::Tensor& residual, const BnActView& v,
                const Activation<double>& act, at::Tensor& out);
  // bn as for apply (gamma/beta read only to recompute z). sum_g, sum_g_xhat: (K,) acc, written.
  void (*backward_reduce)(const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& y,
                          const ChannelParams& bn, const BnActView& v, const Activation<double>& act,
                          at::Tensor& sum_g, at::Tensor& sum_g_xhat);
  // d_residual: undefined when not wanted.
  void (*backward_apply)(const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& y,
                         const BnBackwardInputs& p, const BnActView& v, const Activation<double>& act,
                         at::Tensor& dy, at::Tensor& d_residual);
  // running = momentum * batch * factor + (1 - momentum) * running, in place;
  // running contiguous, batch contiguous in running's accumulation type.
  void (*running_stat)(at::Tensor& running, const at::Tensor& batch, double factor, double momentum);
};

namespace bn_detail {

using detail::dtype_name;

inline void check_activation(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be a 4-D (N, K, H, W) tensor, got ", t.dim(), "-D");
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble, op, ": ", name,
              " must be float32, float16, bfloat16 or float64, got ", dtype_name(dt));
}

// Another activation operand: y's device, dtype and shape.
inline void check_like(const at::Tensor& t, const char* op, const char* name, const at::Tensor& y) {
  TORCH_CHECK(t.device() == y.device(), op, ": ", name, " is on ", t.device(), " but y is on ", y.device(),
              "; all tensors must be on one device");
  TORCH_CHECK(t.scalar_type() == y.scalar_type(), op, ": ", name, " dtype ", dtype_name(t.scalar_type()),
              " does not match y dtype ", dtype_name(y.scalar_type()));
  TORCH_CHECK(t.sizes() == y.sizes(), op, ": ", name, " must have y's shape ", y.sizes(), ", got ", t.sizes());
}

// One value per channel, any floating dtype (fp32 BN parameters with bf16
// activations under autocast, fp16 buffers of a .half() model).
inline void check_channel(const at::Tensor& t, const char* op, const char* name, int64_t K, const at::Tensor& like,
                          const char* like_name = "y") {
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " is on ", t.device(), " but ", like_name, " is on ",
              like.device(), "; all tensors must be on one device");
  TORCH_CHECK(t.dim() == 1 && t.size(0) == K, op, ": ", name, " must be a 1-D tensor of length K=", K,
              " (channels), got shape ", t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be a floating tensor, got ",
              dtype_name(t.scalar_type()));
}

inline void check_eps(double eps, const char* op) {
  TORCH_CHECK(eps >= 0 && std::isfinite(eps), op, ": eps must be non-negative and finite, got ", eps);
}

inline at::MemoryFormat memory_format(const at::Tensor& y) {
  const bool cl = y.is_contiguous(at::MemoryFormat::ChannelsLast) && !y.is_contiguous();
  return cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

inline BnActView view_of(const at::Tensor& y, at::MemoryFormat fmt) {
  return {y.size(0), y.size(1), y.size(2) * y.size(3), fmt == at::MemoryFormat::ChannelsLast};
}

// Dense in fmt: t itself when it already is (whatever its storage offset),
// else a copy. is_contiguous(fmt) is exactly "the flat walk in fmt's order
// visits t's elements in order", which is all the kernels rely on.
inline at::Tensor dense(const at::Tensor& t, at::MemoryFormat fmt) {
  return t.is_contiguous(fmt) ? t : t.contiguous(fmt);
}

}  // namespace bn_detail

inline std::tuple<at::Tensor, at::Tensor> bn_stats(const at::Tensor& y_in, const BnActKernels& kernels) {
  constexpr const char* op = "bn_stats";
  bn_detail::check_activation(y_in, op, "y");
  const auto fmt = bn_detail::memory_format(y_in);
  const auto acc = at::toOpMathType(y_in.scalar_type());
  const int64_t K = y_in.size(1);
  if (y_in.numel() == 0) {
    // No values: NaN, what torch.var_mean returns for an empty reduction.
    const auto nan = at::full({K}, std::numeric_limits<double>::quiet_NaN(), y_in.options().dtype(acc));
    return {nan, nan.clone()};
  }
  const at::Tensor y = bn_detail::dense(y_in, fmt);
  at::Tensor mean = at::empty({K}, y.options().dtype(acc));
  at::Tensor var = at::empty({K}, y.options().dtype(acc));
  kernels.stats(y, bn_detail::view_of(y, fmt), mean, var);
  return {mean, var};
}

inline at::Tensor bn_act_apply(const at::Tensor& y_in, const at::Tensor& mean, const at::Tensor& var,
                               const std::optional<at::Tensor>& gamma, const std::optional<at::Tensor>& beta,
                               double eps, const std::optional<at::Tensor>& residual, int64_t act_code,
                               double act_a, double act_b, const BnActKernels& kernels) {
  constexpr const char* op = "bn_act_apply";
  const Activation<double> act = make_activation(act_code, act_a, act_b, op);
  bn_detail::check_activation(y_in, op, "y");
  const int64_t K = y_in.size(1);
  bn_detail::check_channel(mean, op, "mean", K, y_in);
  bn_detail::check_channel(var, op, "var", K, y_in);
  if (gamma.has_value()) bn_detail::check_channel(*gamma, op, "gamma", K, y_in);
  if (beta.has_value()) bn_detail::check_channel(*beta, op, "beta", K, y_in);
  if (residual.has_value()) bn_detail::check_like(*residual, op, "residual", y_in);
  bn_detail::check_eps(eps, op);

  const auto fmt = bn_detail::memory_format(y_in);
  at::Tensor out = at::empty(y_in.sizes(), y_in.options().memory_format(fmt));
  if (y_in.numel() == 0) return out;
  const at::Tensor y = bn_detail::dense(y_in, fmt);
  const at::Tensor res = residual.has_value() ? bn_detail::dense(*residual, fmt) : at::Tensor();
  const auto acc = at::toOpMathType(y.scalar_type());
  const ChannelParams bn{at::Tensor(),          detail::to_acc(gamma, acc), detail::to_acc(beta, acc),
                         detail::to_acc(mean, acc), detail::to_acc(var, acc),  eps};
  kernels.apply(y, bn, res, bn_detail::view_of(y, fmt), act, out);
  return out;
}

inline std::tuple<at::Tensor, at::Tensor> bn_act_backward_reduce(const at::Tensor& grad_out_in,
                                                                 const at::Tensor& out_in, const at::Tensor& y_in,
                                                                 const at::Tensor& mean, const at::Tensor& var,
                                                                 const std::optional<at::Tensor>& gamma,
                                                                 const std::optional<at::Tensor>& beta, double eps,
                                                                 int64_t act_code, double act_a, double act_b,
                                                                 const BnActKernels& kernels) {
  constexpr const char* op = "bn_act_backward_reduce";
  const Activation<double> act = make_activation(act_code, act_a, act_b, op);
  bn_detail::check_activation(y_in, op, "y");
  bn_detail::check_like(grad_out_in, op, "grad_out", y_in);
  bn_detail::check_like(out_in, op, "out", y_in);
  const int64_t K = y_in.size(1);
  bn_detail::check_channel(mean, op, "mean", K, y_in);
  bn_detail::check_channel(var, op, "var", K, y_in);
  if (gamma.has_value()) bn_detail::check_channel(*gamma, op, "gamma", K, y_in);
  if (beta.has_value()) bn_detail::check_channel(*beta, op, "beta", K, y_in);
  bn_detail::check_eps(eps, op);

  const auto acc = at::toOpMathType(y_in.scalar_type());
  at::Tensor sum_g = at::zeros({K}, y_in.options().dtype(acc));
  at::Tensor sum_g_xhat = at::zeros({K}, y_in.options().dtype(acc));
  if (y_in.numel() == 0) return {sum_g, sum_g_xhat};  // empty sums are 0, as torch.sum
  const auto fmt = bn_detail::memory_format(y_in);
  const at::Tensor y = bn_detail::dense(y_in, fmt);
  // out is only read for the ReLU mask.
  const at::Tensor out = act.kind == ActKind::kRelu ? bn_detail::dense(out_in, fmt) : at::Tensor();
  const ChannelParams bn{at::Tensor(),          detail::to_acc(gamma, acc), detail::to_acc(beta, acc),
                         detail::to_acc(mean, acc), detail::to_acc(var, acc),  eps};
  kernels.backward_reduce(bn_detail::dense(grad_out_in, fmt), out, y, bn, bn_detail::view_of(y, fmt), act, sum_g,
                          sum_g_xhat);
  return {sum_g, sum_g_xhat};
}

inline std::tuple<at::Tensor, at::Tensor> bn_act_backward_apply(
    const at::Tensor& grad_out_in, const at::Tensor& out_in, const at::Tensor& y_in, const at::Tensor& mean,
    const at::Tensor& var, const std::optional<at::Tensor>& gamma, const std::optional<at::Tensor>& beta, double eps,
    const at::Tensor& sum_g, const at::Tensor& sum_g_xhat, int64_t count, bool training, int64_t act_code,
    double act_a, double act_b, bool residual_grad, const BnActKernels& kernels) {
  constexpr const char* op = "bn_act_backward_apply";
  const Activation<double> act = make_activation(act_code, act_a, act_b, op);
  bn_detail::check_activation(y_in, op, "y");
  bn_detail::check_like(grad_out_in, op, "grad_out", y_in);
  bn_detail::check_like(out_in, op, "out", y_in);
  const int64_t K = y_in.size(1);
  bn_detail::check_channel(mean, op, "mean", K, y_in);
  bn_detail::check_channel(var, op, "var", K, y_in);
  if (gamma.has_value()) bn_detail::check_channel(*gamma, op, "gamma", K, y_in);
  if (beta.has_value()) bn_detail::check_channel(*beta, op, "beta", K, y_in);
  if (training) {
    // In eval the batch sums are not part of the gradient and are not read.
    bn_detail::check_channel(sum_g, op, "sum_g", K, y_in);
    bn_detail::check_channel(sum_g_xhat, op, "sum_g_xhat", K, y_in);
    // An empty batch has nothing to differentiate (checked after the early return below).
    TORCH_CHECK(count > 0 || y_in.numel() == 0, op,
                ": count (values per channel in the batch statistics) must be positive, got ", count);
  }
  bn_detail::check_eps(eps, op);

  const auto fmt = bn_detail::memory_format(y_in);
  const auto options = y_in.options().memory_format(fmt);
  at::Tensor dy = at::empty(y_in.sizes(), options);
  at::Tensor d_residual = residual_grad ? at::empty(y_in.sizes(), options) : at::empty({0}, y_in.options());
  if (y_in.numel() == 0) return {dy, d_residual};
  const auto acc = at::toOpMathType(y_in.scalar_type());
  const BnBackwardInputs p{detail::to_acc(mean, acc),
                           detail::to_acc(var, acc),
                           detail::to_acc(gamma, acc),
                           detail::to_acc(beta, acc),
                           training ? detail::to_acc(sum_g, acc) : at::Tensor(),
                           training ? detail::to_acc(sum_g_xhat, acc) : at::Tensor(),
                           eps,
                           count,
                           training};
  const at::Tensor y = bn_detail::dense(y_in, fmt);
  const at::Tensor out = act.kind == ActKind::kRelu ? bn_detail::dense(out_in, fmt) : at::Tensor();
  at::Tensor d_res = residual_grad ? d_residual : at::Tensor();
  kernels.backward_apply(bn_detail::dense(grad_out_in, fmt), out, y, p, bn_detail::view_of(y, fmt), act, dy, d_res);
  return {dy, d_residual};
}

// In place, in the running tensors' own dtypes, computed in their
// accumulation type; var is biased (bn_stats) and is made unbiased here.
inline void bn_update_running_stats_(at::Tensor& running_mean, at::Tensor& running_var, const at::Tensor& mean,
                                     const at::Tensor& var, int64_t count, double momentum,
                                     const BnActKernels& kernels) {
  constexpr const char* op = "bn_update_running_stats_";
  TORCH_CHECK(running_mean.dim() == 1, op, ": running_mean must be 1-D (K,), got shape ", running_mean.sizes());
  const int64_t K = running_mean.size(0);
  bn_detail::check_channel(running_mean, op, "running_mean", K, running_mean, "running_mean");
  bn_detail::check_channel(running_var, op, "running_var", K, running_mean, "running_mean");
  bn_detail::check_channel(mean, op, "mean", K, running_mean, "running_mean");
  bn_detail::check_channel(var, op, "var", K, running_mean, "running_mean");
  TORCH_CHECK(count > 1, op, ": count (values per channel in the batch statistics) must be > 1 for the unbiased "
              "variance var * count / (count - 1), got ", count);
  TORCH_CHECK(std::isfinite(momentum), op, ": momentum must be finite, got ", momentum);
  if (K == 0) return;
  const double bessel = static_cast<double>(count) / static_cast<double>(count - 1);
  const auto step = [&](at::Tensor& running, const at::Tensor& batch, double factor) {
    at::Tensor work = running.contiguous();  // the tensor itself when already contiguous
    kernels.running_stat(work, detail::to_acc(batch, at::toOpMathType(running.scalar_type())), factor, momentum);
    if (!work.is_same(running)) running.copy_(work);
  };
  step(running_mean, mean, 1.0);
  step(running_var, var, bessel);
}

}  // namespace resnet_fused
