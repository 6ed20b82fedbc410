// Helpers shared by the CPU kernel sources: ISA clones, row chunking, dtype dispatch.
#pragma once
#include <stdint.h>

#include <stdexcept>

#include "instella_kernels/scalar.h"

// Per-chunk workers are compiled for AVX-512, AVX2 and baseline x86-64 and picked at load time,
// so one binary is both portable and vectorised. Other architectures get one baseline version.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define INSTELLA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define INSTELLA_CLONES
#endif
#define INSTELLA_INLINE inline __attribute__((always_inline))

namespace instella {
namespace cpu {

// Rows per chunk for deterministic column sums: at most 64 chunks, a function of rows only.
inline int64_t rows_per_chunk(int64_t rows) { return rows <= 64 ? 1 : (rows + 63) / 64; }

// Row reductions in double keep kLanes independent partial sums, lane j taking elements j, j + kLanes,
// ...: the loop then runs at load speed instead of waiting on one accumulator's add latency, and
// the order of additions is fixed (the result is the same on every run and ISA clone).
constexpr int kLanes = 32;

struct LaneSums {
  double v[kLanes] = {};
  INSTELLA_INLINE double total() const {
    double s = 0;
    for (int j = 0; j < kLanes; ++j) s += v[j];
    return s;
  }
};

// Adds f(i) for i in [0, n) to the lanes; f returns a double.
template <class F> INSTELLA_INLINE void lane_sum(LaneSums& acc, int64_t n, F&& f) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
#pragma omp simd
    for (int j = 0; j < kLanes; ++j) acc.v[j] += f(i + j);
  }
  for (int j = 0; i + j < n; ++j) acc.v[j] += f(i + j);
}

// Calls f(T{}) with T the C++ type of dt.
template <class F> void dispatch(DType dt, F&& f) {
  switch (dt) {
    case DType::f32: f(float{}); break;
    case DType::f64: f(double{}); break;
    case DType::bf16: f(bf16{}); break;
    default: throw std::invalid_argument("instella kernels: unsupported dtype");
  }
}

}  // namespace cpu
}  // namespace instella
