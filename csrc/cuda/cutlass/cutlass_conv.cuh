// The boundary between the torch side of the cuda conv_bn_act op
// (csrc/cuda/conv_bn_act.cu) and the CUTLASS kernels (cutlass_sm90_*.cu,
// cutlass_sm80_*.cu, next to this file): raw pointers and integers only. The
// kernel files include no torch header, which keeps each heavy CUTLASS
// translation unit as small as it can be and lets setup.py compile them with
// their own arch flags.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>

#include "cutlass_plan.h"
#include "epilogue.h"

namespace resnet_fused {

// One fused launch: out = act(conv(x, w) * scale[k] + shift[k] [+ residual]),
// act any kind on sm80 and a clamp on sm90 (cutlass_plan::detail::sm90_applies).
// Every tensor is dense, 16-byte aligned, in the shape's dtype.
struct ConvLaunch {
  cutlass_plan::ConvShape shape;
  const void* x;         // input    (N, H, W, C) NHWC
  const void* w;         // filter   (K, R, S, C) KRSC; on sm80 already multiplied by scale[k] * 2^-e
  const void* residual;  // residual (N, P, Q, K) NHWC, or nullptr
  void* out;             // output   (N, P, Q, K) NHWC
  const float* scale;    // (K,) BN scale, fp32; read by the sm90 epilogue only
  const float* shift;    // (K,) BN shift (conv bias folded in), fp32
  const int* exponent;   // sm80: e of the filter's 2^-e (epilogue.h), one int of device memory; nullptr: e = 0
  Activation<float> act;
  void* workspace;       // workspace_size(shape) bytes of device memory, or nullptr when 0
  cudaStream_t stream;
};

// What conv_bn_act.cu needs from one instantiation. Status codes are
// cutlass::Status values (0 = success), or 100 + a cudaError_t from the launch.
struct CutlassKernel {
  int config;  // index into cutlass_plan::kKernels
  bool (*can_implement)(const cutlass_plan::ConvShape& shape);  // host only, no GPU needed
  size_t (*workspace_size)(const cutlass_plan::ConvShape& shape);
  int (*run)(const ConvLaunch& launch);
};

// One per kernel file; the names are kKernels[i].name with a cutlass_ prefix.
extern const CutlassKernel cutlass_sm90_f16_128x128x64;
extern const CutlassKernel cutlass_sm90_f16_128x64x64;
extern const CutlassKernel cutlass_sm90_bf16_128x128x64;
extern const CutlassKernel cutlass_sm90_bf16_128x64x64;
extern const CutlassKernel cutlass_sm80_f16_128x128x32;
extern const CutlassKernel cutlass_sm80_f16_128x64x32;
extern const CutlassKernel cutlass_sm80_bf16_128x128x32;
extern const CutlassKernel cutlass_sm80_bf16_128x64x32;

inline constexpr int kLaunchErrorBase = 100;

}  // namespace resnet_fused
