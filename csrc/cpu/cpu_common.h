// Helpers shared by the CPU kernel sources: row chunking, dtype dispatch (ISA levels: isa.h).
#pragma once
#include <stdint.h>

#include <stdexcept>

#include "instella_kernels/scalar.h"
#include "isa.h"

#define INSTELLA_INLINE inline __attribute__((always_inline))

namespace instella {
namespace cpu {

// to_dtype<T>(v) = from_acc<T>(v) and round_dtype<T>(v) = round_to<T>(v) (instella_kernels/scalar.h),
// bit for bit (tests/test_kernels_numerics.py checks every float), with bf16's NaN test written as
// v != v: one unordered compare in the vector loops, where the integer test of scalar.h takes three
// (x86 has no unsigned 32-bit vector compare below AVX-512).
template <class T> INSTELLA_INLINE T to_dtype(typename Acc<T>::type v) { return from_acc<T>(v); }
template <> INSTELLA_INLINE bf16 to_dtype<bf16>(float v) {
  const uint32_t u = float_to_bits(v);
  return v != v ? bf16((u >> 16) | 0x0040u) : bf16((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
template <class T> INSTELLA_INLINE typename Acc<T>::type round_dtype(typename Acc<T>::type v) {
  return round_to<T>(v);
}
template <> INSTELLA_INLINE float round_dtype<bf16>(float v) {
  const uint32_t u = float_to_bits(v);
  return bits_to_float((v != v ? (u | 0x00400000u) : (u + 0x7fffu + ((u >> 16) & 1u))) & 0xffff0000u);
}

// The same for values known not to be NaN (a row whose inputs are all finite): bf16's NaN test and its
// masked fix-up (three of the loop's instructions per rounding) drop out; for any non-NaN value the
// result is that of to_dtype / round_dtype.
template <class T> INSTELLA_INLINE T to_dtype_no_nan(typename Acc<T>::type v) { return to_dtype<T>(v); }
template <> INSTELLA_INLINE bf16 to_dtype_no_nan<bf16>(float v) {
  const uint32_t u = float_to_bits(v);
  return bf16((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
template <class T> INSTELLA_INLINE typename Acc<T>::type round_dtype_no_nan(typename Acc<T>::type v) {
  return round_dtype<T>(v);
}
template <> INSTELLA_INLINE float round_dtype_no_nan<bf16>(float v) {
  const uint32_t u = float_to_bits(v);
  return bits_to_float((u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u);
}

// Rows per chunk for deterministic column sums: at most 64 chunks, a function of rows only.
inline int64_t rows_per_chunk(int64_t rows) { return rows <= 64 ? 1 : (rows + 63) / 64; }

// Row reductions keep kLanes independent partial sums (in double unless S says otherwise), lane j
// taking elements j, j + kLanes, ...: the loop then runs at load speed instead of waiting on one
// accumulator's add latency, and the order of additions is fixed (the result is the same on every run
// and ISA level, as long as each term is exact in S: FMA contraction then changes nothing).
constexpr int kLanes = 32;

template <class S = double> struct LaneSums {
  S v[kLanes] = {};
  INSTELLA_INLINE double total() const {
    double s = 0;
    for (int j = 0; j < kLanes; ++j) s += double(v[j]);
    return s;
  }
};

// Adds f(i) for i in [0, n) to the lanes; f returns an S.
template <class S, class F> INSTELLA_INLINE void lane_sum(LaneSums<S>& acc, int64_t n, F&& f) {
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
