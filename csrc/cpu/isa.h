// x86 vector levels of the CPU kernels and the dispatch between them.
//
// Every per-chunk worker is compiled once per level (baseline x86-64 with SSE2; avx2 = the vector
// set of x86-64-v3: AVX2 + FMA; avx512 = that of x86-64-v4: AVX-512 F/BW/DQ/VL/CD) as overloads on
// IsaTag<level>, and each op picks one per call: the best level this CPU runs, or the level named by
// INSTELLA_CPU_ISA (auto | avx512 | avx2 | baseline, read at every call, so one process can time or
// test each level it can run). Other architectures and compilers get the baseline version only.
#pragma once

namespace instella {
namespace cpu {

template <int L> struct IsaTag { static constexpr int level = L; };

// A worker of one level: never inlined into the (baseline) dispatching code, so each level's
// machine code is its own symbol (tests/test_kernels_isa.py reads it back from the built library).
#define INSTELLA_WORKER __attribute__((noinline))

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define INSTELLA_X86_LEVELS 1
#define INSTELLA_TARGET_AVX2 __attribute__((target("avx2,fma")))
#if defined(__clang__)
#define INSTELLA_TARGET_AVX512 __attribute__((target("avx2,fma,avx512f,avx512bw,avx512dq,avx512vl,avx512cd")))
#else
#define INSTELLA_TARGET_AVX512 \
  __attribute__((target("avx2,fma,avx512f,avx512bw,avx512dq,avx512vl,avx512cd,prefer-vector-width=512")))
#endif
// M(level, target attribute) for each level compiled here.
#define INSTELLA_FOR_EACH_ISA(M) M(0, ) M(1, INSTELLA_TARGET_AVX2) M(2, INSTELLA_TARGET_AVX512)
constexpr int kIsaLevels = 3;
#else
#define INSTELLA_FOR_EACH_ISA(M) M(0, )
constexpr int kIsaLevels = 1;
#endif

// Level names, indexed by level: "baseline", "avx2", "avx512".
const char* isa_name(int level);
// Highest level this CPU (and OS) can run.
int best_isa();
// The level the ops run now: INSTELLA_CPU_ISA if set (throws, naming the fix, when it is unknown or
// more than this CPU runs), else best_isa().
int dispatch_isa();

// Calls f(IsaTag<L>{}) for L = dispatch_isa(): f then calls the worker overload of that level.
template <class F> void isa_call(F&& f) {
  switch (dispatch_isa()) {
#if defined(INSTELLA_X86_LEVELS)
    case 2: f(IsaTag<2>{}); break;
    case 1: f(IsaTag<1>{}); break;
#endif
    default: f(IsaTag<0>{}); break;
  }
}

}  // namespace cpu
}  // namespace instella
