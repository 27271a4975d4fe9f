// CPU entry points of the training BatchNorm ops: the kernels (bn_act_loops.h)
// compiled once per instruction set, and the copy cpu_isa::current() names
// (isa.h) called through the shared driver (bn_act.h).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "bn_act.h"
#include "epilogue.h"
#include "isa.h"


namespace resnet_fused {

#define RF_CPU_ISA baseline
#include "bn_act_loops.h"
#undef RF_CPU_ISA

#if RF_CPU_MULTI_ISA
#pragma GCC push_options
#pragma GCC target("avx2")
#define RF_CPU_ISA avx2
#include "bn_act_loops.h"
#undef RF_CPU_ISA
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2")
#define RF_CPU_ISA avx512
#include "bn_act_loops.h"
#undef RF_CPU_ISA
#pragma GCC pop_options
#endif

namespace {

// The kernels of the instruction set cpu_isa::current() names.
const BnActKernels& cpu_kernels() {
#if RF_CPU_MULTI_ISA
  switch (cpu_isa::current()) {
    case cpu_isa::kAvx512:
      return avx512::kernels;
    case cpu_isa::kAvx2:
      return avx2::kernels;
    default:
      break;
  }
#endif
  return baseline::kernels;
}

std::tuple<at::Tensor, at::Tensor> bn_stats_cpu(const at::Tensor& y) {
  return bn_stats(y, cpu_kernels());
}

at::Tensor bn_act_apply_cpu(const at::Tensor& y, const at::Tensor& mean, const at::Tensor& var,
                            const std::optional<at::Tensor>& gamma, const std::optional<at::Tensor>& beta, double eps,
                            const std::optional<at::Tensor>& residual, int64_t act, double act_a, double act_b) {
  return bn_act_apply(y, mean, var, gamma, beta, eps, residual, act, act_a, act_b, cpu_kernels());
}

std::tuple<at::Tensor, at::Tensor> bn_act_backward_reduce_cpu(const at::Tensor& grad_out, const at::Tensor& out,
                                                              const at::Tensor& y, const at::Tensor& mean,
                                                              const at::Tensor& var,
                                                              const std::optional<at::Tensor>& gamma,
                                                              const std::optional<at::Tensor>& beta, double eps,
                                                              int64_t act, double act_a, double act_b) {
  return bn_act_backward_reduce(grad_out, out, y, mean, var, gamma, beta, eps, act, act_a, act_b, cpu_kernels());
}

std::tuple<at::Tensor, at::Tensor> bn_act_backward_apply_cpu(
    const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& y, const at::Tensor& mean,
    const at::Tensor& var, const std::optional<at::Tensor>& gamma, const std::optional<at::Tensor>& beta, double eps,
    const at::Tensor& sum_g, const at::Tensor& sum_g_xhat, int64_t count, bool training, int64_t act, double act_a,
    double act_b, bool residual_grad) {
  return bn_act_backward_apply(grad_out, out, y, mean, var, gamma, beta, eps, sum_g, sum_g_xhat, count, training, act,
                               act_a, act_b, residual_grad, cpu_kernels());
}

void bn_update_running_stats_cpu(at::Tensor& running_mean, at::Tensor& running_var, const at::Tensor& mean,
                                 const at::Tensor& var, int64_t count, double momentum) {
  bn_update_running_stats_(running_mean, running_var, mean, var, count, momentum, cpu_kernels());
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CPU, m) {
  m.impl("bn_stats", &bn_stats_cpu);
  m.impl("bn_act_apply", &bn_act_apply_cpu);
  m.impl("bn_act_backward_reduce", &bn_act_backward_reduce_cpu);
  m.impl("bn_act_backward_apply", &bn_act_backward_apply_cpu);
  m.impl("bn_update_running_stats_", &bn_update_running_stats_cpu);
}

}  // namespace resnet_fused
