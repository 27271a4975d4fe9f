// The CPU kernels' instruction set (isa.h).
#include "isa.h"

#include <atomic>
#include <cstdlib>
#include <stdexcept>

namespace resnet_fused {
namespace cpu_isa {
namespace {

constexpr const char* kNames[] = {"baseline", "avx2", "avx512"};

Isa widest_supported() {
  for (Isa isa : {kAvx512, kAvx2}) {
    if (supported(isa)) return isa;
  }
  return kBaseline;
}

Isa parse(const std::string& name) {
  for (int i = 0; i < 3; ++i) {
    if (name == kNames[i]) return static_cast<Isa>(i);
  }
  throw std::invalid_argument("unknown CPU instruction set '" + name + "' (baseline, avx2 or avx512)");
}

Isa checked(Isa isa) {
  if (!supported(isa)) {
    throw std::invalid_argument(std::string("the CPU kernels cannot run with ") + kNames[isa] + " here (" +
                                (RF_CPU_MULTI_ISA ? "this CPU lacks it" : "built for the baseline only") + ")");
  }
  return isa;
}

std::atomic<int>& chosen() {
  static std::atomic<int> isa{[] {
    const char* forced = std::getenv("RESNET_FUSED_CPU_ISA");
    return static_cast<int>(forced && *forced ? checked(parse(forced)) : widest_supported());
  }()};
  return isa;
}

}  // namespace

bool supported(Isa isa) {
  if (isa == kBaseline) return true;
#if RF_CPU_MULTI_ISA
  __builtin_cpu_init();
  // libgcc checks the OS saves the wider registers (XCR0) as well as CPUID.
  if (isa == kAvx2) return __builtin_cpu_supports("avx2");
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

Isa current() { return static_cast<Isa>(chosen().load(std::memory_order_relaxed)); }

const char* name(Isa isa) { return kNames[isa]; }

std::string set(const std::string& name) {
  const Isa isa = checked(parse(name));
  return kNames[chosen().exchange(isa)];
}

}  // namespace cpu_isa
}  // namespace resnet_fused
