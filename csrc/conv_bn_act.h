// Host-side driver of resnet_fused::conv_bn_act, shared by the CPU and CUDA
// registrations; only the in-place epilogue differs per device.
//
//   out = act(conv2d(input, weight) * scale[k] + shift[k] [+ residual])
//   scale = bn_weight / sqrt(running_var + eps)
//   shift = bn_bias + (bias - running_mean) * scale
//
// The convolution itself goes to at::convolution (oneDNN on CPU, cuDNN on
// CUDA) without a bias; BN, residual add and activation run as one extra pass. scale
// and shift come from the live BN tensors on every call: nothing is folded
// into the weight or cached, so a changed parameter can never go stale.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/util/accumulate.h>

#include <cmath>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "epilogue.h"

namespace resnet_fused {

// The per-channel inputs of the epilogue, each contiguous and in out's
// accumulation type (at::toOpMathType); an absent optional stays undefined.
struct ChannelParams {
  at::Tensor conv_bias, bn_weight, bn_bias, running_mean, running_var;
  double eps;

  template <typename acc_t>
  BnParams<acc_t> pointers() const {
    auto ptr = [](const at::Tensor& t) { return t.defined() ? t.const_data_ptr<acc_t>() : nullptr; };
    return {ptr(conv_bias), ptr(bn_weight), ptr(bn_bias), ptr(running_mean), ptr(running_var), static_cast<acc_t>(eps)};
  }
};

// K scale/shift pairs of the BN affine (bn_fold), once per call, so each
// element of a CPU pass costs one multiply-add. Folded in double from the
// acc_t parameters and rounded once, as ATen's CPU batch_norm folds (in its
// accumulation type): each constant then carries one rounding, not four, and
// the fused output is no less exact than the unfused one.
template <typename acc_t>
void fold_channels(const ChannelParams& bn, int64_t K, std::vector<acc_t>& scale, std::vector<acc_t>& shift) {
  const BnParams<acc_t> p = bn.pointers<acc_t>();
  auto at = [](const acc_t* v, int64_t k, double none) { return v ? static_cast<double>(v[k]) : none; };
  scale.resize(K);
  shift.resize(K);
  for (int64_t k = 0; k < K; ++k) {
    const double s = bn_scale(at(p.weight, k, 1.0), static_cast<double>(p.var[k]), bn.eps);
    scale[k] = static_cast<acc_t>(s);
    shift[k] = static_cast<acc_t>(bn_shift(at(p.bias, k, 0.0), at(p.conv_bias, k, 0.0), static_cast<double>(p.mean[k]), s));
  }
}

// The (code, a, b) activation arguments of an op, checked: an unknown code
// is an error that lists the known ones (epilogue.h's ActKind).
inline Activation<double> make_activation(int64_t code, double a, double b, const char* op) {
  TORCH_CHECK(code >= 0 && code < kNumActKinds, op, ": unknown activation code ", code, "; known: ", kActKindList);
  return {static_cast<ActKind>(code), a, b};
}

// The parameters in the kernel's accumulation type.
template <typename acc_t>
Activation<acc_t> activation_as(const Activation<double>& act) {
  return {act.kind, static_cast<acc_t>(act.a), static_cast<acc_t>(act.b)};
}

// f(std::integral_constant<ActKind, K>{}) for the run-time kind: the CPU
// loops take the kind as a template parameter, so each compiles branch-free.
template <typename F>
void with_activation(ActKind kind, F&& f) {
  switch (kind) {
    case ActKind::kIdentity: return f(std::integral_constant<ActKind, ActKind::kIdentity>{});
    case ActKind::kRelu: return f(std::integral_constant<ActKind, ActKind::kRelu>{});
    case ActKind::kHardtanh: return f(std::integral_constant<ActKind, ActKind::kHardtanh>{});
    case ActKind::kLeakyRelu: return f(std::integral_constant<ActKind, ActKind::kLeakyRelu>{});
    case ActKind::kSilu: return f(std::integral_constant<ActKind, ActKind::kSilu>{});
    case ActKind::kHardswish: return f(std::integral_constant<ActKind, ActKind::kHardswish>{});
    case ActKind::kGelu: return f(std::integral_constant<ActKind, ActKind::kGelu>{});
    case ActKind::kGeluTanh: return f(std::integral_constant<ActKind, ActKind::kGeluTanh>{});
  }
  TORCH_CHECK(false, "unknown activation kind ", static_cast<int>(kind));
}

// out = act(out * scale[k] + shift[k] [+ residual]) in place. out is dense:
// contiguous NCHW (channel of flat index i is (i / (H*W)) % K) or, when
// channels_last, NHWC (channel is i % K). When given, residual has out's
// sizes and strides, so both can be walked as flat arrays.
using ConvBnActEpilogue = void (*)(at::Tensor& out, const ChannelParams& bn, const std::optional<at::Tensor>& residual,
                                   bool channels_last, const Activation<double>& act);

namespace detail {

inline std::string dtype_name(at::ScalarType t) {
  return "torch." + std::string(c10::getDtypeNames(t).first);
}

inline void check_device(const at::Tensor& t, const char* name, const at::Tensor& input) {
  TORCH_CHECK(t.device() == input.device(), "conv_bn_act: ", name, " is on ", t.device(),
              " but input is on ", input.device(), "; all tensors must be on one device");
}

inline void check_pair(at::IntArrayRef v, const char* name, int64_t min_value) {
  TORCH_CHECK(v.size() == 2, "conv_bn_act: ", name, " must have 2 elements (h, w), got ", v.size());
  TORCH_CHECK(v[0] >= min_value && v[1] >= min_value, "conv_bn_act: ", name, " must be ",
              min_value == 0 ? "non-negative" : "positive", ", got ", v);
}

// bias and the BN tensors: one value per output channel, any floating dtype
// (BN buffers are often fp32 while the activations are half).
inline void check_per_channel(const at::Tensor& t, const char* name, int64_t K, const at::Tensor& input) {
  check_device(t, name, input);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == K, "conv_bn_act: ", name,
              " must be a 1-D tensor of length K=", K, " (output channels), got shape ", t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "conv_bn_act: ", name,
              " must be a floating tensor, got ", dtype_name(t.scalar_type()));
}

// Contiguous, in the accumulation type: a no-op for the usual fp32 BN buffers.
inline at::Tensor to_acc(const at::Tensor& t, at::ScalarType acc) { return t.to(acc).contiguous(); }
inline at::Tensor to_acc(const std::optional<at::Tensor>& t, at::ScalarType acc) {
  return t.has_value() ? to_acc(*t, acc) : at::Tensor();
}

}  // namespace detail

inline at::Tensor conv_bn_act(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
                              const at::Tensor& running_mean, const at::Tensor& running_var, double eps,
                              const std::optional<at::Tensor>& residual, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                              const Activation<double>& act, ConvBnActEpilogue epilogue) {
  using detail::dtype_name;
  TORCH_CHECK(input.dim() == 4, "conv_bn_act: input must be a 4-D (N, C, H, W) tensor, got ", input.dim(), "-D");
  const auto dtype = input.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble,
              "conv_bn_act: input must be float32, float16, bfloat16 or float64, got ", dtype_name(dtype));
  TORCH_CHECK(weight.dim() == 4, "conv_bn_act: weight must be a 4-D (K, C/groups, R, S) tensor, got ",
              weight.dim(), "-D");
  detail::check_device(weight, "weight", input);
  TORCH_CHECK(weight.scalar_type() == dtype, "conv_bn_act: weight dtype ", dtype_name(weight.scalar_type()),
              " does not match input dtype ", dtype_name(dtype));
  TORCH_CHECK(groups > 0, "conv_bn_act: groups must be positive, got ", groups);
  const int64_t K = weight.size(0);
  TORCH_CHECK(K % groups == 0, "conv_bn_act: weight.size(0)=", K, " (output channels) must be divisible by groups=",
              groups);
  TORCH_CHECK(weight.size(1) * groups == input.size(1), "conv_bn_act: expected input with ",
              weight.size(1) * groups, " channels (weight.size(1)=", weight.size(1), " x groups=", groups,
              "), got input with ", input.size(1), " channels");
  detail::check_pair(stride, "stride", 1);
  detail::check_pair(padding, "padding", 0);
  detail::check_pair(dilation, "dilation", 1);
  if (bias.has_value()) detail::check_per_channel(*bias, "bias", K, input);
  if (bn_weight.has_value()) detail::check_per_channel(*bn_weight, "bn_weight", K, input);
  if (bn_bias.has_value()) detail::check_per_channel(*bn_bias, "bn_bias", K, input);
  detail::check_per_channel(running_mean, "running_mean", K, input);
  detail::check_per_channel(running_var, "running_var", K, input);
  TORCH_CHECK(eps >= 0 && std::isfinite(eps), "conv_bn_act: eps must be non-negative and finite, got ", eps);

  // Output size, checked here so a bad residual fails before any conv work.
  std::vector<int64_t> out_sizes{input.size(0), K, 0, 0};
  for (int d = 0; d < 2; ++d) {
    const int64_t extent = input.size(2 + d) + 2 * padding[d] - dilation[d] * (weight.size(2 + d) - 1) - 1;
    TORCH_CHECK(extent >= 0, "conv_bn_act: the dilated kernel (", weight.size(2 + d), " with dilation ", dilation[d],
                ") is larger than the padded input (", input.size(2 + d), " + 2*", padding[d], ") in dim ", 2 + d);
    out_sizes[2 + d] = extent / stride[d] + 1;
  }
  if (residual.has_value()) {
    detail::check_device(*residual, "residual", input);
    TORCH_CHECK(residual->scalar_type() == dtype, "conv_bn_act: residual dtype ",
                dtype_name(residual->scalar_type()), " does not match input dtype ", dtype_name(dtype));
    TORCH_CHECK(residual->sizes() == at::IntArrayRef(out_sizes), "conv_bn_act: residual must have the output shape ",
                at::IntArrayRef(out_sizes), ", got ", residual->sizes());
  }

  // channels_last in -> channels_last out, whatever layout the weight has
  // (cuDNN picks channels_last if either operand is). The same rule as the
  // Python side (ops/conv_bn_act.py output_memory_format), so the registered
  // fake kernel predicts these strides exactly.
  const bool channels_last = input.is_contiguous(at::MemoryFormat::ChannelsLast) && !input.is_contiguous();
  const auto fmt = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  if (c10::multiply_integers(out_sizes) == 0) {
    return at::empty(out_sizes, input.options().memory_format(fmt));
  }

  // The weight in the output's format too: a no-op when it already matches,
  // and a weight-sized copy is cheaper than re-laying out the activation.
  at::Tensor out = at::convolution(input, weight.contiguous(fmt), /*bias=*/std::nullopt, stride, padding, dilation,
                                   /*transposed=*/false, /*output_padding=*/{0, 0}, groups);
  if (!out.is_contiguous(fmt)) out = out.contiguous(fmt);

  std::optional<at::Tensor> res = residual;
  if (residual.has_value() && residual->strides() != out.strides()) {
    // empty_like keeps out's exact strides (out is dense), so the flat
    // epilogue pairs element i of out with element i of the residual.
    res = at::empty_like(out);
    res->copy_(*residual);
  }
  const auto acc = at::toOpMathType(dtype);
  const ChannelParams bn{detail::to_acc(bias, acc),         detail::to_acc(bn_weight, acc),
                         detail::to_acc(bn_bias, acc),      detail::to_acc(running_mean, acc),
                         detail::to_acc(running_var, acc), eps};
  epilogue(out, bn, res, channels_last, act);
  return out;
}

}  // namespace resnet_fused
