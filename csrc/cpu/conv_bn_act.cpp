// CPU kernel of resnet_fused::conv_bn_act: oneDNN convolution through the
// shared driver, then one parallel pass for BN + residual add + activation.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "conv_bn_act.h"
#include "epilogue.h"

namespace resnet_fused {
namespace {

// Elements per task: large enough to amortize handing a chunk to a pool
// thread, small enough to spread one ResNet-50 stage-1 activation
// (32x64x56x56) over 64+ cores.
constexpr int64_t kGrain = 32 * 1024;

// out viewed as rows x cols: NCHW rows are (n, k) planes of cols = H*W pixels
// (scale/shift constant along the row), channels_last rows are (n, h, w)
// pixels of cols = K channels (scale/shift indexed by the column). Either way
// the inner loop is contiguous and, with kResidual and the activation kind
// kAct as template parameters, branch-free, so -O3 vectorizes it.
template <typename scalar_t, bool kChannelsLast, bool kResidual, ActKind kAct>
void epilogue_loop(scalar_t* out, const scalar_t* residual, const at::opmath_type<scalar_t>* scale,
                   const at::opmath_type<scalar_t>* shift, int64_t rows, int64_t cols, int64_t K,
                   at::opmath_type<scalar_t> a, at::opmath_type<scalar_t> b) {
  using acc_t = at::opmath_type<scalar_t>;  // float for half/bfloat16
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / cols), [=](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      scalar_t* __restrict o = out + row * cols;
      const scalar_t* __restrict r = kResidual ? residual + row * cols : nullptr;
      const acc_t row_scale = kChannelsLast ? acc_t(0) : scale[row % K];
      const acc_t row_shift = kChannelsLast ? acc_t(0) : shift[row % K];
      for (int64_t j = 0; j < cols; ++j) {
        const acc_t s = kChannelsLast ? scale[j] : row_scale;
        const acc_t sh = kChannelsLast ? shift[j] : row_shift;
        const acc_t res = kResidual ? static_cast<acc_t>(r[j]) : acc_t(0);
        o[j] = static_cast<scalar_t>(
            bn_residual_act<kAct, acc_t>(static_cast<acc_t>(o[j]), s, sh, res, kResidual, a, b));
      }
    }
  });
}

template <typename scalar_t, bool kChannelsLast>
void dispatch_flags(scalar_t* out, const scalar_t* residual, const at::opmath_type<scalar_t>* scale,
                    const at::opmath_type<scalar_t>* shift, int64_t rows, int64_t cols, int64_t K,
                    const Activation<at::opmath_type<scalar_t>>& act) {
  with_activation(act.kind, [&](auto kind) {
    constexpr ActKind kAct = decltype(kind)::value;
    if (residual != nullptr) {
      epilogue_loop<scalar_t, kChannelsLast, true, kAct>(out, residual, scale, shift, rows, cols, K, act.a, act.b);
    } else {
      epilogue_loop<scalar_t, kChannelsLast, false, kAct>(out, residual, scale, shift, rows, cols, K, act.a, act.b);
    }
  });
}

void cpu_epilogue(at::Tensor& out, const ChannelParams& bn, const std::optional<at::Tensor>& residual,
                  bool channels_last, const Activation<double>& activation) {
  const int64_t N = out.size(0), K = out.size(1), PQ = out.size(2) * out.size(3);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "conv_bn_act_cpu_epilogue", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t> scale, shift;
    fold_channels(bn, K, scale, shift);

    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const scalar_t* r = residual.has_value() ? residual->const_data_ptr<scalar_t>() : nullptr;
    const auto act = activation_as<acc_t>(activation);
    if (channels_last) {
      dispatch_flags<scalar_t, true>(o, r, scale.data(), shift.data(), N * PQ, K, K, act);
    } else {
      dispatch_flags<scalar_t, false>(o, r, scale.data(), shift.data(), N * K, PQ, K, act);
    }
  });
}

at::Tensor conv_bn_act_cpu(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
                           const at::Tensor& running_mean, const at::Tensor& running_var, double eps,
                           const std::optional<at::Tensor>& residual, at::IntArrayRef stride, at::IntArrayRef padding,
                           at::IntArrayRef dilation, int64_t groups, int64_t act, double act_a, double act_b) {
  return conv_bn_act(input, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps, residual, stride,
                     padding, dilation, groups, make_activation(act, act_a, act_b, "conv_bn_act"), &cpu_epilogue);
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CPU, m) {
  m.impl("conv_bn_act", &conv_bn_act_cpu);
}

}  // namespace resnet_fused
