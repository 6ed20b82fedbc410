// CPU feature detection and the INSTELLA_CPU_ISA override of the kernel dispatch (isa.h).
#include "isa.h"

#include <stdlib.h>
#include <string.h>

#include <stdexcept>
#include <string>

namespace instella {
namespace cpu {
namespace {

const char* const kNames[] = {"baseline", "avx2", "avx512"};

int detect() {
#if defined(INSTELLA_X86_LEVELS)
  __builtin_cpu_init();
  // __builtin_cpu_supports also checks that the OS saves the AVX / AVX-512 registers (XCR0).
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
                      __builtin_cpu_supports("avx512cd");
  return avx512 ? 2 : avx2 ? 1 : 0;
#else
  return 0;
#endif
}

std::string supported_list(int best) {
  std::string s;
  for (int l = best; l >= 0; --l) s += std::string(l == best ? "" : ", ") + kNames[l];
  return s;
}

}  // namespace

const char* isa_name(int level) { return level >= 0 && level < 3 ? kNames[level] : "unknown"; }

int best_isa() {
  static const int best = detect();
  return best;
}

int dispatch_isa() {
  const int best = best_isa();
  const char* env = getenv("INSTELLA_CPU_ISA");
  if (env == nullptr || *env == '\0' || strcmp(env, "auto") == 0) return best;
  int want = -1;
  if (strcmp(env, "avx512") == 0 || strcmp(env, "x86-64-v4") == 0) want = 2;
  if (strcmp(env, "avx2") == 0 || strcmp(env, "x86-64-v3") == 0) want = 1;
  if (strcmp(env, "baseline") == 0 || strcmp(env, "x86-64") == 0) want = 0;
  if (want < 0) {
    throw std::invalid_argument(std::string("INSTELLA_CPU_ISA=") + env +
                                ": expected auto, avx512 (x86-64-v4), avx2 (x86-64-v3) or baseline; "
                                "unset it to run the best level this CPU supports");
  }
  if (want >= kIsaLevels || want > best) {
    throw std::invalid_argument(std::string("INSTELLA_CPU_ISA=") + env + ": this CPU (or this build) " +
                                "does not run that level; it runs " + supported_list(best) +
                                " (unset INSTELLA_CPU_ISA to run the best of them)");
  }
  return want;
}

}  // namespace cpu
}  // namespace instella
