// CPU kernel of resnet_fused::conv_bn_act: oneDNN convolution through the
// shared driver, then one parallel pass for residual add + ReLU.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "conv_bn_act.h"
#include "epilogue.h"

namespace resnet_fused {
namespace {

// Large enough to amortize handing a chunk to a pool thread, small enough to
// spread one ResNet-50 stage-1 activation (32x64x56x56) over 64+ cores.
constexpr int64_t kGrain = 32 * 1024;

// kResidual/kRelu as template parameters make the loop body branch-free after
// inlining, so -O3 vectorizes it.
template <typename scalar_t, bool kResidual, bool kRelu>
void epilogue_loop(scalar_t* out, const scalar_t* residual, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;  // float for half/bfloat16
  at::parallel_for(0, n, kGrain, [=](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      acc_t r = acc_t(0);
      if constexpr (kResidual) r = static_cast<acc_t>(residual[i]);
      out[i] = static_cast<scalar_t>(residual_add_act<acc_t>(static_cast<acc_t>(out[i]), r, kResidual, kRelu));
    }
  });
}

void cpu_epilogue(at::Tensor& out, const std::optional<at::Tensor>& residual, bool relu) {
  const int64_t n = out.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "conv_bn_act_cpu_epilogue", [&] {
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    if (residual.has_value()) {
      const scalar_t* r = residual->const_data_ptr<scalar_t>();
      if (relu) {
        epilogue_loop<scalar_t, true, true>(o, r, n);
      } else {
        epilogue_loop<scalar_t, true, false>(o, r, n);
      }
    } else if (relu) {
      epilogue_loop<scalar_t, false, true>(o, nullptr, n);
    }
  });
}

at::Tensor conv_bn_act_cpu(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& scale,
                           const at::Tensor& shift, const std::optional<at::Tensor>& residual, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool relu) {
  return conv_bn_act(input, weight, scale, shift, residual, stride, padding, dilation, groups, relu, &cpu_epilogue);
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CPU, m) {
  m.impl("conv_bn_act", &conv_bn_act_cpu);
}

}  // namespace resnet_fused
