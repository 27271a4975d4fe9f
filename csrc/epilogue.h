// Per-element and per-channel math shared by the CPU (csrc/cpu) and CUDA
// (csrc/cuda) kernels. One definition means the CPU tests exercise the exact
// arithmetic the GPU runs.
//
// Everything here works on the accumulation type acc_t (float for half and
// bfloat16, see at::opmath_type; double for double): callers widen on load and
// narrow on store, so the BN affine, residual add and ReLU round once.
#pragma once

#include <math.h>

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define RF_HOST_DEVICE __host__ __device__
#else
#define RF_HOST_DEVICE
#endif

namespace resnet_fused {

// `v < 0 ? 0 : v` rather than fmax(v, 0): a NaN compares false, so it passes
// through, matching torch.relu (fmax would turn NaN into 0 and hide bugs).
template <typename acc_t>
RF_HOST_DEVICE inline acc_t relu(acc_t v) {
  return v < acc_t(0) ? acc_t(0) : v;
}

// out = act(y [+ residual]), the last two ops of a ResNet block.
template <typename acc_t>
RF_HOST_DEVICE inline acc_t residual_add_act(acc_t y, acc_t residual, bool has_residual, bool apply_relu) {
  const acc_t v = has_residual ? y + residual : y;
  return apply_relu ? relu(v) : v;
}

// a * b, rounded on its own. nvcc contracts `a * b + c` into an fma by default
// and g++ on x86-64 cannot (no FMA in the baseline ISA); an explicitly rounded
// multiply keeps the two devices bit-identical.
RF_HOST_DEVICE inline float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
RF_HOST_DEVICE inline double mul_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

// Explicit overloads: a bare sqrt(float) on the host can resolve to the double
// ::sqrt and round twice. Both are IEEE correctly rounded (no fast math).
RF_HOST_DEVICE inline float sqrt_rn(float v) { return sqrtf(v); }
RF_HOST_DEVICE inline double sqrt_rn(double v) { return sqrt(v); }

// Eval-mode BN of channel k as y * scale + shift:
//   scale = gamma / sqrt(var + eps)
//   shift = beta + (conv_bias - mean) * scale
// A true division by the sqrt, not rsqrt (approximate on the GPU), keeps scale
// within an ulp of torch.batch_norm.
template <typename acc_t>
RF_HOST_DEVICE inline acc_t bn_scale(acc_t gamma, acc_t var, acc_t eps) {
  return gamma / sqrt_rn(var + eps);
}

template <typename acc_t>
RF_HOST_DEVICE inline acc_t bn_shift(acc_t beta, acc_t conv_bias, acc_t mean, acc_t scale) {
  return beta + mul_rn(conv_bias - mean, scale);
}

// The raw per-channel inputs, contiguous, in acc_t. A null pointer is an
// absent optional tensor and reads as its identity (gamma 1, beta 0, bias 0).
template <typename acc_t>
struct BnParams {
  const acc_t* conv_bias;
  const acc_t* weight;
  const acc_t* bias;
  const acc_t* mean;
  const acc_t* var;
  acc_t eps;
};

template <typename acc_t>
RF_HOST_DEVICE inline void bn_fold(const BnParams<acc_t>& p, int64_t k, acc_t& scale, acc_t& shift) {
  scale = bn_scale(p.weight ? p.weight[k] : acc_t(1), p.var[k], p.eps);
  shift = bn_shift(p.bias ? p.bias[k] : acc_t(0), p.conv_bias ? p.conv_bias[k] : acc_t(0), p.mean[k], scale);
}

// out = act(y * scale + shift [+ residual]) for one element of channel k.
template <typename acc_t>
RF_HOST_DEVICE inline acc_t bn_residual_act(acc_t y, acc_t scale, acc_t shift, acc_t residual, bool has_residual,
                                            bool apply_relu) {
  return residual_add_act(mul_rn(y, scale) + shift, residual, has_residual, apply_relu);
}

}  // namespace resnet_fused
