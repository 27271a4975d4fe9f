// CUDA kernel of resnet_fused::conv_bn_act: cuDNN convolution through the
// shared driver, then one elementwise pass for BN + residual add + ReLU. The
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

// scale[k], shift[k] from the raw BN tensors, one thread per channel.
template <typename acc_t>
__global__ void bn_fold_kernel(BnParams<acc_t> p, int64_t K, acc_t* __restrict__ scale, acc_t* __restrict__ shift) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k < K) bn_fold(p, k, scale[k], shift[k]);
}

// out:      n elements of the conv output, dense, updated in place
// residual: n elements with out's strides (so index i matches), unused unless kResidual
// channel of flat index i: (i / inner) % K, inner = H*W for NCHW, 1 for channels_last
// n:        out.numel(); int64 indexing because N*C*H*W passes 2^31 at large batch
template <typename scalar_t, bool kResidual, bool kRelu>
__global__ void epilogue_kernel(scalar_t* __restrict__ out, const scalar_t* __restrict__ residual,
                                const at::opmath_type<scalar_t>* __restrict__ scale,
                                const at::opmath_type<scalar_t>* __restrict__ shift, int64_t n, int64_t inner,
                                int64_t K) {
  using acc_t = at::opmath_type<scalar_t>;  // float for half/bfloat16
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x;
  int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  // A 64-bit division is a few dozen instructions, more than the element's
  // memory traffic is worth, so divide once per thread and then advance
  // (r, k) = (i % inner, (i / inner) % K) by the constant step as a
  // mixed-radix counter: adds and compares only.
  int64_t r = i % inner;
  int64_t k = (i / inner) % K;
  const int64_t step_r = step % inner;
  const int64_t step_k = (step / inner) % K;
  for (; i < n; i += step) {
    const acc_t res = kResidual ? static_cast<acc_t>(residual[i]) : acc_t(0);
    out[i] = static_cast<scalar_t>(
        bn_residual_act<acc_t>(static_cast<acc_t>(out[i]), scale[k], shift[k], res, kResidual, kRelu));
    r += step_r;
    const bool carry = r >= inner;
    if (carry) r -= inner;
    k += step_k + carry;  // < 2K, so one subtraction wraps it
    if (k >= K) k -= K;
  }
}

template <typename scalar_t, bool kResidual, bool kRelu>
void launch_epilogue(scalar_t* out, const scalar_t* residual, const at::opmath_type<scalar_t>* scale,
                     const at::opmath_type<scalar_t>* shift, int64_t n, int64_t inner, int64_t K) {
  // One full wave of resident blocks; the grid-stride loop covers the rest.
  // Device attributes rather than at::cuda::getCurrentDeviceProperties(): its
  // header pulls in cuBLAS/cuSPARSE headers that a minimal toolkit lacks.
  const int device = c10::cuda::current_device();
  int sms = 0, threads_per_sm = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&threads_per_sm, cudaDevAttrMaxThreadsPerMultiProcessor, device));
  const int64_t wave = static_cast<int64_t>(sms) * (threads_per_sm / kThreads);
  const int64_t blocks = std::min(wave, (n + kThreads - 1) / kThreads);
  epilogue_kernel<scalar_t, kResidual, kRelu><<<static_cast<unsigned int>(blocks), kThreads, 0,
                                                c10::cuda::getCurrentCUDAStream()>>>(out, residual, scale, shift, n,
                                                                                     inner, K);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void cuda_epilogue(at::Tensor& out, const ChannelParams& bn, const std::optional<at::Tensor>& residual,
                   bool channels_last, bool relu) {
  const c10::cuda::CUDAGuard guard(out.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n = out.numel(), K = out.size(1);
  const int64_t inner = channels_last ? 1 : out.size(2) * out.size(3);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "conv_bn_act_cuda_epilogue", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // Row 0 scale, row 1 shift; from the caching allocator, so no cudaMalloc.
    const at::Tensor folded = at::empty({2, K}, out.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    acc_t* scale = folded.mutable_data_ptr<acc_t>();
    acc_t* shift = scale + K;
    bn_fold_kernel<acc_t><<<static_cast<unsigned int>((K + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
        bn.pointers<acc_t>(), K, scale, shift);
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    if (residual.has_value()) {
      const scalar_t* r = residual->const_data_ptr<scalar_t>();
      if (relu) {
        launch_epilogue<scalar_t, true, true>(o, r, scale, shift, n, inner, K);
      } else {
        launch_epilogue<scalar_t, true, false>(o, r, scale, shift, n, inner, K);
      }
    } else if (relu) {
      launch_epilogue<scalar_t, false, true>(o, nullptr, scale, shift, n, inner, K);
    } else {
      launch_epilogue<scalar_t, false, false>(o, nullptr, scale, shift, n, inner, K);
    }
  });
}

at::Tensor conv_bn_act_cuda(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
                            const at::Tensor& running_mean, const at::Tensor& running_var, double eps,
                            const std::optional<at::Tensor>& residual, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool relu) {
  // The conv and the launches must target input's GPU, not the current one.
  // Only guard a CUDA input: a CPU input reaches here when another argument
  // is on the GPU, and the driver reports that mismatch by name.
  c10::cuda::OptionalCUDAGuard guard;
  if (input.is_cuda()) guard.set_device(input.device());
  return conv_bn_act(input, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps, residual, stride,
                     padding, dilation, groups, relu, &cuda_epilogue);
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CUDA, m) {
  m.impl("conv_bn_act", &conv_bn_act_cuda);
}

}  // namespace resnet_fused
