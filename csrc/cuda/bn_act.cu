// CUDA kernels of the training BatchNorm ops (csrc/bn_act.h drives them,
// csrc/epilogue.h holds their math, the same code the CPU kernels run).
//
// Reductions (bn_stats, bn_act_backward_reduce) are two-stage and
// deterministic: stage 1 reduces fixed chunks (Chunking: from the shape, not
// the grid) into a per-chunk partials buffer, one block per chunk, with a
// fixed shuffle/shared-memory tree; stage 2 merges each channel's partials in
// a fixed order, one block per channel. No float atomics anywhere, so the
// result is bit-identical from run to run and GPU to GPU of one arch.
// Elementwise passes (apply, backward apply) walk the dense tensors as flat
// arrays with a grid-stride loop; the channel of flat index i is
// (i / inner) % K, inner = H*W for NCHW and 1 for channels_last.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <type_traits>

#include "bn_act.h"
#include "epilogue.h"

namespace resnet_fused {
namespace {

constexpr int kThreads = 256;  // 1-D blocks
constexpr int kWarps = kThreads / 32;
// NCHW stage 1: a block holds a chunk of kThreads * kPlaneItems = 4096 values
// of one plane in registers, kPlaneItems per thread, for both passes.
constexpr int kPlaneItems = 16;
// channels_last stage 1: blocks of 32 channels x 8 row lanes; a chunk is
// kRowLanes * kRowItems = 128 rows, kRowItems per thread, in registers.
constexpr int kColThreads = 32;
constexpr int kRowLanes = 8;
constexpr int kRowItems = 16;

Chunking cuda_chunking(const BnActView& v) {
  return make_chunking(v, int64_t{kThreads} * kPlaneItems, int64_t{kRowLanes} * kRowItems);
}

// Sum over a 1-D block of kThreads, returned to every thread: a fixed shuffle
// tree per warp, then the kWarps warp sums in warp order. smem: kWarps values.
template <typename T>
__device__ T block_sum(T v, T* smem) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  if (threadIdx.x % 32 == 0) smem[threadIdx.x / 32] = v;
  __syncthreads();
  T total = smem[0];
  for (int w = 1; w < kWarps; ++w) total += smem[w];
  __syncthreads();  // smem is reused by the next call
  return total;
}

// Sum over the kRowLanes threads of a channels_last block's column (one
// channel), returned to each of them, in row-lane order.
// smem: kRowLanes x kColThreads values
template <typename T>
__device__ T column_sum(T v, T (*smem)[kColThreads]) {
  smem[threadIdx.y][threadIdx.x] = v;
  __syncthreads();
  T total = smem[0][threadIdx.x];
  for (int r = 1; r < kRowLanes; ++r) total += smem[r][threadIdx.x];
  __syncthreads();
  return total;
}

// One wave of resident blocks for the grid-stride elementwise kernels. Device
// attributes, not getCurrentDeviceProperties(): see conv_bn_act.cu.
unsigned int elementwise_blocks(int64_t n) {
  const int device = c10::cuda::current_device();
  int sms = 0, threads_per_sm = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&threads_per_sm, cudaDevAttrMaxThreadsPerMultiProcessor, device));
  const int64_t wave = static_cast<int64_t>(sms) * (threads_per_sm / kThreads);
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min(wave, (n + kThreads - 1) / kThreads)));
}

unsigned int blocks_for(int64_t n) {
  return static_cast<unsigned int>((n + kThreads - 1) / kThreads);
}

// Stage-1 grid limits: x up to 2^31 - 1, y up to 65535.
void check_grid(int64_t x, int64_t y, const char* op) {
  TORCH_CHECK(x <= std::numeric_limits<int>::max() && y <= 65535, op,
              ": tensor too large for the CUDA reduction grid (", x, " x ", y, " blocks)");
}

// (i / inner) % K along a grid-stride loop without a 64-bit division per
// element: divide once, then advance (i % inner, channel) by the constant
// step as a mixed-radix counter (adds and compares only).
struct ChannelWalker {
  int64_t r, k, step_r, step_k, inner, K;

  __device__ ChannelWalker(int64_t i, int64_t step, int64_t inner_, int64_t K_)
      : r(i % inner_), k((i / inner_) % K_), step_r(step % inner_), step_k((step / inner_) % K_), inner(inner_),
        K(K_) {}

  __device__ void advance() {
    r += step_r;
    const bool carry = r >= inner;
    if (carry) r -= inner;
    k += step_k + carry;  // < 2K, so one subtraction wraps it
    if (k >= K) k -= K;
  }
};

// ---------------------------------------------------------------- bn_stats

// Stage 1, NCHW: one block per chunk of a plane; two passes over registers.
// y:         (N, K, HW) NCHW-contiguous
// part_mean: (chunks, K) double out, chunk c = n * ch.per_group + s
// part_m2:   (chunks, K) double out
// grid:      N * K * ch.per_group blocks, plane-major
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    stats_plane_kernel(const scalar_t* __restrict__ y, int64_t K, Chunking ch, double* __restrict__ part_mean,
                       double* __restrict__ part_m2) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t smem[kWarps];
  const int64_t plane = blockIdx.x / ch.per_group, s = blockIdx.x % ch.per_group;
  const int64_t count = ch.count(s);
  const scalar_t* p = y + plane * ch.extent + s * ch.len;
  acc_t v[kPlaneItems];
  acc_t sum = acc_t(0);
#pragma unroll
  for (int i = 0; i < kPlaneItems; ++i) {
    const int64_t j = static_cast<int64_t>(i) * kThreads + threadIdx.x;
    v[i] = j < count ? static_cast<acc_t>(p[j]) : acc_t(0);
    sum += v[i];
  }
  const acc_t m = block_sum(sum, smem) / static_cast<acc_t>(count);
  acc_t d = acc_t(0), q = acc_t(0);
#pragma unroll
  for (int i = 0; i < kPlaneItems; ++i) {
    if (static_cast<int64_t>(i) * kThreads + threadIdx.x < count) centered_accumulate(v[i], m, d, q);
  }
  d = block_sum(d, smem);
  q = block_sum(q, smem);
  if (threadIdx.x == 0) {
    const Moments chunk = chunk_moments(m, d, q, count);
    const int64_t at = ((plane / K) * ch.per_group + s) * K + plane % K;
    part_mean[at] = chunk.mean;
    part_m2[at] = chunk.m2;
  }
}

// Stage 1, channels_last: one block per (row chunk, 32-channel tile).
// y:         (N*HW, K) row-major
// part_mean: (chunks, K) double out
// part_m2:   (chunks, K) double out
// grid:      (ch.chunks, ceil(K / 32)), block (32, 8)
template <typename scalar_t>
__global__ void __launch_bounds__(kColThreads* kRowLanes)
    stats_rows_kernel(const scalar_t* __restrict__ y, int64_t K, Chunking ch, double* __restrict__ part_mean,
                      double* __restrict__ part_m2) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t smem[kRowLanes][kColThreads];
  const int64_t c = blockIdx.x;
  const int64_t k = static_cast<int64_t>(blockIdx.y) * kColThreads + threadIdx.x;
  const int64_t rows = ch.count(c);
  const bool active = k < K;
  const scalar_t* p = y + c * ch.len * K + k;
  acc_t v[kRowItems];
  acc_t sum = acc_t(0);
#pragma unroll
  for (int i = 0; i < kRowItems; ++i) {
    const int64_t r = static_cast<int64_t>(i) * kRowLanes + threadIdx.y;
    v[i] = active && r < rows ? static_cast<acc_t>(p[r * K]) : acc_t(0);
    sum += v[i];
  }
  const acc_t m = column_sum(sum, smem) / static_cast<acc_t>(rows);
  acc_t d = acc_t(0), q = acc_t(0);
#pragma unroll
  for (int i = 0; i < kRowItems; ++i) {
    if (static_cast<int64_t>(i) * kRowLanes + threadIdx.y < rows) centered_accumulate(v[i], m, d, q);
  }
  d = column_sum(d, smem);
  q = column_sum(q, smem);
  if (threadIdx.y == 0 && active) {
    const Moments chunk = chunk_moments(m, d, q, rows);
    part_mean[c * K + k] = chunk.mean;
    part_m2[c * K + k] = chunk.m2;
  }
}

// Stage 2: one block per channel merges its chunks with Chan's formula,
// thread t taking chunks t, t + kThreads, ... in order, then a fixed tree.
// part_mean, part_m2: (chunks, K) double
// mean, var:          (K,) acc_t out
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    stats_combine_kernel(const double* __restrict__ part_mean, const double* __restrict__ part_m2, Chunking ch,
                         int64_t K, acc_t* __restrict__ mean, acc_t* __restrict__ var) {
  __shared__ Moments smem[kThreads];
  const int64_t k = blockIdx.x;
  Moments acc{0.0, 0.0, 0};
  for (int64_t c = threadIdx.x; c < ch.chunks; c += kThreads) {
    acc = chan_merge(acc, Moments{part_mean[c * K + k], part_m2[c * K + k], ch.count(c)});
  }
  smem[threadIdx.x] = acc;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (static_cast<int>(threadIdx.x) < stride) {
      smem[threadIdx.x] = chan_merge(smem[threadIdx.x], smem[threadIdx.x + stride]);
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) moments_finalize(smem[0], mean[k], var[k]);
}

void stats_cuda(const at::Tensor& y, const BnActView& v, at::Tensor& mean, at::Tensor& var) {
  const Chunking ch = cuda_chunking(v);
  const int64_t K = v.K;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  // Partials in double, see Moments in epilogue.h.
  const at::Tensor part = at::empty({2, ch.chunks, K}, mean.options().dtype(at::kDouble));
  double* part_mean = part.mutable_data_ptr<double>();
  double* part_m2 = part_mean + ch.chunks * K;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "bn_stats_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    if (v.channels_last) {
      const int64_t tiles = (K + kColThreads - 1) / kColThreads;
      check_grid(ch.chunks, tiles, "bn_stats");
      const dim3 grid(static_cast<unsigned int>(ch.chunks), static_cast<unsigned int>(tiles));
      stats_rows_kernel<scalar_t><<<grid, dim3(kColThreads, kRowLanes), 0, stream>>>(yp, K, ch, part_mean, part_m2);
    } else {
      const int64_t blocks = v.N * K * ch.per_group;
      check_grid(blocks, 1, "bn_stats");
      stats_plane_kernel<scalar_t><<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(yp, K, ch, part_mean,
                                                                                               part_m2);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    stats_combine_kernel<acc_t><<<static_cast<unsigned int>(K), kThreads, 0, stream>>>(
        part_mean, part_m2, ch, K, mean.mutable_data_ptr<acc_t>(), var.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// ---------------------------------------------------------------- bn_act_apply

// scale[k], shift[k] from the raw tensors, one thread per channel.
template <typename acc_t>
__global__ void fold_kernel(BnParams<acc_t> p, int64_t K, acc_t* __restrict__ scale, acc_t* __restrict__ shift) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k < K) bn_fold(p, k, scale[k], shift[k]);
}

// y, residual, out: n values each, dense in one layout (residual null: none)
// scale, shift:     (K,) acc_t
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    apply_kernel(const scalar_t* __restrict__ y, const scalar_t* __restrict__ residual,
                 const at::opmath_type<scalar_t>* __restrict__ scale,
                 const at::opmath_type<scalar_t>* __restrict__ shift, int64_t n, int64_t inner, int64_t K,
                 Activation<at::opmath_type<scalar_t>> act, scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  const bool has_res = residual != nullptr;
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x;
  int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (ChannelWalker ch(i, step, inner, K); i < n; i += step, ch.advance()) {
    const acc_t res = has_res ? static_cast<acc_t>(residual[i]) : acc_t(0);
    out[i] = static_cast<scalar_t>(
        bn_residual_act<acc_t>(static_cast<acc_t>(y[i]), scale[ch.k], shift[ch.k], res, has_res, act));
  }
}

// Row 0 scale, row 1 shift of the BN affine (bn_fold), on the device.
template <typename acc_t>
at::Tensor fold_channels(const ChannelParams& bn, int64_t K, const at::Tensor& like, cudaStream_t stream) {
  at::Tensor folded = at::empty({2, K}, like.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  acc_t* scale = folded.mutable_data_ptr<acc_t>();
  fold_kernel<acc_t><<<blocks_for(K), kThreads, 0, stream>>>(bn.pointers<acc_t>(), K, scale, scale + K);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return folded;
}

void apply_cuda(const at::Tensor& y, const ChannelParams& bn, const at::Tensor& residual, const BnActView& v,
                const Activation<double>& act, at::Tensor& out) {
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n = y.numel(), K = v.K, inner = v.channels_last ? 1 : v.HW;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "bn_act_apply_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor folded = fold_channels<acc_t>(bn, K, y, stream);
    const acc_t* scale = folded.const_data_ptr<acc_t>();
    apply_kernel<scalar_t><<<elementwise_blocks(n), kThreads, 0, stream>>>(
        y.const_data_ptr<scalar_t>(), residual.defined() ? residual.const_data_ptr<scalar_t>() : nullptr, scale,
        scale + K, n, inner, K, activation_as<acc_t>(act), out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// ---------------------------------------------------------------- bn_act_backward_reduce

// g = dL/dz of one element (preactivation_grad), the kinds that need z
// compiled only into the kPreact instantiation of a kernel: the ReLU/identity
// one keeps the registers it had before the other kinds existed, without
// spills. (The switch over every kind, inlined into the unrolled reductions
// below, spills a little under their launch bounds: ptxas -v reported 8 bytes
// in the float NCHW kernel for sm_80 and 112 in the double channels_last one
// for sm_90; with kPreact that is left to the kinds past ReLU.)
template <bool kPreact, typename acc_t>
__device__ inline acc_t grad_z(acc_t grad_out, acc_t out, acc_t y, acc_t scale, acc_t shift,
                               const Activation<acc_t>& act) {
  if constexpr (kPreact) {
    return preactivation_grad(grad_out, out, y, scale, shift, act);
  } else {
    return act.kind == ActKind::kRelu ? activate_grad<ActKind::kRelu>(grad_out, out, act.a, act.b) : grad_out;
  }
}

// Stage 1, NCHW: per-chunk sum(g) and sum(g * (y - mean)), one block per chunk.
// grad, out, y: (N, K, HW) NCHW-contiguous (out null unless ReLU)
// mean:         (K,) acc_t
// fold:         (2, K) acc_t, the BN affine's scale and shift (read when act needs z)
// part_g, part_gc: (chunks, K) double out
template <typename scalar_t, bool kPreact>
__global__ void __launch_bounds__(kThreads)
    backward_sums_plane_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ out,
                               const scalar_t* __restrict__ y, const at::opmath_type<scalar_t>* __restrict__ mean,
                               const at::opmath_type<scalar_t>* __restrict__ fold, int64_t K, Chunking ch,
                               Activation<at::opmath_type<scalar_t>> act, double* __restrict__ part_g,
                               double* __restrict__ part_gc) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t smem[kWarps];
  const int64_t plane = blockIdx.x / ch.per_group, s = blockIdx.x % ch.per_group, k = plane % K;
  const int64_t count = ch.count(s);
  const int64_t base = plane * ch.extent + s * ch.len;
  const acc_t mk = mean[k], zscale = fold[k], zshift = fold[K + k];
  acc_t sg = acc_t(0), sgc = acc_t(0);
#pragma unroll
  for (int i = 0; i < kPlaneItems; ++i) {
    const int64_t j = base + static_cast<int64_t>(i) * kThreads + threadIdx.x;
    if (j - base < count) {
      const acc_t go = static_cast<acc_t>(grad[j]);
      const acc_t o = out != nullptr ? static_cast<acc_t>(out[j]) : go;
      const acc_t g = grad_z<kPreact>(go, o, static_cast<acc_t>(y[j]), zscale, zshift, act);
      bn_backward_accumulate(g, static_cast<acc_t>(y[j]), mk, sg, sgc);
    }
  }
  sg = block_sum(sg, smem);
  sgc = block_sum(sgc, smem);
  if (threadIdx.x == 0) {
    const int64_t at = ((plane / K) * ch.per_group + s) * K + k;
    part_g[at] = sg;
    part_gc[at] = sgc;
  }
}

// Stage 1, channels_last: one block per (row chunk, 32-channel tile).
// grad, out, y: (N*HW, K) row-major (out null unless ReLU)
// mean:         (K,) acc_t
// fold:         (2, K) acc_t, the BN affine's scale and shift (read when act needs z)
// part_g, part_gc: (chunks, K) double out
template <typename scalar_t, bool kPreact>
__global__ void __launch_bounds__(kColThreads* kRowLanes)
    backward_sums_rows_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ out,
                              const scalar_t* __restrict__ y, const at::opmath_type<scalar_t>* __restrict__ mean,
                              const at::opmath_type<scalar_t>* __restrict__ fold, int64_t K, Chunking ch,
                              Activation<at::opmath_type<scalar_t>> act, double* __restrict__ part_g,
                              double* __restrict__ part_gc) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t smem[kRowLanes][kColThreads];
  const int64_t c = blockIdx.x;
  const int64_t k = static_cast<int64_t>(blockIdx.y) * kColThreads + threadIdx.x;
  const int64_t rows = ch.count(c);
  const bool active = k < K;
  const acc_t mk = active ? mean[k] : acc_t(0);
  const acc_t zscale = active ? fold[k] : acc_t(0), zshift = active ? fold[K + k] : acc_t(0);
  acc_t sg = acc_t(0), sgc = acc_t(0);
#pragma unroll
  for (int i = 0; i < kRowItems; ++i) {
    const int64_t r = static_cast<int64_t>(i) * kRowLanes + threadIdx.y;
    if (active && r < rows) {
      const int64_t j = (c * ch.len + r) * K + k;
      const acc_t go = static_cast<acc_t>(grad[j]);
      const acc_t o = out != nullptr ? static_cast<acc_t>(out[j]) : go;
      const acc_t g = grad_z<kPreact>(go, o, static_cast<acc_t>(y[j]), zscale, zshift, act);
      bn_backward_accumulate(g, static_cast<acc_t>(y[j]), mk, sg, sgc);
    }
  }
  sg = column_sum(sg, smem);
  sgc = column_sum(sgc, smem);
  if (threadIdx.y == 0 && active) {
    part_g[c * K + k] = sg;
    part_gc[c * K + k] = sgc;
  }
}

// Stage 2: one block per channel sums its chunks (strided, then a fixed tree).
// part_g, part_gc:   (chunks, K) double
// var:               (K,) acc_t
// sum_g, sum_g_xhat: (K,) acc_t out
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    backward_sums_combine_kernel(const double* __restrict__ part_g, const double* __restrict__ part_gc,
                                 int64_t chunks, int64_t K, const acc_t* __restrict__ var, acc_t eps,
                                 acc_t* __restrict__ sum_g, acc_t* __restrict__ sum_g_xhat) {
  __shared__ double sg[kThreads], sgc[kThreads];
  const int64_t k = blockIdx.x;
  double a = 0.0, b = 0.0;
  for (int64_t c = threadIdx.x; c < chunks; c += kThreads) {
    a += part_g[c * K + k];
    b += part_gc[c * K + k];
  }
  sg[threadIdx.x] = a;
  sgc[threadIdx.x] = b;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (static_cast<int>(threadIdx.x) < stride) {
      sg[threadIdx.x] += sg[threadIdx.x + stride];
      sgc[threadIdx.x] += sgc[threadIdx.x + stride];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    sum_g[k] = static_cast<acc_t>(sg[0]);
    sum_g_xhat[k] = bn_sum_g_xhat(sgc[0], var[k], eps);
  }
}

void backward_reduce_cuda(const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& y,
                          const ChannelParams& bn, const BnActView& v, const Activation<double>& activation,
                          at::Tensor& sum_g, at::Tensor& sum_g_xhat) {
  const Chunking ch = cuda_chunking(v);
  const int64_t K = v.K;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor part = at::empty({2, ch.chunks, K}, sum_g.options().dtype(at::kDouble));
  double* part_g = part.mutable_data_ptr<double>();
  double* part_gc = part_g + ch.chunks * K;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "bn_act_backward_reduce_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto act = activation_as<acc_t>(activation);
    const scalar_t* gp = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* op = act.kind == ActKind::kRelu ? out.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    const acc_t* mp = bn.running_mean.const_data_ptr<acc_t>();
    const at::Tensor folded = fold_channels<acc_t>(bn, K, y, stream);  // to recompute z
    const acc_t* fp = folded.const_data_ptr<acc_t>();
    const auto launch = [&](auto preact) {
      constexpr bool kPreact = decltype(preact)::value;
      if (v.channels_last) {
        const int64_t tiles = (K + kColThreads - 1) / kColThreads;
        check_grid(ch.chunks, tiles, "bn_act_backward_reduce");
        const dim3 grid(static_cast<unsigned int>(ch.chunks), static_cast<unsigned int>(tiles));
        backward_sums_rows_kernel<scalar_t, kPreact><<<grid, dim3(kColThreads, kRowLanes), 0, stream>>>(
            gp, op, yp, mp, fp, K, ch, act, part_g, part_gc);
      } else {
        const int64_t blocks = v.N * K * ch.per_group;
        check_grid(blocks, 1, "bn_act_backward_reduce");
        backward_sums_plane_kernel<scalar_t, kPreact><<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(
            gp, op, yp, mp, fp, K, ch, act, part_g, part_gc);
      }
    };
    if (needs_preactivation(act.kind)) {
      launch(std::true_type{});
    } else {
      launch(std::false_type{});
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    backward_sums_combine_kernel<acc_t><<<static_cast<unsigned int>(K), kThreads, 0, stream>>>(
        part_g, part_gc, ch.chunks, K, bn.running_var.const_data_ptr<acc_t>(), static_cast<acc_t>(bn.eps),
        sum_g.mutable_data_ptr<acc_t>(), sum_g_xhat.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// ---------------------------------------------------------------- bn_act_backward_apply

// The per-channel constants of dy, one thread per channel.
// mean, var:         (K,) acc_t
// gamma, beta:       (K,) acc_t, null means 1, 0
// sum_g, sum_g_xhat: (K,) acc_t, null in eval
// coef:              (7, K) acc_t out, rows mean, invstd, scale, mean_g, mean_g_xhat,
//                    and the forward's BN affine z_scale, z_shift (bn_fold, to recompute z)
template <typename acc_t>
__global__ void backward_coeffs_kernel(const acc_t* __restrict__ mean, const acc_t* __restrict__ var,
                                       const acc_t* __restrict__ gamma, const acc_t* __restrict__ beta,
                                       const acc_t* __restrict__ sum_g, const acc_t* __restrict__ sum_g_xhat,
                                       acc_t eps, acc_t count, bool training, int64_t K, acc_t* __restrict__ coef) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= K) return;
  const auto c = bn_backward_coeffs(mean[k], var[k], gamma ? gamma[k] : acc_t(1), eps, sum_g ? sum_g[k] : acc_t(0),
                                    sum_g_xhat ? sum_g_xhat[k] : acc_t(0), count, training);
  coef[k] = c.mean;
  coef[K + k] = c.invstd;
  coef[2 * K + k] = c.scale;
  coef[3 * K + k] = c.mean_g;
  coef[4 * K + k] = c.mean_g_xhat;
  bn_fold(BnParams<acc_t>{nullptr, gamma, beta, mean, var, eps}, k, coef[5 * K + k], coef[6 * K + k]);
}

// grad, out, y:   n values each, dense in one layout (out null unless ReLU)
// coef:           (7, K) acc_t from backward_coeffs_kernel
// dy, d_residual: n values out, y's layout (d_residual null: not wanted)
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    backward_apply_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ out,
                          const scalar_t* __restrict__ y, const at::opmath_type<scalar_t>* __restrict__ coef, int64_t n,
                          int64_t inner, int64_t K, Activation<at::opmath_type<scalar_t>> act, bool training,
                          scalar_t* __restrict__ dy,
                          scalar_t* __restrict__ d_residual) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x;
  int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (ChannelWalker ch(i, step, inner, K); i < n; i += step, ch.advance()) {
    const int64_t k = ch.k;
    const acc_t go = static_cast<acc_t>(grad[i]);
    const acc_t o = out != nullptr ? static_cast<acc_t>(out[i]) : go;
    const acc_t g = preactivation_grad(go, o, static_cast<acc_t>(y[i]), coef[5 * K + k], coef[6 * K + k], act);
    dy[i] = static_cast<scalar_t>(bn_backward_dy(g, static_cast<acc_t>(y[i]), coef[k], coef[K + k], coef[2 * K + k],
                                                 coef[3 * K + k], coef[4 * K + k], training));
    if (d_residual != nullptr) d_residual[i] = static_cast<scalar_t>(g);
  }
}

void backward_apply_cuda(const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& y,
                         const BnBackwardInputs& p, const BnActView& v, const Activation<double>& act,
                         at::Tensor& dy, at::Tensor& d_residual) {
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n = y.numel(), K = v.K, inner = v.channels_last ? 1 : v.HW;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "bn_act_backward_apply_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor coef = at::empty({7, K}, y.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    const auto ptr = [](const at::Tensor& t) { return t.defined() ? t.const_data_ptr<acc_t>() : nullptr; };
    backward_coeffs_kernel<acc_t><<<blocks_for(K), kThreads, 0, stream>>>(
        ptr(p.mean), ptr(p.var), ptr(p.gamma), ptr(p.beta), ptr(p.sum_g), ptr(p.sum_g_xhat), static_cast<acc_t>(p.eps),
        static_cast<acc_t>(p.count), p.training, K, coef.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    backward_apply_kernel<scalar_t><<<elementwise_blocks(n), kThreads, 0, stream>>>(
        grad_out.const_data_ptr<scalar_t>(), act.kind == ActKind::kRelu ? out.const_data_ptr<scalar_t>() : nullptr,
        y.const_data_ptr<scalar_t>(), coef.const_data_ptr<acc_t>(), n, inner, K, activation_as<acc_t>(act), p.training,
        dy.mutable_data_ptr<scalar_t>(),
        d_residual.defined() ? d_residual.mutable_data_ptr<scalar_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// ---------------------------------------------------------------- bn_update_running_stats_

// running: (K,) in place; batch: (K,) in running's acc type.
template <typename scalar_t>
__global__ void running_stat_kernel(scalar_t* __restrict__ running, const at::opmath_type<scalar_t>* __restrict__ batch,
                                    at::opmath_type<scalar_t> factor, at::opmath_type<scalar_t> momentum, int64_t K) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k < K) {
    running[k] = static_cast<scalar_t>(
        running_stat_step(static_cast<acc_t>(running[k]), bn_unbiased_var(batch[k], factor), momentum));
  }
}

void running_stat_cuda(at::Tensor& running, const at::Tensor& batch, double factor, double momentum) {
  const int64_t K = running.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running.scalar_type(), "bn_running_stats_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    running_stat_kernel<scalar_t><<<blocks_for(K), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        running.mutable_data_ptr<scalar_t>(), batch.const_data_ptr<acc_t>(), static_cast<acc_t>(factor),
        static_cast<acc_t>(momentum), K);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// ---------------------------------------------------------------- registration

const BnActKernels kCudaKernels{&stats_cuda, &apply_cuda, &backward_reduce_cuda, &backward_apply_cuda,
                                &running_stat_cuda};

// Launch on the first tensor's GPU, not the current one. Only a CUDA tensor
// sets the guard: a CPU one reaches here when another argument is on the GPU,
// and the driver reports that mismatch by name.
std::optional<c10::Device> cuda_device_of(const at::Tensor& t) {
  return t.is_cuda() ? std::optional<c10::Device>(t.device()) : std::nullopt;
}

std::tuple<at::Tensor, at::Tensor> bn_stats_cuda(const at::Tensor& y) {
  const c10::cuda::OptionalCUDAGuard guard(cuda_device_of(y));
  return bn_stats(y, kCudaKernels);
}

at::Tensor bn_act_apply_cuda(const at::Tensor& y, const at::Tensor& mean, const at::Tensor& var,
                             const std::optional<at::Tensor>& gamma, const std::optional<at::Tensor>& beta,
                             double eps, const std::optional<at::Tensor>& residual, int64_t act, double act_a,
                             double act_b) {
  const c10::cuda::OptionalCUDAGuard guard(cuda_device_of(y));
  return bn_act_apply(y, mean, var, gamma, beta, eps, residual, act, act_a, act_b, kCudaKernels);
}

std::tuple<at::Tensor, at::Tensor> bn_act_backward_reduce_cuda(const at::Tensor& grad_out, const at::Tensor& out,
                                                               const at::Tensor& y, const at::Tensor& mean,
                                                               const at::Tensor& var,
                                                               const std::optional<at::Tensor>& gamma,
                                                               const std::optional<at::Tensor>& beta, double eps,
                                                               int64_t act, double act_a, double act_b) {
  const c10::cuda::OptionalCUDAGuard guard(cuda_device_of(y));
  return bn_act_backward_reduce(grad_out, out, y, mean, var, gamma, beta, eps, act, act_a, act_b, kCudaKernels);
}

std::tuple<at::Tensor, at::Tensor> bn_act_backward_apply_cuda(
    const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& y, const at::Tensor& mean,
    const at::Tensor& var, const std::optional<at::Tensor>& gamma, const std::optional<at::Tensor>& beta, double eps,
    const at::Tensor& sum_g, const at::Tensor& sum_g_xhat, int64_t count, bool training, int64_t act, double act_a,
    double act_b, bool residual_grad) {
  const c10::cuda::OptionalCUDAGuard guard(cuda_device_of(y));
  return bn_act_backward_apply(grad_out, out, y, mean, var, gamma, beta, eps, sum_g, sum_g_xhat, count, training, act,
                               act_a, act_b, residual_grad, kCudaKernels);
}

void bn_update_running_stats_cuda(at::Tensor& running_mean, at::Tensor& running_var, const at::Tensor& mean,
                                  const at::Tensor& var, int64_t count, double momentum) {
  const c10::cuda::OptionalCUDAGuard guard(cuda_device_of(running_mean));
  bn_update_running_stats_(running_mean, running_var, mean, var, count, momentum, kCudaKernels);
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CUDA, m) {
  m.impl("bn_stats", &bn_stats_cuda);
  m.impl("bn_act_apply", &bn_act_apply_cuda);
  m.impl("bn_act_backward_reduce", &bn_act_backward_reduce_cuda);
  m.impl("bn_act_backward_apply", &bn_act_backward_apply_cuda);
  m.impl("bn_update_running_stats_", &bn_update_running_stats_cuda);
}

}  // namespace resnet_fused
