// CUDA kernel of resnet_fused::conv_bn_act.
//
// Where a CUTLASS kernel applies (cutlass_plan.h decides, on the host), the op
// is ONE implicit-GEMM launch whose epilogue applies BatchNorm, the residual
// and the activation (cutlass/cutlass_sm90.cuh on H100/H200, cutlass/cutlass_sm80.cuh
// on A100 and as the sm90 fallback), after a tiny per-channel launch that
// folds the live BN tensors into scale/shift (and on sm80 two passes over the
// filter that make its scaled copy: its largest value, then the copy).
//
// Everywhere else (fp32/fp64, groups > 1, C or K not a multiple of 8, an arch
// without a CUTLASS cubin, an activation the sm90 epilogue cannot apply on
// Hopper, a misaligned pointer, or CUTLASS refusing the problem at run time)
// the exact path runs: cuDNN convolution through the shared driver, then one
// elementwise pass for BN + residual add + activation. The per-element math
// is epilogue.h, the same code the CPU kernel runs.
//
// NCHW inputs take the CUTLASS path too: the input (and residual) are copied
// to channels_last, and the NHWC result back to NCHW, so the op keeps its
// layout contract (NCHW in, NCHW out). channels_last callers pay nothing.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <optional>

#include "conv_bn_act.h"
#include "cuda/cutlass/cutlass_conv.cuh"
#include "cutlass_plan.h"
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
// act:      the activation, its kind known at run time (one warp-uniform branch)
template <typename scalar_t, bool kResidual>
__global__ void epilogue_kernel(scalar_t* __restrict__ out, const scalar_t* __restrict__ residual,
                                const at::opmath_type<scalar_t>* __restrict__ scale,
                                const at::opmath_type<scalar_t>* __restrict__ shift, int64_t n, int64_t inner,
                                int64_t K, Activation<at::opmath_type<scalar_t>> act) {
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
        bn_residual_act<acc_t>(static_cast<acc_t>(out[i]), scale[k], shift[k], res, kResidual, act));
    r += step_r;
    const bool carry = r >= inner;
    if (carry) r -= inner;
    k += step_k + carry;  // < 2K, so one subtraction wraps it
    if (k >= K) k -= K;
  }
}

template <typename scalar_t, bool kResidual>
void launch_epilogue(scalar_t* out, const scalar_t* residual, const at::opmath_type<scalar_t>* scale,
                     const at::opmath_type<scalar_t>* shift, int64_t n, int64_t inner, int64_t K,
                     const Activation<at::opmath_type<scalar_t>>& act) {
  // One full wave of resident blocks; the grid-stride loop covers the rest.
  // Device attributes rather than at::cuda::getCurrentDeviceProperties(): its
  // header pulls in cuBLAS/cuSPARSE headers that a minimal toolkit lacks.
  const int device = c10::cuda::current_device();
  int sms = 0, threads_per_sm = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&threads_per_sm, cudaDevAttrMaxThreadsPerMultiProcessor, device));
  const int64_t wave = static_cast<int64_t>(sms) * (threads_per_sm / kThreads);
  const int64_t blocks = std::min(wave, (n + kThreads - 1) / kThreads);
  epilogue_kernel<scalar_t, kResidual><<<static_cast<unsigned int>(blocks), kThreads, 0,
                                         c10::cuda::getCurrentCUDAStream()>>>(out, residual, scale, shift, n, inner,
                                                                              K, act);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void cuda_epilogue(at::Tensor& out, const ChannelParams& bn, const std::optional<at::Tensor>& residual,
                   bool channels_last, const Activation<double>& activation) {
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
    const auto act = activation_as<acc_t>(activation);
    if (residual.has_value()) {
      launch_epilogue<scalar_t, true>(o, residual->const_data_ptr<scalar_t>(), scale, shift, n, inner, K, act);
    } else {
      launch_epilogue<scalar_t, false>(o, nullptr, scale, shift, n, inner, K, act);
    }
  });
}

// ---------------------------------------------------------------------------
// The CUTLASS path.

namespace plan = cutlass_plan;

// The kernels linked into this binary, in cutlass_plan::kKernels order; null
// where setup.py did not build that family (its arch is not in
// TORCH_CUDA_ARCH_LIST).
const CutlassKernel* built_kernel(int config) {
  static const std::array<const CutlassKernel*, plan::kNumKernels> table = {
#if defined(RESNET_FUSED_CUTLASS_SM90)
      &cutlass_sm90_f16_128x128x64, &cutlass_sm90_f16_128x64x64, &cutlass_sm90_bf16_128x128x64,
      &cutlass_sm90_bf16_128x64x64,
#else
      nullptr, nullptr, nullptr, nullptr,
#endif
#if defined(RESNET_FUSED_CUTLASS_SM80_ARCHS)
      &cutlass_sm80_f16_128x128x32, &cutlass_sm80_f16_128x64x32, &cutlass_sm80_bf16_128x128x32,
      &cutlass_sm80_bf16_128x64x32,
#else
      nullptr, nullptr, nullptr, nullptr,
#endif
  };
  static_assert(plan::kernel_index("sm90_f16_128x128x64") == 0 && plan::kernel_index("sm90_bf16_128x64x64") == 3 &&
                    plan::kernel_index("sm80_f16_128x128x32") == 4 && plan::kernel_index("sm80_bf16_128x64x32") == 7,
                "the table above follows cutlass_plan::kKernels");
  return config >= 0 && config < plan::kNumKernels ? table[config] : nullptr;
}

// Launch counts for tests and `resnet-fused info`: per kernel, then plan
// fallbacks (exact path by shape/dtype/arch), then run-time fallbacks (CUTLASS
// refused or the launch failed; the exact path ran instead).
std::array<std::atomic<int64_t>, plan::kNumKernels + 2> dispatch_counts{};
constexpr int kPlanFallback = plan::kNumKernels;
constexpr int kRuntimeFallback = plan::kNumKernels + 1;

plan::DType plan_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return plan::DType::kHalf;
    case at::kBFloat16: return plan::DType::kBFloat16;
    case at::kFloat: return plan::DType::kFloat;
    case at::kDouble: return plan::DType::kDouble;
    default: return plan::DType::kOther;
  }
}

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0; }

bool per_channel_ok(const at::Tensor& t, int64_t K, const at::Device& device) {
  return t.defined() && t.device() == device && t.dim() == 1 && t.size(0) == K && at::isFloatingType(t.scalar_type());
}

// Every argument as the driver would accept it. Anything unusual returns
// false and goes to the driver, which either runs the exact path or raises
// its named error: this path never reports errors of its own. (Valid but
// unsupported arguments, such as fp32 or groups > 1, pass here and are the
// plan's to refuse.)
bool well_formed(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                 const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
                 const at::Tensor& running_mean, const at::Tensor& running_var, double eps,
                 const std::optional<at::Tensor>& residual, at::IntArrayRef stride, at::IntArrayRef padding,
                 at::IntArrayRef dilation, int64_t groups, const plan::ConvShape& s) {
  if (!input.is_cuda() || input.dim() != 4 || weight.dim() != 4 || weight.device() != input.device()) return false;
  if (weight.scalar_type() != input.scalar_type()) return false;
  if (groups < 1 || weight.size(0) % groups != 0 || weight.size(1) * groups != input.size(1)) return false;
  if (stride.size() != 2 || padding.size() != 2 || dilation.size() != 2) return false;
  if (stride[0] < 1 || stride[1] < 1 || padding[0] < 0 || padding[1] < 0 || dilation[0] < 1 || dilation[1] < 1) {
    return false;
  }
  if (!(eps >= 0 && std::isfinite(eps))) return false;
  const int64_t K = weight.size(0);
  const at::Device device = input.device();
  for (const auto* t : {&bias, &bn_weight, &bn_bias}) {
    if (t->has_value() && !per_channel_ok(**t, K, device)) return false;
  }
  if (!per_channel_ok(running_mean, K, device) || !per_channel_ok(running_var, K, device)) return false;
  // The output extent must be positive before P(), Q() mean anything.
  if (s.H + 2 * s.pad_h - s.dil_h * (s.R - 1) - 1 < 0 || s.W + 2 * s.pad_w - s.dil_w * (s.S - 1) - 1 < 0) return false;
  if (residual.has_value()) {
    const at::Tensor& r = *residual;
    if (r.device() != device || r.scalar_type() != input.scalar_type() || r.dim() != 4) return false;
    if (r.size(0) != s.N || r.size(1) != K || r.size(2) != s.P() || r.size(3) != s.Q()) return false;
  }
  return true;
}

// The largest scaled_filter_magnitude over the filter (epilogue.h): what the
// exponent e of the sm80 scaled filter follows from.
// w, scale, inner, n: as scale_filter_kernel below; blockDim.x == kThreads
// max_bits: one uint32, zero before the launch; receives the max's float bits.
//   The bits of non-negative floats order as their values do (NaN above inf),
//   so an integer max is a float max that keeps NaN; one atomic per block.
template <typename scalar_t>
__global__ void filter_max_kernel(const scalar_t* __restrict__ w, const float* __restrict__ scale,
                                  unsigned int* __restrict__ max_bits, int64_t inner, int64_t n) {
  auto umax = [](unsigned int a, unsigned int b) { return a > b ? a : b; };
  unsigned int m = 0;
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step) {
    m = umax(m, __float_as_uint(scaled_filter_magnitude(static_cast<float>(w[i]), scale[i / inner])));
  }
  for (int offset = 16; offset > 0; offset /= 2) m = umax(m, __shfl_down_sync(0xffffffffu, m, offset));
  __shared__ unsigned int warp_max[kThreads / 32];
  if (threadIdx.x % 32 == 0) warp_max[threadIdx.x / 32] = m;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int i = 1; i < kThreads / 32; ++i) m = umax(m, warp_max[i]);
    atomicMax(max_bits, m);
  }
}

// w * scale[k] * 2^-e, once per filter element, into a KRSC copy (sm80 only);
// e keeps every value within the dtype's range (epilogue.h).
// w:        (K, R, S, C) KRSC dense, the live conv weight
// scale:    (K,) fp32 BN scale from bn_fold_kernel
// max_bits: filter_max_kernel's result; limit: the dtype's largest value
// exponent: one int, e, written for the CUTLASS epilogue, which multiplies by 2^e
// out:      (K, R, S, C) KRSC dense, same dtype; rounded as mul_rn then a cast
// inner:    R*S*C elements per output channel; n = K * inner
template <typename scalar_t>
__global__ void scale_filter_kernel(const scalar_t* __restrict__ w, const float* __restrict__ scale,
                                    const unsigned int* __restrict__ max_bits, float limit, int* __restrict__ exponent,
                                    scalar_t* __restrict__ out, int64_t inner, int64_t n) {
  const int e = filter_scale_exponent(__uint_as_float(*max_bits), limit);
  if (blockIdx.x == 0 && threadIdx.x == 0) *exponent = e;
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step) {
    out[i] = static_cast<scalar_t>(scaled_filter_value(static_cast<float>(w[i]), scale[i / inner], e));
  }
}

// One fused launch, or nullopt for the exact path.
std::optional<at::Tensor> try_cutlass(const at::Tensor& input, const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias,
                                      const std::optional<at::Tensor>& bn_weight,
                                      const std::optional<at::Tensor>& bn_bias, const at::Tensor& running_mean,
                                      const at::Tensor& running_var, double eps,
                                      const std::optional<at::Tensor>& residual, at::IntArrayRef stride,
                                      at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                      const Activation<double>& act) {
  if (input.dim() != 4 || weight.dim() != 4 || stride.size() != 2 || padding.size() != 2 || dilation.size() != 2) {
    return std::nullopt;
  }
  plan::ConvShape s;
  s.N = input.size(0), s.C = input.size(1), s.H = input.size(2), s.W = input.size(3);
  s.K = weight.size(0), s.R = weight.size(2), s.S = weight.size(3);
  s.stride_h = stride[0], s.stride_w = stride[1], s.pad_h = padding[0], s.pad_w = padding[1];
  s.dil_h = dilation[0], s.dil_w = dilation[1], s.groups = groups;
  s.dtype = plan_dtype(input.scalar_type());
  // The driver's layout rule: channels_last in -> channels_last out, else NCHW.
  s.channels_last = input.is_contiguous(at::MemoryFormat::ChannelsLast) && !input.is_contiguous();
  if (!well_formed(input, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps, residual, stride, padding,
                   dilation, groups, s)) {
    return std::nullopt;
  }

  const int device = input.get_device();
  plan::Device dev;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&dev.major, cudaDevAttrComputeCapabilityMajor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&dev.minor, cudaDevAttrComputeCapabilityMinor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&dev.sm_count, cudaDevAttrMultiProcessorCount, device));
  static const plan::Build compiled = plan::compiled_build();
  const plan::Plan p = plan::plan_launch(s, dev, compiled, act.kind);
  const CutlassKernel* kernel = built_kernel(p.kernel);
  if (kernel == nullptr) {
    ++dispatch_counts[kPlanFallback];
    return std::nullopt;
  }

  // Dense NHWC / KRSC operands: no-ops for channels_last callers; the one
  // layout conversion in for NCHW callers (the way back is at the end).
  const auto cl = at::MemoryFormat::ChannelsLast;
  const at::Tensor x = input.contiguous(cl);
  const at::Tensor w = weight.contiguous(cl);
  const std::optional<at::Tensor> res =
      residual.has_value() ? std::optional<at::Tensor>(residual->contiguous(cl)) : std::nullopt;
  at::Tensor out = at::empty({s.N, s.K, s.P(), s.Q()}, input.options().memory_format(cl));
  // Fresh allocations are 256-byte aligned; a caller's view may not be.
  if (!aligned16(x) || !aligned16(w) || !aligned16(out) || (res.has_value() && !aligned16(*res))) {
    ++dispatch_counts[kRuntimeFallback];
    return std::nullopt;
  }

  const auto stream = c10::cuda::getCurrentCUDAStream();
  // scale (row 0) and shift (row 1) from the live BN tensors, on the device:
  // no host sync, nothing cached.
  const ChannelParams bn{detail::to_acc(bias, at::kFloat), detail::to_acc(bn_weight, at::kFloat),
                         detail::to_acc(bn_bias, at::kFloat), detail::to_acc(running_mean, at::kFloat),
                         detail::to_acc(running_var, at::kFloat), eps};
  const at::Tensor folded = at::empty({2, s.K}, input.options().dtype(at::kFloat));
  float* scale = folded.mutable_data_ptr<float>();
  float* shift = scale + s.K;
  bn_fold_kernel<float><<<static_cast<unsigned int>((s.K + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
      bn.pointers<float>(), s.K, scale, shift);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  at::Tensor filter = w;
  // sm80: [0] the filter's largest |w * scale| as float bits, [1] the
  // exponent e of its 2^-e (epilogue.h); zeroed for the atomic max.
  at::Tensor filter_stats;
  if (plan::kKernels[p.kernel].arch == plan::Arch::kSm80) {
    // sm80 applies the scale through the filter (see cutlass/cutlass_sm80.cuh).
    filter = at::empty_like(w, cl);
    filter_stats = at::zeros({2}, input.options().dtype(at::kInt));
    auto* max_bits = reinterpret_cast<unsigned int*>(filter_stats.mutable_data_ptr<int32_t>());
    int* exponent = filter_stats.mutable_data_ptr<int32_t>() + 1;
    const float limit = w.scalar_type() == at::kHalf ? kHalfMax : kBFloat16Max;
    const int64_t n = w.numel();
    const unsigned int blocks = static_cast<unsigned int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 4096));
    AT_DISPATCH_REDUCED_FLOATING_TYPES(w.scalar_type(), "conv_bn_act_scale_filter", [&] {
      filter_max_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(w.const_data_ptr<scalar_t>(), scale, max_bits,
                                                                    n / s.K, n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      scale_filter_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
          w.const_data_ptr<scalar_t>(), scale, max_bits, limit, exponent, filter.mutable_data_ptr<scalar_t>(),
          n / s.K, n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  const size_t workspace_bytes = kernel->workspace_size(s);
  at::Tensor workspace;
  if (workspace_bytes > 0) {
    workspace = at::empty({static_cast<int64_t>(workspace_bytes)}, input.options().dtype(at::kByte));
  }
  ConvLaunch launch{};
  launch.shape = s;
  launch.x = x.const_data_ptr();
  launch.w = filter.const_data_ptr();
  launch.residual = res.has_value() ? res->const_data_ptr() : nullptr;
  launch.out = out.mutable_data_ptr();
  launch.scale = scale;
  launch.shift = shift;
  launch.exponent = filter_stats.defined() ? filter_stats.const_data_ptr<int32_t>() + 1 : nullptr;
  launch.act = activation_as<float>(act);
  launch.workspace = workspace_bytes > 0 ? workspace.mutable_data_ptr() : nullptr;
  launch.stream = stream.stream();
  const int status = kernel->run(launch);
  if (status != 0) {
    // The plan accepted a problem CUTLASS refused, or the launch failed (say,
    // no cubin for this GPU): answer through the exact path, and say so once.
    TORCH_WARN_ONCE("resnet_fused conv_bn_act: CUTLASS kernel ", plan::kKernels[p.kernel].name,
                    " returned status ", status, "; using cuDNN + epilogue instead");
    ++dispatch_counts[kRuntimeFallback];
    return std::nullopt;
  }
  ++dispatch_counts[p.kernel];
  // NCHW callers get NCHW back (the one conversion out).
  return p.convert_layout ? out.contiguous() : out;
}

at::Tensor conv_bn_act_cuda(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
                            const at::Tensor& running_mean, const at::Tensor& running_var, double eps,
                            const std::optional<at::Tensor>& residual, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, int64_t act_code,
                            double act_a, double act_b) {
  const Activation<double> act = make_activation(act_code, act_a, act_b, "conv_bn_act");
  // The conv and the launches must target input's GPU, not the current one.
  // Only guard a CUDA input: a CPU input reaches here when another argument
  // is on the GPU, and the driver reports that mismatch by name.
  c10::cuda::OptionalCUDAGuard guard;
  if (input.is_cuda()) guard.set_device(input.device());
  if (auto fused = try_cutlass(input, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps, residual,
                               stride, padding, dilation, groups, act)) {
    return *fused;
  }
  return conv_bn_act(input, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps, residual, stride,
                     padding, dilation, groups, act, &cuda_epilogue);
}

}  // namespace

int cutlass_can_implement(int kernel, const cutlass_plan::ConvShape& shape) {
  const CutlassKernel* k = built_kernel(kernel);
  return k == nullptr ? -1 : (k->can_implement(shape) ? 1 : 0);
}

std::vector<int64_t> cutlass_dispatch_counts() {
  std::vector<int64_t> counts;
  for (const auto& c : dispatch_counts) counts.push_back(c.load());
  return counts;
}

TORCH_LIBRARY_IMPL(resnet_fused, CUDA, m) {
  m.impl("conv_bn_act", &conv_bn_act_cuda);
}

}  // namespace resnet_fused
