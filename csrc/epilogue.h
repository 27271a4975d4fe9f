// Per-element math shared by the CPU (csrc/cpu) and CUDA (csrc/cuda) kernels.
// One definition means the CPU tests exercise the exact code the GPU runs.
//
// Everything here works on the accumulation type acc_t (float for half and
// bfloat16, see at::opmath_type): callers widen on load and narrow on store, so
// a residual add and ReLU round once, like the unfused PyTorch ops.
#pragma once

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

}  // namespace resnet_fused
