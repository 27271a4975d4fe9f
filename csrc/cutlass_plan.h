// Host-side choice for the cuda backend's conv_bn_act: which CUTLASS
// implicit-GEMM kernel runs a convolution, or why it goes to the exact path
// (cuDNN + one epilogue pass, csrc/conv_bn_act.h) instead.
//
// Plain C++ on plain integers, with no CUDA, CUTLASS or torch header:
// bindings.cpp compiles it with g++ in every build (RESNET_FUSED_NO_CUDA
// included) and exposes plan_conv() to Python as
// resnet_fused._C.cuda_conv_plan, so the CPU tests check the same function the
// CUDA op calls on every launch.
//
// The checks mirror what the kernels' own CUTLASS can_implement() tests (the
// CUDA build also exposes those, as _C.cutlass_can_implement, and the CPU
// tests assert that both agree), plus the rules of this project: 16-bit
// dtypes only, groups == 1, tensors small enough for 32-bit offsets, and an
// activation the kernel's epilogue applies (sm90_applies).
#pragma once

#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

#include "epilogue.h"  // ActKind (plain C++ too)

namespace resnet_fused {
namespace cutlass_plan {

enum class DType : int { kHalf, kBFloat16, kFloat, kDouble, kOther };

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::kHalf: return "float16";
    case DType::kBFloat16: return "bfloat16";
    case DType::kFloat: return "float32";
    case DType::kDouble: return "float64";
    default: return "other";
  }
}

// One fprop problem in NHWC terms: input (N, H, W, C), filter (K, R, S, C/groups),
// output (N, P, Q, K). P and Q are computed from the rest (conv_output_size).
struct ConvShape {
  int64_t N = 0, H = 0, W = 0, C = 0;
  int64_t K = 0, R = 0, S = 0;
  int64_t pad_h = 0, pad_w = 0, stride_h = 1, stride_w = 1, dil_h = 1, dil_w = 1;
  int64_t groups = 1;
  DType dtype = DType::kHalf;
  // The caller's layout: true for channels_last (NHWC-dense) input, false for
  // NCHW, which the CUTLASS path converts to channels_last and back.
  bool channels_last = true;

  int64_t P() const { return (H + 2 * pad_h - dil_h * (R - 1) - 1) / stride_h + 1; }
  int64_t Q() const { return (W + 2 * pad_w - dil_w * (S - 1) - 1) / stride_w + 1; }
  int64_t gemm_m() const { return N * P() * Q(); }  // output pixels
};

// The GPU the kernel would run on: compute capability and SM count.
struct Device {
  int major = 0, minor = 0;
  int sm_count = 0;
};

// What this binary contains: an sm_90a cubin of the sm90 kernels, and the
// cubin archs (80, 86, 90, ...) of the sm80 kernels. setup.py decides both
// from TORCH_CUDA_ARCH_LIST and passes them as macros (compiled_build()).
struct Build {
  bool sm90a = false;
  std::vector<int> sm80_cubins;
};

enum class Arch : int { kSm90, kSm80 };

// Every kernel this project can build: one CUTLASS instantiation, one .cu file
// (csrc/cuda/cutlass/cutlass_<name>.cu), one entry here, in this order.
struct KernelConfig {
  const char* name;
  Arch arch;
  DType dtype;
  int tile_m, tile_n, tile_k;
};

inline constexpr KernelConfig kKernels[] = {
    {"sm90_f16_128x128x64", Arch::kSm90, DType::kHalf, 128, 128, 64},
    {"sm90_f16_128x64x64", Arch::kSm90, DType::kHalf, 128, 64, 64},
    {"sm90_bf16_128x128x64", Arch::kSm90, DType::kBFloat16, 128, 128, 64},
    {"sm90_bf16_128x64x64", Arch::kSm90, DType::kBFloat16, 128, 64, 64},
    {"sm80_f16_128x128x32", Arch::kSm80, DType::kHalf, 128, 128, 32},
    {"sm80_f16_128x64x32", Arch::kSm80, DType::kHalf, 128, 64, 32},
    {"sm80_bf16_128x128x32", Arch::kSm80, DType::kBFloat16, 128, 128, 32},
    {"sm80_bf16_128x64x32", Arch::kSm80, DType::kBFloat16, 128, 64, 32},
};
inline constexpr int kNumKernels = sizeof(kKernels) / sizeof(kKernels[0]);

constexpr bool same_name(const char* a, const char* b) {
  while (*a != '\0' && *a == *b) ++a, ++b;
  return *a == *b;
}

// -1 when no kernel has that name; constexpr so a kernel file can assert its index.
constexpr int kernel_index(const char* name) {
  for (int i = 0; i < kNumKernels; ++i) {
    if (same_name(name, kKernels[i].name)) return i;
  }
  return -1;
}

struct Plan {
  int kernel = -1;             // index into kKernels; -1: the exact path (cuDNN + epilogue)
  std::string reason;          // why this kernel, or why the exact path
  bool convert_layout = false;  // NCHW input: one copy to channels_last in, one back out
  bool fused() const { return kernel >= 0; }
  std::string name() const { return fused() ? kKernels[kernel].name : "fallback"; }
};

// Both kernel families read and write 16-byte vectors of 8 16-bit elements
// along the channel dimension (TMA on sm90, cp.async / st.global.v4 on sm80).
inline constexpr int64_t kAlignElements = 8;
// Largest tensor, in elements, either kernel family is allowed: CUTLASS 2.x
// requires bytes < 2^31 and CUTLASS 3.x linearizes the GEMM M extent into an
// int; 2^30 16-bit elements satisfies both with room to spare.
inline constexpr int64_t kMaxElements = int64_t(1) << 30;

namespace detail {

inline std::string shape_str(int64_t a, int64_t b) { return std::to_string(a) + "x" + std::to_string(b); }

// sm90 (CUTLASS 3.x ConvUniversal, TMA im2col): the limits of
// CollectiveConv::can_implement for 2 spatial dims (rank-4 im2col tensor maps):
// padding in [0, 256], im2col box corners in [-128, 127] and filter offsets
// (R-1)*dilation in [0, 254]. Plus one can_implement does not test: the conv
// stride is the tensor map's traversal stride, which cuTensorMapEncodeIm2col
// accepts only in [1, 8]; CUTLASS checks the encode result with assert(), which
// -DNDEBUG compiles out, so a larger stride would launch with a bad descriptor.
inline constexpr int64_t kMaxTmaTraversalStride = 8;

inline std::string sm90_rejects(const ConvShape& s) {
  if (s.stride_h > kMaxTmaTraversalStride || s.stride_w > kMaxTmaTraversalStride) {
    return "stride " + shape_str(s.stride_h, s.stride_w) + " above 8 (TMA im2col traversal stride)";
  }
  const int64_t corner_lo_h = -s.pad_h, corner_lo_w = -s.pad_w;
  const int64_t corner_hi_h = s.pad_h - (s.R - 1) * s.dil_h, corner_hi_w = s.pad_w - (s.S - 1) * s.dil_w;
  for (int64_t c : {corner_lo_h, corner_lo_w, corner_hi_h, corner_hi_w}) {
    if (c < -128 || c > 127) return "TMA im2col corner " + std::to_string(c) + " outside [-128, 127]";
  }
  if (s.pad_h > 256 || s.pad_w > 256) return "TMA im2col padding above 256";
  if ((s.R - 1) * s.dil_h >= 255 || (s.S - 1) * s.dil_w >= 255) return "TMA im2col filter offset above 254";
  return "";
}

// sm80 (CUTLASS 2.x kOptimized fprop iterators): the filter position mask has
// 32 bits per dimension.
inline std::string sm80_rejects(const ConvShape& s) {
  if (s.R > 32 || s.S > 32) return "filter " + shape_str(s.R, s.S) + " larger than 32x32 (sm80 iterator mask)";
  return "";
}

// Both launch grid.y = tiles along K, which CUDA caps at 65535.
inline bool grid_fits(const ConvShape& s) { return (s.K + 63) / 64 <= 65535; }

inline bool has_sm80_cubin(const Build& b, const Device& d) {
  // A cubin runs on GPUs of its major version with an equal or higher minor.
  for (int a : b.sm80_cubins) {
    if (a / 10 == d.major && a % 10 <= d.minor) return true;
  }
  return false;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The tile heuristic, the same for both archs (tile M is always 128):
//  1. the N tile (output channels) that wastes less of K: 64 when K is not a
//     multiple of 128 (K = 64, 192, ...), which would leave half a 128 tile idle;
//  2. with no waste either way, 128 (more reuse of each input tile), unless
//     the grid of 128x128 tiles is less than one wave on this GPU: then 64
//     doubles the CTAs for the small late-stage problems at small batch.
inline int pick_tile_n(const ConvShape& s, const Device& d) {
  const int64_t pad128 = ceil_div(s.K, 128) * 128, pad64 = ceil_div(s.K, 64) * 64;
  if (pad64 < pad128) return 64;
  const int64_t ctas128 = ceil_div(s.gemm_m(), 128) * ceil_div(s.K, 128);
  return ctas128 < d.sm_count ? 64 : 128;
}

// The sm90 epilogue's activation is CUTLASS's Clamp with run-time bounds
// (cutlass_sm90.cuh): [-inf, inf] is the identity, [0, inf] ReLU and [a, b]
// Hardtanh. LeakyReLU, SiLU, Hardswish and GELU are no clamp; an sm90 functor with
// run-time (kind, a, b) would need its own fusion callbacks in CUTLASS's
// visitor tree, so on Hopper they take the exact path (one cuDNN conv and
// one epilogue pass, which applies every kind). The sm80 epilogue is ours and
// applies every kind at run time (cutlass_sm80.cuh).
inline bool sm90_applies(ActKind act) {
  return act == ActKind::kIdentity || act == ActKind::kRelu || act == ActKind::kHardtanh;
}

inline const char* act_name(ActKind act) {
  switch (act) {
    case ActKind::kIdentity: return "identity";
    case ActKind::kRelu: return "ReLU";
    case ActKind::kHardtanh: return "Hardtanh";
    case ActKind::kLeakyRelu: return "LeakyReLU";
    case ActKind::kSilu: return "SiLU";
    case ActKind::kHardswish: return "Hardswish";
    case ActKind::kGelu: return "GELU";
    case ActKind::kGeluTanh: return "GELU (tanh)";
  }
  return "unknown";
}

inline int find_kernel(Arch arch, DType dtype, int tile_n) {
  for (int i = 0; i < kNumKernels; ++i) {
    const KernelConfig& k = kKernels[i];
    if (k.arch == arch && k.dtype == dtype && k.tile_n == tile_n) return i;
  }
  return -1;
}

}  // namespace detail

// The exact shape-level decision; the caller adds the run-time ones (pointer
// alignment, CUTLASS's own can_implement, launch status), each of which also
// falls back to the exact path. act: the activation the epilogue applies.
inline Plan plan_conv(const ConvShape& s, const Device& d, const Build& b, ActKind act) {
  Plan plan;
  auto fallback = [&](const std::string& why) {
    plan.kernel = -1;
    plan.reason = why;
    return plan;
  };
  if (s.dtype != DType::kHalf && s.dtype != DType::kBFloat16) {
    return fallback(std::string("dtype ") + dtype_name(s.dtype) + ": the CUTLASS kernels are float16/bfloat16 only");
  }
  if (s.groups != 1) return fallback("grouped convolution (groups=" + std::to_string(s.groups) + ")");
  if (s.N < 1 || s.H < 1 || s.W < 1 || s.C < 1 || s.K < 1 || s.R < 1 || s.S < 1 || s.stride_h < 1 ||
      s.stride_w < 1 || s.dil_h < 1 || s.dil_w < 1 || s.pad_h < 0 || s.pad_w < 0) {
    return fallback("empty or invalid shape");
  }
  if (s.H + 2 * s.pad_h - s.dil_h * (s.R - 1) - 1 < 0 || s.W + 2 * s.pad_w - s.dil_w * (s.S - 1) - 1 < 0) {
    return fallback("the dilated filter is larger than the padded input");
  }
  if (s.C % kAlignElements != 0) {
    return fallback("C=" + std::to_string(s.C) + " input channels, not a multiple of 8 (16-byte vectors)");
  }
  if (s.K % kAlignElements != 0) {
    return fallback("K=" + std::to_string(s.K) + " output channels, not a multiple of 8 (16-byte vectors)");
  }
  if (s.N * s.H * s.W * s.C >= kMaxElements || s.K * s.R * s.S * s.C >= kMaxElements ||
      s.gemm_m() * s.K >= kMaxElements) {
    return fallback("a tensor with 2^30 or more elements (32-bit offsets)");
  }
  if (!detail::grid_fits(s)) return fallback("K=" + std::to_string(s.K) + " needs more than 65535 tiles");

  const int tile_n = detail::pick_tile_n(s, d);
  std::string sm90_why;
  if (d.major == 9 && d.minor == 0 && b.sm90a) {
    sm90_why = detail::sm90_rejects(s);
    if (sm90_why.empty() && !detail::sm90_applies(act)) {
      return fallback(std::string("activation ") + detail::act_name(act) +
                      ": the sm90 epilogue applies clamps only (identity, ReLU, Hardtanh)");
    }
    if (sm90_why.empty()) {
      plan.kernel = detail::find_kernel(Arch::kSm90, s.dtype, tile_n);
      plan.reason = "sm90 TMA + wgmma, tile N " + std::to_string(tile_n);
      plan.convert_layout = !s.channels_last;
      return plan;
    }
    sm90_why = "sm90 kernel rejected (" + sm90_why + "); ";
  }
  if (!detail::has_sm80_cubin(b, d)) {
    return fallback(sm90_why + "no CUTLASS kernel built for sm_" + std::to_string(d.major) + std::to_string(d.minor));
  }
  const std::string sm80_why = detail::sm80_rejects(s);
  if (!sm80_why.empty()) return fallback(sm90_why + sm80_why);
  plan.kernel = detail::find_kernel(Arch::kSm80, s.dtype, tile_n);
  plan.reason = sm90_why + "sm80 cp.async + mma.sync, tile N " + std::to_string(tile_n);
  plan.convert_layout = !s.channels_last;
  return plan;
}

// Whether the op may pick the sm90 family (default true). Tests turn it off to
// run the sm80 kernels' sm_90 cubins on a Hopper GPU. One flag for the whole
// extension: an inline function's static is shared by its translation units.
inline std::atomic<bool>& sm90_enabled() {
  static std::atomic<bool> enabled{true};
  return enabled;
}

// The choice the cuda op makes for a launch: plan_conv over the kernels of
// `build` that the run-time switch allows. The op calls this on every launch
// and _C.cuda_conv_plan calls it too, so an inspected plan is the one that runs.
inline Plan plan_launch(const ConvShape& s, const Device& d, Build build, ActKind act) {
  build.sm90a = build.sm90a && sm90_enabled().load();
  return plan_conv(s, d, build, act);
}

// What setup.py compiled into this binary (macros; none in a CPU-only build).
inline Build compiled_build() {
  Build b;
#if defined(RESNET_FUSED_CUTLASS_SM90)
  b.sm90a = true;
#endif
#if defined(RESNET_FUSED_CUTLASS_SM80_ARCHS)
  // "80;90": the cubin archs of the sm80 kernels.
  const std::string archs = RESNET_FUSED_CUTLASS_SM80_ARCHS;
  size_t start = 0;
  while (start < archs.size()) {
    size_t end = archs.find(';', start);
    if (end == std::string::npos) end = archs.size();
    if (end > start) b.sm80_cubins.push_back(std::stoi(archs.substr(start, end - start)));
    start = end + 1;
  }
#endif
  return b;
}

}  // namespace cutlass_plan

#if defined(RESNET_FUSED_WITH_CUDA)
// CUTLASS's own can_implement() for one kernel of this binary, run on the host
// (no GPU needed), defined in csrc/cuda/conv_bn_act.cu. Returns -1 when that
// kernel is not built here, else 0/1.
int cutlass_can_implement(int kernel, const cutlass_plan::ConvShape& shape);
// Launches since import: one count per kKernels entry, then the plan's
// fallbacks to the exact path, then run-time fallbacks (CUTLASS refused the
// problem, a pointer was misaligned, or the launch failed).
std::vector<int64_t> cutlass_dispatch_counts();
#endif

}  // namespace resnet_fused
