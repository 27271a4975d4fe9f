// CUDA kernel of resnet_fused::conv_bn_act: cuDNN convolution through the
// shared driver, then one elementwise pass for residual add + ReLU. The
// per-element math is epilogue.h, the same code the CPU kernel runs.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "conv_bn_act.h"
#include "epilogue.h"

namespace resnet_fused {
namespace {

constexpr int kThreads = 256;

// out:      n elements of the conv output, any dense layout, updated in place
// residual: n elements with out's strides (so index i matches), unused unless kResidual
// n:        out.numel(); int64 indexing because N*C*H*W passes 2^31 at large batch
template <typename scalar_t, bool kResidual, bool kRelu>
__global__ void epilogue_kernel(scalar_t* __restrict__ out, const scalar_t* __restrict__ residual, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;  // float for half/bfloat16
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step) {
    acc_t r = acc_t(0);
    if constexpr (kResidual) r = static_cast<acc_t>(residual[i]);
    out[i] = static_cast<scalar_t>(residual_add_act<acc_t>(static_cast<acc_t>(out[i]), r, kResidual, kRelu));
  }
}

template <typename scalar_t, bool kResidual, bool kRelu>
void launch_epilogue(scalar_t* out, const scalar_t* residual, int64_t n) {
  // One full wave of resident blocks; the grid-stride loop covers the rest.
  // Device attributes rather than at::cuda::getCurrentDeviceProperties(): its
  // header pulls in cuBLAS/cuSPARSE headers that a minimal toolkit lacks.
  const int device = c10::cuda::current_device();
  int sms = 0, threads_per_sm = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&threads_per_sm, cudaDevAttrMaxThreadsPerMultiProcessor, device));
  const int64_t wave = static_cast<int64_t>(sms) * (threads_per_sm / kThreads);
  const int64_t blocks = std::min(wave, (n + kThreads - 1) / kThreads);
  epilogue_kernel<scalar_t, kResidual, kRelu>
      <<<static_cast<unsigned int>(blocks), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(out, residual, n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void cuda_epilogue(at::Tensor& out, const std::optional<at::Tensor>& residual, bool relu) {
  const c10::cuda::CUDAGuard guard(out.device());
  const int64_t n = out.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "conv_bn_act_cuda_epilogue", [&] {
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    if (residual.has_value()) {
      const scalar_t* r = residual->const_data_ptr<scalar_t>();
      if (relu) {
        launch_epilogue<scalar_t, true, true>(o, r, n);
      } else {
        launch_epilogue<scalar_t, true, false>(o, r, n);
      }
    } else if (relu) {
      launch_epilogue<scalar_t, false, true>(o, nullptr, n);
    }
  });
}

at::Tensor conv_bn_act_cuda(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& scale,
                            const at::Tensor& shift, const std::optional<at::Tensor>& residual, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool relu) {
  // The weight fold and the launch must target input's GPU, not the current
  // one. Only guard a CUDA input: a CPU input reaches here when another
  // argument is on the GPU, and the driver reports that mismatch by name.
  c10::cuda::OptionalCUDAGuard guard;
  if (input.is_cuda()) guard.set_device(input.device());
  return conv_bn_act(input, weight, scale, shift, residual, stride, padding, dilation, groups, relu, &cuda_epilogue);
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CUDA, m) {
  m.impl("conv_bn_act", &conv_bn_act_cuda);
}

}  // namespace resnet_fused
