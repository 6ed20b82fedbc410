// Helpers shared by the CPU kernel sources: row chunking, dtype dispatch (ISA levels: isa.h).
#pragma once
#include <stdint.h>

#include <stdexcept>

#include "instella_kernels/scalar.h"
#include "isa.h"

#define INSTELLA_INLINE inline __attribute__((always_inline))

namespace instella {
namespace cpu {

// Rows per chunk for deterministic column sums: at most 64 chunks, a function of rows only.
inline int64_t rows_per_chunk(int64_t rows) { return rows <= 64 ? 1 : (rows + 63) / 64; }

// Row reductions in double keep kLanes independent partial sums, lane j taking elements j, j + kLanes,
// ...: the loop then runs at load speed instead of waiting on one accumulator's add latency, and
// the order of additions is fixed (the result is the same on every run and ISA level).
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

// Calls f(T{}, IsaTag<L>{}) with T the C++ type of dt and L the ISA level the op runs (isa.h);
// f passes the tag on to the worker overloads of that level.
template <class F> void dispatch(DType dt, F&& f) {
  switch (dt) {
    case DType::f32: isa_call([&](auto isa) { f(float{}, isa); }); break;
    case DType::f64: isa_call([&](auto isa) { f(double{}, isa); }); break;
    case DType::bf16: isa_call([&](auto isa) { f(bf16{}, isa); }); break;
    default: throw std::invalid_argument("instella kernels: unsupported dtype");
  }
}

}  // namespace cpu
}  // namespace instella
