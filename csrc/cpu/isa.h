// Which instruction set the CPU kernels run with. Their loops are written for
// the auto-vectorizer, which widens them to the instruction set they are
// compiled for, so each kernel file compiles its loops once per instruction
// set (a `#pragma GCC target` region per copy, RF_CPU_MULTI_ISA) and calls the
// copy current() names: the widest this CPU and OS support, or
// RESNET_FUSED_CPU_ISA (baseline, avx2 or avx512) when set; tests force each.
#pragma once

#include <string>

// g++ on x86-64: other compilers and machines build the baseline copy only.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define RF_CPU_MULTI_ISA 1
#else
#define RF_CPU_MULTI_ISA 0
#endif

namespace resnet_fused {
namespace cpu_isa {

enum Isa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

// Whether this build holds a copy for `isa` and this machine runs it.
bool supported(Isa isa);
// The instruction set the kernels use now.
Isa current();
// Its name: "baseline", "avx2" or "avx512".
const char* name(Isa isa);
// Use `name` from the next call on; returns the previous name. An unknown
// name, or one this build or machine lacks, is a std::invalid_argument.
std::string set(const std::string& name);

}  // namespace cpu_isa
}  // namespace resnet_fused
