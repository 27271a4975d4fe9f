// One CUTLASS instantiation per file, so MAX_JOBS compiles them in parallel.
// Template: cutlass_sm90.cuh.
#include "cutlass_sm90.cuh"

namespace resnet_fused {
constexpr int kConfig = cutlass_plan::kernel_index("sm90_f16_128x128x64");
static_assert(kConfig >= 0, "kernel name missing from cutlass_plan::kKernels");
const CutlassKernel cutlass_sm90_f16_128x128x64 = sm90::make_kernel<cutlass::half_t, 128, kConfig>();
}  // namespace resnet_fused
