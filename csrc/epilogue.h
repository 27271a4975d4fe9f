// Per-element and per-channel math shared by the CPU (csrc/cpu) and CUDA
// (csrc/cuda) kernels. One definition means the CPU tests exercise the exact
// arithmetic the GPU runs.
//
// Everything here works on the accumulation type acc_t (float for half and
// bfloat16, see at::opmath_type; double for double): callers widen on load and
// narrow on store, so the BN affine, residual add and activation round once.
#pragma once

#include <float.h>
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

// ---------------------------------------------------------------------------
// Activations, once for every C++ kernel (the Triton twin is
// ops/triton/activation.py, the specification reference.activate and
// activate_grad: torch.nn.functional and ATen's backward functions). The
// values are resnet_fused.ops.activation.Kind's, which the ops receive as an
// int code with two float parameters a, b: Hardtanh's (min_val, max_val),
// LeakyReLU's negative_slope in a; unused otherwise.
enum class ActKind : int {
  kIdentity = 0, kRelu = 1, kHardtanh = 2, kLeakyRelu = 3, kSilu = 4, kHardswish = 5, kGelu = 6, kGeluTanh = 7
};
inline constexpr int kNumActKinds = 8;
// For the error an unknown code raises.
inline constexpr const char* kActKindList =
    "0 (identity), 1 (ReLU), 2 (Hardtanh), 3 (LeakyReLU), 4 (SiLU), 5 (Hardswish), 6 (GELU), 7 (GELU tanh)";

template <typename acc_t>
struct Activation {
  ActKind kind;
  acc_t a, b;
};

RF_HOST_DEVICE inline float exp_(float v) { return expf(v); }
RF_HOST_DEVICE inline double exp_(double v) { return exp(v); }
RF_HOST_DEVICE inline float erf_(float v) { return erff(v); }
RF_HOST_DEVICE inline double erf_(double v) { return erf(v); }
RF_HOST_DEVICE inline float tanh_(float v) { return tanhf(v); }
RF_HOST_DEVICE inline double tanh_(double v) { return tanh(v); }

// GELU's constants as ATen writes them: 1/√2, 1/√(2π), √(2/π) and the tanh
// form's cubic coefficient.
inline constexpr double kSqrtHalf = 0.70710678118654752440;
inline constexpr double kInvSqrt2Pi = 0.39894228040143267794;
inline constexpr double kSqrt2OverPi = 0.79788456080286535588;
inline constexpr double kGeluKappa = 0.044715;

// √(2/π)·(v + κ·v³), the tanh form's argument.
template <typename acc_t>
RF_HOST_DEVICE inline acc_t gelu_tanh_inner(acc_t v) {
  return acc_t(kSqrt2OverPi) * (v + acc_t(kGeluKappa) * v * v * v);
}

// act(v) for the kind K, a compile-time constant, so a CPU loop specialized
// on it stays branch-free (and vectorizes). Every comparison is written so
// that NaN propagates as in torch: it compares false and passes through.
template <ActKind K, typename acc_t>
RF_HOST_DEVICE inline acc_t activate(acc_t v, acc_t a, acc_t b) {
  if constexpr (K == ActKind::kRelu) {
    return relu(v);
  } else if constexpr (K == ActKind::kHardtanh) {
    return v < a ? a : (v > b ? b : v);  // torch.clamp's order
  } else if constexpr (K == ActKind::kLeakyRelu) {
    return v > acc_t(0) ? v : mul_rn(v, a);
  } else if constexpr (K == ActKind::kSilu) {
    return v / (acc_t(1) + exp_(-v));  // ATen's form; exp(-v) = inf gives -0
  } else if constexpr (K == ActKind::kHardswish) {
    const acc_t t = v + acc_t(3);
    return mul_rn(v, t < acc_t(0) ? acc_t(0) : (t > acc_t(6) ? acc_t(6) : t)) / acc_t(6);  // ATen's order
  } else if constexpr (K == ActKind::kGelu) {
    return v * acc_t(0.5) * (acc_t(1) + erf_(v * acc_t(kSqrtHalf)));
  } else if constexpr (K == ActKind::kGeluTanh) {
    return acc_t(0.5) * v * (acc_t(1) + tanh_(gelu_tanh_inner(v)));
  } else {
    return v;
  }
}

// dL/dz from g = dL/d act(z): v is the output for ReLU (threshold_backward's
// mask out <= 0, through which a NaN output passes its gradient), unused for
// the identity, and the pre-activation z for every other kind, whose
// derivative the output does not determine (needs_preactivation in
// resnet_fused/ops/activation.py). Each branch is ATen's backward of the kind.
template <ActKind K, typename acc_t>
RF_HOST_DEVICE inline acc_t activate_grad(acc_t g, acc_t v, acc_t a, acc_t b) {
  if constexpr (K == ActKind::kRelu) {
    return v <= acc_t(0) ? acc_t(0) : g;
  } else if constexpr (K == ActKind::kHardtanh) {
    return (v <= a || v >= b) ? acc_t(0) : g;
  } else if constexpr (K == ActKind::kLeakyRelu) {
    return v > acc_t(0) ? g : mul_rn(g, a);
  } else if constexpr (K == ActKind::kSilu) {
    const acc_t s = acc_t(1) / (acc_t(1) + exp_(-v));
    return mul_rn(mul_rn(g, s), acc_t(1) + mul_rn(v, acc_t(1) - s));
  } else if constexpr (K == ActKind::kHardswish) {
    return v <= acc_t(-3) ? acc_t(0) : (v < acc_t(3) ? mul_rn(g, v / acc_t(3) + acc_t(0.5)) : g);
  } else if constexpr (K == ActKind::kGelu) {
    // Φ(v) + v·φ(v)
    const acc_t cdf = acc_t(0.5) * (acc_t(1) + erf_(v * acc_t(kSqrtHalf)));
    const acc_t pdf = acc_t(kInvSqrt2Pi) * exp_(acc_t(-0.5) * v * v);
    return mul_rn(g, cdf + v * pdf);
  } else if constexpr (K == ActKind::kGeluTanh) {
    // ½(1 + t) + ½v·(1 − t²)·√(2/π)·(1 + 3κv²), t = tanh(inner)
    const acc_t t = tanh_(gelu_tanh_inner(v));
    const acc_t right = acc_t(0.5) * v * (acc_t(1) - t * t) * acc_t(kSqrt2OverPi) *
                        (acc_t(1) + acc_t(3 * kGeluKappa) * v * v);
    return mul_rn(g, acc_t(0.5) * (acc_t(1) + t) + right);
  } else {
    return g;
  }
}

// Whether the derivative reads the pre-activation z (see activate_grad).
RF_HOST_DEVICE inline bool needs_preactivation(ActKind kind) {
  return kind != ActKind::kIdentity && kind != ActKind::kRelu;
}

// The same with the kind known at run time (the CUDA kernels: a warp-uniform
// branch costs nothing next to the memory traffic, and one kernel serves
// every kind).
template <typename acc_t>
RF_HOST_DEVICE inline acc_t activate(acc_t v, const Activation<acc_t>& act) {
  switch (act.kind) {
    case ActKind::kRelu: return activate<ActKind::kRelu>(v, act.a, act.b);
    case ActKind::kHardtanh: return activate<ActKind::kHardtanh>(v, act.a, act.b);
    case ActKind::kLeakyRelu: return activate<ActKind::kLeakyRelu>(v, act.a, act.b);
    case ActKind::kSilu: return activate<ActKind::kSilu>(v, act.a, act.b);
    case ActKind::kHardswish: return activate<ActKind::kHardswish>(v, act.a, act.b);
    case ActKind::kGelu: return activate<ActKind::kGelu>(v, act.a, act.b);
    case ActKind::kGeluTanh: return activate<ActKind::kGeluTanh>(v, act.a, act.b);
    default: return v;
  }
}

template <typename acc_t>
RF_HOST_DEVICE inline acc_t activate_grad(acc_t g, acc_t v, const Activation<acc_t>& act) {
  switch (act.kind) {
    case ActKind::kRelu: return activate_grad<ActKind::kRelu>(g, v, act.a, act.b);
    case ActKind::kHardtanh: return activate_grad<ActKind::kHardtanh>(g, v, act.a, act.b);
    case ActKind::kLeakyRelu: return activate_grad<ActKind::kLeakyRelu>(g, v, act.a, act.b);
    case ActKind::kSilu: return activate_grad<ActKind::kSilu>(g, v, act.a, act.b);
    case ActKind::kHardswish: return activate_grad<ActKind::kHardswish>(g, v, act.a, act.b);
    case ActKind::kGelu: return activate_grad<ActKind::kGelu>(g, v, act.a, act.b);
    case ActKind::kGeluTanh: return activate_grad<ActKind::kGeluTanh>(g, v, act.a, act.b);
    default: return g;
  }
}

// out = act(y [+ residual]), the last two ops of a ResNet block.
template <typename acc_t>
RF_HOST_DEVICE inline acc_t residual_add_act(acc_t y, acc_t residual, bool has_residual, const Activation<acc_t>& act) {
  return activate(has_residual ? y + residual : y, act);
}

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

// The BN affine of one element of channel k: the pre-activation without
// residual, as the forward computes it (the backward recomputes z with it).
template <typename acc_t>
RF_HOST_DEVICE inline acc_t bn_affine(acc_t y, acc_t scale, acc_t shift) {
  return mul_rn(y, scale) + shift;
}

// out = act(y * scale + shift [+ residual]) for one element of channel k,
// the kind a compile-time constant (CPU loops).
template <ActKind K, typename acc_t>
RF_HOST_DEVICE inline acc_t bn_residual_act(acc_t y, acc_t scale, acc_t shift, acc_t residual, bool has_residual,
                                            acc_t a, acc_t b) {
  const acc_t z = bn_affine(y, scale, shift);
  return activate<K>(has_residual ? z + residual : z, a, b);
}

// The same with the kind known at run time (CUDA kernels).
template <typename acc_t>
RF_HOST_DEVICE inline acc_t bn_residual_act(acc_t y, acc_t scale, acc_t shift, acc_t residual, bool has_residual,
                                            const Activation<acc_t>& act) {
  return residual_add_act(bn_affine(y, scale, shift), residual, has_residual, act);
}

// g = dL/dz of one element of the training backward from its grad_out: ReLU
// reads the forward output, the kinds that need z recompute it from the conv
// output y with the forward's scale and shift (bn_fold). That z has no
// residual: those kinds come without one under autograd (training.py).
template <ActKind K, typename acc_t>
RF_HOST_DEVICE inline acc_t preactivation_grad(acc_t grad_out, acc_t out, acc_t y, acc_t scale, acc_t shift, acc_t a,
                                               acc_t b) {
  if constexpr (K == ActKind::kRelu) {
    return activate_grad<K>(grad_out, out, a, b);
  } else if constexpr (K == ActKind::kIdentity) {
    return grad_out;
  } else {
    return activate_grad<K>(grad_out, bn_affine(y, scale, shift), a, b);
  }
}

template <typename acc_t>
RF_HOST_DEVICE inline acc_t preactivation_grad(acc_t grad_out, acc_t out, acc_t y, acc_t scale, acc_t shift,
                                               const Activation<acc_t>& act) {
  if (act.kind == ActKind::kRelu) return activate_grad<ActKind::kRelu>(grad_out, out, act.a, act.b);
  return needs_preactivation(act.kind) ? activate_grad(grad_out, bn_affine(y, scale, shift), act) : grad_out;
}

// ---------------------------------------------------------------------------
// The sm80 CUTLASS kernels' scaled filter (cuda/cutlass/cutlass_sm80.cuh): the
// BN scale is multiplied into a 16-bit copy of the filter, w * scale[k]. For a
// channel with a tiny running variance that product can pass the dtype's
// largest value and round to inf (and a dead input channel then turns
// 0 * inf into NaN), where eager PyTorch, which scales the conv output in
// fp32, stays finite. So the copy holds w * scale[k] * 2^-e, with e the
// smallest exponent >= 0 that brings every product of the filter into range,
// and the epilogue multiplies the fp32 accumulators by 2^e. Powers of two:
// neither step rounds (except products pushed below the dtype's normal range),
// and e = 0, every filter without the hazard, keeps the kernel's arithmetic
// exactly as it was. One e per convolution, not per channel: the CUTLASS 2.x
// epilogue has one per-channel vector, which carries the shift.

// The largest finite float16 and bfloat16 values.
inline constexpr float kHalfMax = 0x1.ffcp15f;      // 65504
inline constexpr float kBFloat16Max = 0x1.fep127f;  // about 3.39e38

// One filter element's |w * scale|; e follows from the largest over the filter.
RF_HOST_DEVICE inline float scaled_filter_magnitude(float w, float scale) { return fabsf(mul_rn(w, scale)); }

// e for a filter whose largest |w * scale| is max_abs, limit being the
// dtype's largest value. inf or NaN (scale inf from var + eps == 0, or a NaN
// parameter) gets 0: no exponent makes it finite, and the output is then
// non-finite as eager's is.
RF_HOST_DEVICE inline int filter_scale_exponent(float max_abs, float limit) {
  if (!(max_abs <= FLT_MAX)) return 0;
  int e = 0;
  for (; max_abs > limit; ++e) max_abs *= 0.5f;
  return e;
}

// One element of the scaled filter before its cast to the 16-bit dtype (the
// kernel's only rounding of it): a value at most limit in magnitude, so the
// cast stays finite.
RF_HOST_DEVICE inline float scaled_filter_value(float w, float scale, int e) { return ldexpf(mul_rn(w, scale), -e); }

// The epilogue's factor on the accumulators, 2^e.
RF_HOST_DEVICE inline float filter_scale_gain(int e) { return ldexpf(1.0f, e); }

// ---------------------------------------------------------------------------
// Training-mode BatchNorm (the bn_act ops, csrc/bn_act.h). Same conventions:
// acc_t math, mul_rn wherever nvcc would otherwise fuse a multiply into the
// next add, correctly rounded sqrt and division.

// 1 / sqrt(var + eps), as torch computes invstd (not rsqrt: approximate on GPUs).
template <typename acc_t>
RF_HOST_DEVICE inline acc_t bn_invstd(acc_t var, acc_t eps) {
  return acc_t(1) / sqrt_rn(var + eps);
}

// count values summarized by their mean and M2 = sum (y - mean)^2. The count
// stays an integer: a float count stops being exact past 2^24 values.
//
// Chunk moments and their merges are kept in double for every input dtype.
// A float chunk mean is only good to ulp(mean), and when |mean| >> std the
// chunk means differ by about std / sqrt(chunk size), which can be that ulp
// itself (mean 1000, std 0.01: both ~6e-5): Chan's between-chunk term
// delta^2 * n_a n_b / n would then be mostly rounding (measured: 4e-5
// relative error in var). It costs nothing: there is one Moments per chunk
// and channel, and the per-element passes stay in acc_t.
struct Moments {
  double mean;
  double m2;
  int64_t count;
};

// Second pass over a cached chunk, given its first-pass mean m: d += y - m and
// q += (y - m)^2. Squares of centred values never cancel, unlike the raw sum
// of y^2 (E[y^2] - E[y]^2 loses every digit when |mean| >> std).
template <typename acc_t>
RF_HOST_DEVICE inline void centered_accumulate(acc_t y, acc_t m, acc_t& d, acc_t& q) {
  const acc_t c = y - m;
  d = d + c;
  q = q + mul_rn(c, c);
}

// A chunk's moments from its first-pass mean m and the centred sums d, q over
// count values: the corrected two-pass algorithm (Chan, Golub & LeVeque 1983).
// m carries the rounding error of the first-pass sum; d/count is that error,
// so mean = m + d/count is accurate (in double, finer than ulp(m)) and
// q - d^2/count removes its effect on M2. The clamp keeps a rounding-negative
// M2 at 0 and lets NaN through.
template <typename acc_t>
RF_HOST_DEVICE inline Moments chunk_moments(acc_t m, acc_t d, acc_t q, int64_t count) {
  const double d_over_n = static_cast<double>(d) / static_cast<double>(count);
  return {static_cast<double>(m) + d_over_n, relu(static_cast<double>(q) - mul_rn(static_cast<double>(d), d_over_n)),
          count};
}

// Chan et al.'s parallel merge of two disjoint sets' moments:
//   mean = mean_a + delta * n_b / n,  M2 = M2_a + M2_b + delta^2 * n_a * n_b / n
// with delta = mean_b - mean_a. An empty side returns the other unchanged, so
// an all-zero Moments is the identity of a reduction.
RF_HOST_DEVICE inline Moments chan_merge(const Moments& a, const Moments& b) {
  if (b.count == 0) return a;
  if (a.count == 0) return b;
  const int64_t n = a.count + b.count;
  const double nb_over_n = static_cast<double>(b.count) / static_cast<double>(n);
  const double delta = b.mean - a.mean;
  const double weight = mul_rn(static_cast<double>(a.count), nb_over_n);  // n_a * n_b / n
  return {a.mean + mul_rn(delta, nb_over_n), (a.m2 + b.m2) + mul_rn(mul_rn(delta, delta), weight), n};
}

// Batch mean and biased variance M2 / count, rounded once to acc_t. No values
// (count 0): NaN for both, as torch.var_mean of an empty reduction.
template <typename acc_t>
RF_HOST_DEVICE inline void moments_finalize(const Moments& m, acc_t& mean, acc_t& var) {
  if (m.count == 0) {
    mean = var = static_cast<acc_t>(NAN);  // math.h's NAN works in host and device code
    return;
  }
  mean = static_cast<acc_t>(m.mean);
  var = static_cast<acc_t>(m.m2 / static_cast<double>(m.count));
}

// One element's share of the backward reductions: sum_g += g and
// sum_gc += g * (y - mean). sum_gc * invstd is sum(g * xhat); multiplying once
// per channel instead of per element saves a multiply per value.
template <typename acc_t>
RF_HOST_DEVICE inline void bn_backward_accumulate(acc_t g, acc_t y, acc_t mean, acc_t& sum_g, acc_t& sum_gc) {
  sum_g = sum_g + g;
  sum_gc = sum_gc + mul_rn(g, y - mean);
}

// sum(g * xhat) from the chunk-merged sum(g * (y - mean)) (kept in double like
// the Moments merges): invstd applied once per channel.
template <typename acc_t>
RF_HOST_DEVICE inline acc_t bn_sum_g_xhat(double sum_gc, acc_t var, acc_t eps) {
  return static_cast<acc_t>(sum_gc * static_cast<double>(bn_invstd(var, eps)));
}

// The per-channel constants of dy = scale * (g - mean_g - xhat * mean_g_xhat),
// xhat = (y - mean) * invstd, scale = gamma * invstd, mean_g = sum_g / M,
// mean_g_xhat = sum(g * xhat) / M (M = count values per channel). In eval the
// statistics are constants, dy = scale * g, and the sums are not used.
template <typename acc_t>
struct BnBackwardCoeffs {
  acc_t mean, invstd, scale, mean_g, mean_g_xhat;
};

template <typename acc_t>
RF_HOST_DEVICE inline BnBackwardCoeffs<acc_t> bn_backward_coeffs(acc_t mean, acc_t var, acc_t gamma, acc_t eps,
                                                                 acc_t sum_g, acc_t sum_g_xhat, acc_t count,
                                                                 bool training) {
  const acc_t invstd = bn_invstd(var, eps);
  const acc_t mean_g = training ? sum_g / count : acc_t(0);
  const acc_t mean_g_xhat = training ? sum_g_xhat / count : acc_t(0);
  return {mean, invstd, mul_rn(invstd, gamma), mean_g, mean_g_xhat};
}

// dy for one element, in the reference's order of operations:
//   training: (g - mean_g - xhat * mean_g_xhat) * scale;  eval: g * scale.
// y is centred before any product, so a large mean costs no precision.
template <typename acc_t>
RF_HOST_DEVICE inline acc_t bn_backward_dy(acc_t g, acc_t y, acc_t mean, acc_t invstd, acc_t scale, acc_t mean_g,
                                           acc_t mean_g_xhat, bool training) {
  if (!training) return mul_rn(g, scale);
  const acc_t xhat = mul_rn(y - mean, invstd);
  return mul_rn((g - mean_g) - mul_rn(xhat, mean_g_xhat), scale);
}

// One running-statistic step, as nn.BatchNorm2d in training:
//   running = momentum * batch + (1 - momentum) * running.
// For the variance the caller passes batch = var * M / (M - 1), the unbiased
// estimate (bn_unbiased_var).
template <typename acc_t>
RF_HOST_DEVICE inline acc_t running_stat_step(acc_t running, acc_t batch, acc_t momentum) {
  return mul_rn(momentum, batch) + mul_rn(acc_t(1) - momentum, running);
}

// var * M / (M - 1) with the factor M / (M - 1) formed once by the caller.
template <typename acc_t>
RF_HOST_DEVICE inline acc_t bn_unbiased_var(acc_t var, acc_t bessel) {
  return mul_rn(var, bessel);
}

}  // namespace resnet_fused
