// One CUTLASS instantiation per file, so MAX_JOBS compiles them in parallel.
// Template: cutlass_sm80.cuh.
#include "cutlass_sm80.cuh"

namespace resnet_fused {
constexpr int kConfig = cutlass_plan::kernel_index("sm80_f16_128x128x32");
static_assert(kConfig >= 0, "kernel name missing from cutlass_plan::kKernels");
const CutlassKernel cutlass_sm80_f16_128x128x32 = sm80::make_kernel<cutlass::half_t, 128, kConfig>();
}  // namespace resnet_fused
