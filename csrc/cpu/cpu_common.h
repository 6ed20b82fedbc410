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
