// CUTLASS 3.x fprop for Hopper (sm_90a): implicit GEMM with TMA im2col loads
// and wgmma, whose epilogue applies BatchNorm, the residual and the ReLU:
//
//   out[m, k] = act(acc[m, k] * scale[k] + shift[k] + beta * residual[m, k])
//
// GEMM view of the convolution: M = (Q, P, N) output pixels, N = K output
// channels, K = (C, S, R) reduction. A per-output-channel vector is therefore
// a *row* broadcast (one value per GEMM column).
//
// The epilogue is CUTLASS's PerColLinCombPerColBiasEltAct:
//   act(beta * C + (alpha[col] * acc + bias[col]))
// with alpha = BN scale, bias = BN shift (conv bias folded in), C = residual
// and beta = 1, or beta = 0 without a residual: the visitor tree then never
// loads C (is_C_load_needed() is false), so C may point at the output.
// (PerColResAddPerColBiasEltAct would apply the activation before the add,
// which is not a ResNet block.) The activation is Clamp with run-time bounds:
// [0, +inf] is ReLU, [-inf, +inf] the identity and [a, b] Hardtanh (ReLU6 is
// [0, 6]), so one instantiation serves all three; Clamp propagates NaN as
// torch.clamp does. The other kinds never reach it: the plan sends them to
// the exact path (cutlass_plan::detail::sm90_applies).
//
// Included only by the cutlass_sm90_*.cu files, which setup.py compiles with
// -gencode arch=compute_90a,code=sm_90a (wgmma and TMA need the "a" target;
// plain sm_90 builds a kernel that only traps) and -DNDEBUG (without it ptxas
// serializes the wgmma pipeline).
#pragma once

#include <cutlass/kernel_hardware_info.hpp>  // before the conv headers, which use it undeclared
#include <cute/tensor.hpp>
#include <cutlass/conv/collective/collective_builder.hpp>
#include <cutlass/conv/convnd_problem_shape.hpp>
#include <cutlass/conv/device/conv_universal_adapter.hpp>
#include <cutlass/conv/dispatch_policy.hpp>
#include <cutlass/conv/kernel/conv_universal.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/epilogue/fusion/operations.hpp>
#include <cutlass/epilogue/thread/activation.h>

#include <limits>
#include <type_traits>

#include "cutlass_conv.cuh"

namespace resnet_fused {
namespace sm90 {

// Element: cutlass::half_t or cutlass::bfloat16_t. TileN: output channels per
// CTA (128, or 64 for K = 64-style layers and sub-wave grids, see
// cutlass_plan.h). Tile M 128 with one consumer warpgroup (the non-persistent
// KernelImplicitTmaWarpSpecializedSm90 schedule, the only sm90 conv schedule
// CUTLASS 4.2 implements), K tile 64 channels, cluster 1x1x1.
template <class Element, int TileN>
struct FpropBnAct {
  using ElementAcc = float;
  using ElementCompute = float;
  static constexpr int kAlign = 8;  // 16 bytes: TMA's alignment for C and K
  using Layout = cutlass::layout::TensorNHWC;  // activation NHWC, filter KRSC, output NPQK
  using TileShape = cute::Shape<cute::_128, cute::Int<TileN>, cute::Shape<cute::_64>>;
  using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;

  // Scale and shift stay fp32 (ElementScalar, ElementBias): exactly the
  // values bn_fold computed, no rounding to 16 bits.
  using Fusion = cutlass::epilogue::fusion::PerColLinCombPerColBiasEltAct<
      cutlass::epilogue::thread::Clamp, Element, ElementCompute, /*ElementBias=*/float,
      /*ElementSource=*/Element, /*ElementScalar=*/float>;

  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, ElementAcc, ElementCompute, Element, Layout, kAlign,
      Element, Layout, kAlign, cutlass::epilogue::TmaWarpSpecialized, Fusion>::CollectiveOp;

  using Mainloop = typename cutlass::conv::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, cutlass::conv::Operator::kFprop, Element, Layout, kAlign,
      Element, Layout, kAlign, ElementAcc, TileShape, ClusterShape,
      cutlass::conv::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      cutlass::conv::KernelImplicitTmaWarpSpecializedSm90>::CollectiveOp;

  using ProblemShape =
      cutlass::conv::ConvProblemShape<cutlass::conv::Operator::kFprop, Mainloop::DispatchPolicy::NumSpatialDimensions>;
  using Kernel = cutlass::conv::kernel::ConvUniversal<ProblemShape, Mainloop, Epilogue>;
  using Conv = cutlass::conv::device::ConvUniversalAdapter<Kernel>;
  using Arguments = typename Conv::Arguments;
  using StrideC = typename Kernel::StrideC;
  using StrideD = typename Kernel::StrideD;

  static ProblemShape problem(const cutlass_plan::ConvShape& s) {
    // Packed NHWC / KRSC strides; P and Q are derived by CUTLASS with the same
    // formula as torch (and cutlass_plan::ConvShape).
    return ProblemShape(cutlass::conv::Mode::kCrossCorrelation,
                        {static_cast<int>(s.N), static_cast<int>(s.H), static_cast<int>(s.W), static_cast<int>(s.C)},
                        {static_cast<int>(s.K), static_cast<int>(s.R), static_cast<int>(s.S), static_cast<int>(s.C)},
                        {static_cast<int>(s.pad_h), static_cast<int>(s.pad_w)},
                        {static_cast<int>(s.pad_h), static_cast<int>(s.pad_w)},
                        {static_cast<int>(s.stride_h), static_cast<int>(s.stride_w)},
                        {static_cast<int>(s.dil_h), static_cast<int>(s.dil_w)}, 1);
  }

  static Arguments arguments(const ConvLaunch& l) {
    const ProblemShape shape = problem(l.shape);
    // The output's (Q, P, N) strides for the epilogue's hierarchical M mode,
    // from the packed (N, P, Q, K) strides CUTLASS computed.
    StrideC stride_c{};
    StrideD stride_d{};
    cute::for_each(cute::make_seq<cute::rank<0>(StrideC{})>{}, [&](auto i) {
      cute::get<0, i>(stride_c) = shape.stride_C[ProblemShape::RankT - 2 - i];
    });
    cute::for_each(cute::make_seq<cute::rank<0>(StrideD{})>{}, [&](auto i) {
      cute::get<0, i>(stride_d) = shape.stride_C[ProblemShape::RankT - 2 - i];
    });
    const auto* x = static_cast<const Element*>(l.x);
    const auto* w = static_cast<const Element*>(l.w);
    auto* out = static_cast<Element*>(l.out);
    // Without a residual beta is 0 and C is never read; C still needs a valid
    // address for its TMA descriptor, so it points at the output.
    const auto* c = l.residual != nullptr ? static_cast<const Element*>(l.residual) : out;
    Arguments args{shape, {x, w}, {{}, c, stride_c, out, stride_d}};
    auto& fusion = args.epilogue.thread;
    fusion.alpha_ptr = l.scale;  // per-column vector (dAlpha defaults to {0, 1, 0})
    fusion.bias_ptr = l.shift;
    fusion.beta = l.residual != nullptr ? 1.0f : 0.0f;
    const float inf = std::numeric_limits<float>::infinity();
    float lower = -inf, upper = inf;  // the identity
    if (l.act.kind == ActKind::kRelu) lower = 0.0f;
    if (l.act.kind == ActKind::kHardtanh) lower = l.act.a, upper = l.act.b;
    fusion.activation.lower_bound = lower;
    fusion.activation.upper_bound = upper;
    return args;
  }

  static bool can_implement(const cutlass_plan::ConvShape& s) {
    ConvLaunch l{};  // null pointers: can_implement reads shapes and strides only
    l.shape = s;
    return Conv::can_implement(arguments(l)) == cutlass::Status::kSuccess;
  }

  static size_t workspace_size(const cutlass_plan::ConvShape& s) {
    ConvLaunch l{};
    l.shape = s;
    return Conv::get_workspace_size(arguments(l));
  }

  static int run(const ConvLaunch& l) {
    // A kind that is no clamp would run as the identity: refuse (the op then
    // takes the exact path), though the plan never sends one.
    if (!cutlass_plan::detail::sm90_applies(l.act.kind)) return static_cast<int>(cutlass::Status::kErrorNotSupported);
    const Arguments args = arguments(l);
    Conv conv;
    cutlass::Status status = conv.can_implement(args);
    if (status != cutlass::Status::kSuccess) return static_cast<int>(status);
    // initialize() encodes the TMA descriptors on the host (through the
    // runtime's driver entry point, so no -lcuda) and raises the kernel's
    // dynamic shared memory limit.
    status = conv.initialize(args, l.workspace, l.stream);
    if (status != cutlass::Status::kSuccess) return static_cast<int>(status);
    status = conv.run(l.stream);
    if (status != cutlass::Status::kSuccess) return static_cast<int>(status);
    const cudaError_t launch = cudaGetLastError();
    return launch == cudaSuccess ? 0 : kLaunchErrorBase + static_cast<int>(launch);
  }
};

// The kernel-table entry of one instantiation; Config is its index in
// cutlass_plan::kKernels, checked against the template arguments.
template <class Element, int TileN, int Config>
constexpr CutlassKernel make_kernel() {
  constexpr cutlass_plan::KernelConfig c = cutlass_plan::kKernels[Config];
  static_assert(c.arch == cutlass_plan::Arch::kSm90 && c.tile_n == TileN,
                "kernel file and cutlass_plan::kKernels disagree");
  static_assert((c.dtype == cutlass_plan::DType::kHalf) == std::is_same_v<Element, cutlass::half_t>,
                "kernel file and cutlass_plan::kKernels disagree on the dtype");
  using K = FpropBnAct<Element, TileN>;
  return CutlassKernel{Config, &K::can_implement, &K::workspace_size, &K::run};
}

}  // namespace sm90
}  // namespace resnet_fused
