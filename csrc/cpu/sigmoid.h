// The fp32 logistic sigmoid of a block of values, in explicit vector code per ISA level (isa.h).
//
// Written as a plain per-element expression (instella_kernels/math.h), the sigmoid vectorises but
// runs one long dependent chain per vector (a degree-7 exp polynomial in Horner form, then a divide)
// that the out-of-order core cannot overlap enough: SwiGLU's fused loop was then slower than ATen's
// silu on AVX2 and SSE2 hosts. Here the same function is computed as
//   t = clamp(-g, -87, 88), k = round(t / ln2), r = t - k ln2 (Cody-Waite, ln2 in two parts),
//   exp(t) = 2^k (1 + r + r^2 P(r)), P of degree 5 (Cephes' expf coefficients) in Estrin order,
//   sigmoid = 1 / (1 + exp(t)) by the reciprocal estimate of the level and one Newton step,
// U independent vectors at a time (their instructions interleaved), which keeps the units busy.
// Within ~2 ulp of 1 / (1 + exp(-g)) in float (tests/test_kernels_numerics.py bounds the ops using it
// against fp64). Every element, the last ones of a block included, takes the vector path, so a value's
// sigmoid does not depend on where it sits in a row.
#pragma once
#include <stdint.h>
#include <string.h>

#include "cpu_common.h"
#include "isa.h"

#if defined(INSTELLA_X86_LEVELS)
#include <immintrin.h>
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"  // vector arguments of the inline helpers below, never an ABI
#endif

namespace instella {
namespace cpu {

// Cody-Waite and polynomial constants of the sigmoid's exp.
namespace sig {
constexpr float kLog2e = 1.44269504f;
constexpr float kLn2Hi = 0.693359375f;      // 9 significant bits: k * kLn2Hi is exact for |k| <= 127
constexpr float kLn2Lo = -2.12194440e-4f;   // ln2 - kLn2Hi
constexpr float kRound = 12582912.0f;       // 1.5 * 2^23: (v + kRound) - kRound rounds v to an integer
constexpr float kP[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                         4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};  // r^5 ... r^0 of P
}  // namespace sig

#if defined(INSTELLA_X86_LEVELS)
// Per-level vector operations, overloaded on the vector type. Plain inline (not always_inline), with
// the level's target: the generic body below carries no target of its own, and GCC inlines these once
// that body is inlined into a worker of the level (tests/test_kernels_isa.py checks the workers hold no
// calls). fmadd(a, b, c) = a * b + c, fnmadd(a, b, c) = c - a * b (two roundings on SSE2).
#define INSTELLA_SIG_OPS(TARGET, V, VI, P, SI, FMADD, FNMADD, RCP)                                       \
  TARGET inline V sig_set1(V, float v) { return P##_set1_ps(v); }                                       \
  TARGET inline V sig_load(V, const float* p) { return P##_loadu_ps(p); }                               \
  TARGET inline void sig_store(float* p, V v) { P##_storeu_ps(p, v); }                                  \
  TARGET inline V sig_add(V a, V b) { return P##_add_ps(a, b); }                                        \
  TARGET inline V sig_sub(V a, V b) { return P##_sub_ps(a, b); }                                       \
  TARGET inline V sig_mul(V a, V b) { return P##_mul_ps(a, b); }                                        \
  TARGET inline V sig_min(V a, V b) { return P##_min_ps(a, b); }                                        \
  TARGET inline V sig_max(V a, V b) { return P##_max_ps(a, b); }                                        \
  TARGET inline V sig_fmadd(V a, V b, V c) { return FMADD; }                                            \
  TARGET inline V sig_fnmadd(V a, V b, V c) { return FNMADD; }                                          \
  TARGET inline V sig_rcp(V a) { return RCP(a); }                                                       \
  /* 2^k for integral k in [-126, 127] held in a float vector: the exponent bits of k + 127 */          \
  TARGET inline V sig_pow2(V k) {                                                                       \
    return P##_castsi##SI##_ps(P##_slli_epi32(P##_add_epi32(P##_cvttps_epi32(k), P##_set1_epi32(127)), 23)); \
  }
INSTELLA_SIG_OPS(, __m128, __m128i, _mm, 128, _mm_add_ps(_mm_mul_ps(a, b), c), _mm_sub_ps(c, _mm_mul_ps(a, b)),
                 _mm_rcp_ps)
INSTELLA_SIG_OPS(INSTELLA_TARGET_AVX2, __m256, __m256i, _mm256, 256, _mm256_fmadd_ps(a, b, c),
                 _mm256_fnmadd_ps(a, b, c), _mm256_rcp_ps)
INSTELLA_SIG_OPS(INSTELLA_TARGET_AVX512, __m512, __m512i, _mm512, 512, _mm512_fmadd_ps(a, b, c),
                 _mm512_fnmadd_ps(a, b, c), _mm512_rcp14_ps)
#undef INSTELLA_SIG_OPS

// out[u] = sigmoid of the u-th vector of g, for U vectors (U * (bytes of V / 4) values, unaligned).
template <class V, int U> INSTELLA_INLINE void sigmoid_regs(const float* g, V* out) {
  constexpr int W = int(sizeof(V) / sizeof(float));
  const V z{};
  V t[U], k[U], r[U], r2[U], a[U], b[U], c[U], d[U];
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) {  // t = clamp(-g): exp(t) neither overflows nor leaves the normal range
    t[u] = sig_max(sig_min(sig_sub(z, sig_load(z, g + W * u)), sig_set1(z, 88.0f)), sig_set1(z, -87.0f));
  }
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) {
    k[u] = sig_sub(sig_fmadd(t[u], sig_set1(z, sig::kLog2e), sig_set1(z, sig::kRound)), sig_set1(z, sig::kRound));
  }
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) {
    r[u] = sig_fnmadd(k[u], sig_set1(z, sig::kLn2Lo), sig_fnmadd(k[u], sig_set1(z, sig::kLn2Hi), t[u]));
  }
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) {
    r2[u] = sig_mul(r[u], r[u]);
    a[u] = sig_fmadd(sig_set1(z, sig::kP[4]), r[u], sig_set1(z, sig::kP[5]));
    b[u] = sig_fmadd(sig_set1(z, sig::kP[2]), r[u], sig_set1(z, sig::kP[3]));
    c[u] = sig_fmadd(sig_set1(z, sig::kP[0]), r[u], sig_set1(z, sig::kP[1]));
  }
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) b[u] = sig_fmadd(r2[u], c[u], b[u]);
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) a[u] = sig_fmadd(r2[u], b[u], a[u]);
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) {  // d = 1 + exp(t) = 1 + 2^k (1 + r + r^2 P(r))
    d[u] = sig_fmadd(sig_fmadd(r2[u], a[u], sig_add(r[u], sig_set1(z, 1.0f))), sig_pow2(k[u]), sig_set1(z, 1.0f));
  }
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) {  // 1 / d: the estimate e, then e + e (1 - d e)
    const V e = sig_rcp(d[u]);
    out[u] = sig_fmadd(e, sig_fnmadd(d[u], e, sig_set1(z, 1.0f)), e);
  }
}

// s[i] = sigmoid(g[i]) for U vectors of values from g, written to s (unaligned, may alias).
template <class V, int U> INSTELLA_INLINE void sigmoid_vectors(const float* g, float* s) {
  constexpr int W = int(sizeof(V) / sizeof(float));
  V v[U];
  sigmoid_regs<V, U>(g, v);
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) sig_store(s + W * u, v[u]);
}

// y[i] = g[i] * sigmoid(g[i]) * up[i] (SwiGLU's forward, rounded as (g * s) * up) for U vectors of
// values, the sigmoid kept in registers.
template <class V, int U> INSTELLA_INLINE void silu_mul_vectors(const float* g, const float* up, float* y) {
  constexpr int W = int(sizeof(V) / sizeof(float));
  const V z{};
  V v[U];
  sigmoid_regs<V, U>(g, v);
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) {
    sig_store(y + W * u, sig_mul(sig_mul(sig_load(z, g + W * u), v[u]), sig_load(z, up + W * u)));
  }
}

// Vectors per step and vector type of each level: SSE2 has no FMA and 16 registers (4 x 4 floats);
// AVX2 8 floats (one vector: its FMA chain is short enough), AVX-512 2 x 16 floats.
template <int L> struct SigShape;
template <> struct SigShape<0> { using V = __m128; static constexpr int U = 4; };
template <> struct SigShape<1> { using V = __m256; static constexpr int U = 1; };
template <> struct SigShape<2> { using V = __m512; static constexpr int U = 2; };

// s[i] = sigmoid(g[i]), i < n (s may be g). The last n mod step values go through a padded copy.
template <int L> INSTELLA_INLINE void sigmoid_block(IsaTag<L>, const float* g, float* s, int64_t n) {
  using V = typename SigShape<L>::V;
  constexpr int U = SigShape<L>::U;
  constexpr int64_t step = U * int64_t(sizeof(V) / sizeof(float));
  int64_t i = 0;
  for (; i + step <= n; i += step) sigmoid_vectors<V, U>(g + i, s + i);
  if (i < n) {
    float pad[step] = {};
    memcpy(pad, g + i, size_t(n - i) * sizeof(float));
    sigmoid_vectors<V, U>(pad, pad);
    memcpy(s + i, pad, size_t(n - i) * sizeof(float));
  }
}

// y[i] = g[i] * sigmoid(g[i]) * up[i], i < n (y may not alias g or up). The last n mod step values go
// through padded copies.
template <int L> INSTELLA_INLINE void silu_mul_block(IsaTag<L>, const float* g, const float* up, float* y, int64_t n) {
  using V = typename SigShape<L>::V;
  constexpr int U = SigShape<L>::U;
  constexpr int64_t step = U * int64_t(sizeof(V) / sizeof(float));
  int64_t i = 0;
  for (; i + step <= n; i += step) silu_mul_vectors<V, U>(g + i, up + i, y + i);
  if (i < n) {
    float pg[step] = {}, pu[step] = {}, py[step];
    memcpy(pg, g + i, size_t(n - i) * sizeof(float));
    memcpy(pu, up + i, size_t(n - i) * sizeof(float));
    silu_mul_vectors<V, U>(pg, pu, py);
    memcpy(y + i, py, size_t(n - i) * sizeof(float));
  }
}
#pragma GCC diagnostic pop
#else
// Other architectures: the same formula, per element, with a division (the compiler vectorises it).
template <int L> INSTELLA_INLINE void sigmoid_block(IsaTag<L>, const float* g, float* s, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    float t = -g[i];
    t = t < 88.0f ? t : 88.0f;
    t = t > -87.0f ? t : -87.0f;
    const float k = (t * sig::kLog2e + sig::kRound) - sig::kRound;
    const float r = (t - k * sig::kLn2Hi) - k * sig::kLn2Lo;
    const float r2 = r * r;
    const float p = (sig::kP[5] + sig::kP[4] * r) + r2 * ((sig::kP[3] + sig::kP[2] * r) + r2 * (sig::kP[1] + sig::kP[0] * r));
    const float e = ((1.0f + r) + r2 * p) * bits_to_float(uint32_t(int32_t(k) + 127) << 23);
    s[i] = 1.0f / (1.0f + e);
  }
}

template <int L> INSTELLA_INLINE void silu_mul_block(IsaTag<L>, const float* g, const float* up, float* y, int64_t n) {
  sigmoid_block(IsaTag<L>{}, g, y, n);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = g[i] * y[i] * up[i];
}
#endif

}  // namespace cpu
}  // namespace instella
