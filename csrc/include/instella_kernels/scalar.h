// Scalar types and conversions shared by the CPU (.cpp) and GPU (.cu) kernels; no torch headers.
//
// bf16 is handled as its 16 bits; float -> bf16 rounds to nearest even (NaN stays NaN), which is
// what torch's c10::BFloat16 does, so "cast to the input dtype" means the same thing everywhere.
// Acc<T> is the arithmetic type of a kernel working on T: float for bf16/fp32, double for fp64.
#pragma once
#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define INSTELLA_HD __host__ __device__ __forceinline__
#else
#define INSTELLA_HD inline
#endif

namespace instella {

// A bf16 value travels as its raw 16 bits; a plain integer type (not a struct) keeps the loops
// that convert it vectorisable.
using bf16 = uint16_t;

enum class DType : int { f32 = 0, f64 = 1, bf16 = 2 };

template <class T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

INSTELLA_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
  return __uint_as_float(u);
#else
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
#endif
}

INSTELLA_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
  return __float_as_uint(f);
#else
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return u;
#endif
}

INSTELLA_HD float to_acc(bf16 v) { return bits_to_float(uint32_t(v) << 16); }
INSTELLA_HD float to_acc(float v) { return v; }
INSTELLA_HD double to_acc(double v) { return v; }

template <class T> INSTELLA_HD T from_acc(typename Acc<T>::type v);
template <> INSTELLA_HD float from_acc<float>(float v) { return v; }
template <> INSTELLA_HD double from_acc<double>(double v) { return v; }
template <> INSTELLA_HD bf16 from_acc<bf16>(float v) {
  const uint32_t u = float_to_bits(v);
  return (u & 0x7fffffffu) > 0x7f800000u ? bf16((u >> 16) | 0x0040u)  // NaN stays a quiet NaN
                                         : bf16((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// Value after a round trip through T: the "cast to the input dtype" of Instella's norms.
template <class T> INSTELLA_HD typename Acc<T>::type round_to(typename Acc<T>::type v) {
  return to_acc(from_acc<T>(v));
}

// The same for bf16 without narrowing to 16 bits and widening back (so loops stay in 32-bit lanes).
template <> INSTELLA_HD float round_to<bf16>(float v) {
  const uint32_t u = float_to_bits(v);
  const uint32_t r = (u & 0x7fffffffu) > 0x7f800000u ? (u | 0x00400000u) : (u + 0x7fffu + ((u >> 16) & 1u));
  return bits_to_float(r & 0xffff0000u);
}

}  // namespace instella
