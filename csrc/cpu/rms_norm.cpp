// RMSNorm with Instella's rounding order on the CPU: x -> Acc, x * rsqrt(mean(x^2) + eps),
// cast to the dtype of x, then multiply by the weight (rounded again to that dtype).
// Backward treats the casts as identities (straight-through), as autograd does for .to(dtype).
#include <math.h>
#include <omp.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "cpu_common.h"
#include "kernels.h"
#include "stream.h"

namespace instella {
namespace cpu {
namespace {

// bf16 rows read and written as 32-bit words of two values (x86 and Arm are little-endian: the even
// element in the low half). Widening is then one shift or mask per value and packing one or per two,
// where the element loop spends a widening shuffle + shift per value and a pack + permute per output
// vector. The forward pass's AVX2 loops fall from 38 to 32 instructions per 16 values (normalising)
// and from 20 to 14 per 32 (sum of squares). Word may alias the tensor's bf16 storage.
typedef uint32_t __attribute__((__may_alias__)) Word;
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "bf16 word pairs assume a little-endian host");
INSTELLA_INLINE float lo_bf16(Word w) { return bits_to_float(w << 16); }
INSTELLA_INLINE float hi_bf16(Word w) { return bits_to_float(w & 0xffff0000u); }
// v rounded to bf16 (nearest, ties to even) in the high 16 bits, for v not NaN (cpu_common.h).
INSTELLA_INLINE uint32_t bf16_round_bits(float v) {
  const uint32_t u = float_to_bits(v);
  return u + 0x7fffu + ((u >> 16) & 1u);
}

// Sum of squares of a bf16 row of 2 * words values, bit for bit that of lane_sum over its elements
// (the same kLanes lanes, each adding the same values in the same order): the even elements of a
// block of kLanes land in lanes 0, 2, ..., the odd ones in 1, 3, ...
INSTELLA_INLINE void pair_sum_squares(LaneSums<float>& acc, const Word* xw, int64_t words) {
  constexpr int kHalf = kLanes / 2;
  float lo[kHalf] = {}, hi[kHalf] = {};
  int64_t k = 0;
  for (; k + kHalf <= words; k += kHalf) {
#pragma omp simd
    for (int j = 0; j < kHalf; ++j) {
      const float a = lo_bf16(xw[k + j]), b = hi_bf16(xw[k + j]);
      lo[j] += a * a;
      hi[j] += b * b;
    }
  }
  for (int j = 0; k + j < words; ++j) {
    const float a = lo_bf16(xw[k + j]), b = hi_bf16(xw[k + j]);
    lo[j] += a * a;
    hi[j] += b * b;
  }
  for (int j = 0; j < kHalf; ++j) {
    acc.v[2 * j] = lo[j];
    acc.v[2 * j + 1] = hi[j];
  }
}

// stream: write y (dx) with streaming stores (stream.h). wa: the weight in Acc<T> (bf16 widened once
// per call, not in every row's loop); w_finite: whether all of it is finite. wpair (bf16 rows of even
// width on 4-byte boundaries, else null): the widened weight's even elements, then its odd ones.
template <class T, class Tag>
INSTELLA_INLINE void fwd_rows(Tag isa, bool stream, const T* x, int64_t xs, const typename Acc<T>::type* wa,
                              const float* wpair, bool w_finite, T* y, typename Acc<T>::type* rstd,
                              int64_t r0, int64_t r1, int64_t n, double eps) {
  using A = typename Acc<T>::type;
  constexpr bool kBf16 = std::is_same<T, bf16>::value;
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = x + r * xs;
    T* yr = y + r * n;
    const Word* xw = reinterpret_cast<const Word*>(xr);
    // Sum of squares in double lanes: exact to fp32 for any width. A bf16 value's square is exact in
    // float (8-bit significands), so bf16 rows sum in float lanes, at twice the width per vector; their
    // rounding error (~kLanes-fold fewer additions per lane than elements) is far below bf16's, and
    // squares beyond float's range overflow as in the fp32 reference's x.float().pow(2).
    using S = typename std::conditional<kBf16, float, double>::type;
    LaneSums<S> ss;
    if constexpr (kBf16) {
      if (wpair) pair_sum_squares(ss, xw, n / 2);
    }
    if (!kBf16 || !wpair) {
      lane_sum(ss, n, [&](int64_t i) {
        const S v = to_acc(xr[i]);
        return v * v;
      });
    }
    const double total = ss.total();
    const A inv = A(1.0 / sqrt(total / double(n) + eps));
    // A finite sum of squares means every x is finite, so x * inv is (|x * inv| <= sqrt(n)); with a
    // finite weight no product is NaN and bf16's rounding needs no NaN test (cpu_common.h).
    const bool no_nan = kBf16 && w_finite && std::isfinite(total);
    if (no_nan && wpair) {
      const float* wlo = wpair;
      const float* whi = wpair + n / 2;
      write_out(isa, stream, reinterpret_cast<Word*>(yr), n / 2, [&](int64_t k) -> Word {
        const Word xk = xw[k];
        const float a = wlo[k] * bits_to_float(bf16_round_bits(lo_bf16(xk) * float(inv)) & 0xffff0000u);
        const float b = whi[k] * bits_to_float(bf16_round_bits(hi_bf16(xk) * float(inv)) & 0xffff0000u);
        return (bf16_round_bits(a) >> 16) | (bf16_round_bits(b) & 0xffff0000u);
      });
    } else if (no_nan) {
      write_out(isa, stream, yr, n, [&](int64_t i) {
        return to_dtype_no_nan<T>(wa[i] * round_dtype_no_nan<T>(to_acc(xr[i]) * inv));
      });
    } else {
      write_out(isa, stream, yr, n, [&](int64_t i) {
        return to_dtype<T>(wa[i] * round_dtype<T>(to_acc(xr[i]) * inv));
      });
    }
    rstd[r] = inv;
  }
  if (stream) stream_fence();
}

// One chunk of rows: dx for each row, and the chunk's partial weight gradient in part[0..n).
template <class T, class Tag>
INSTELLA_INLINE void bwd_rows(Tag isa, bool stream, const T* dy, int64_t dys, const T* x, int64_t xs, const T* w,
                              const typename Acc<T>::type* rstd, T* dx, typename Acc<T>::type* part,
                              int64_t r0, int64_t r1, int64_t n) {
  using A = typename Acc<T>::type;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) part[i] = 0;
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = x + r * xs;
    const T* gr = dy + r * dys;
    T* dxr = dx + r * n;
    const A inv = rstd[r];
    LaneSums<> dot;  // sum_i dn_i * x_i with dn = dy * w
    lane_sum(dot, n, [&](int64_t i) {
      const A xv = to_acc(xr[i]);
      const A g = to_acc(gr[i]);
      part[i] += g * round_dtype<T>(xv * inv);
      return double(g * to_acc(w[i])) * double(xv);
    });
    const A c = A(double(inv) * inv * inv * dot.total() / double(n));
    write_out(isa, stream, dxr, n, [&](int64_t i) {
      return to_dtype<T>(inv * to_acc(gr[i]) * to_acc(w[i]) - c * to_acc(xr[i]));
    });
  }
  if (stream) stream_fence();
}

// The workers, once per ISA level (isa.h).
#define INSTELLA_RMS_WORKERS(L, TARGET)                                                         \
  template <class T>                                                                            \
  TARGET INSTELLA_WORKER void rms_fwd_chunk(IsaTag<L> isa, bool stream, const T* x, int64_t xs, \
                                            const typename Acc<T>::type* wa, const float* wpair, \
                                            bool w_finite, T* y, typename Acc<T>::type* rstd,   \
                                            int64_t r0, int64_t r1, int64_t n, double eps) {    \
    fwd_rows<T>(isa, stream, x, xs, wa, wpair, w_finite, y, rstd, r0, r1, n, eps);              \
  }                                                                                             \
  template <class T>                                                                            \
  TARGET INSTELLA_WORKER void rms_bwd_chunk(IsaTag<L> isa, bool stream, const T* dy, int64_t dys, \
                                            const T* x, int64_t xs, const T* w,                 \
                                            const typename Acc<T>::type* rstd, T* dx,           \
                                            typename Acc<T>::type* part, int64_t r0, int64_t r1, \
                                            int64_t n) {                                        \
    bwd_rows<T>(isa, stream, dy, dys, x, xs, w, rstd, dx, part, r0, r1, n);                     \
  }
INSTELLA_FOR_EACH_ISA(INSTELLA_RMS_WORKERS)

}  // namespace

void rms_norm_fwd(DType dt, const void* x, int64_t x_stride, const void* w, void* y, void* rstd,
                  int64_t rows, int64_t hidden, double eps) {
  dispatch(dt, [&](auto tag, auto isa) {
    using T = decltype(tag);
    using A = typename Acc<T>::type;
    const int64_t step = 16;
    const bool stream = rows * hidden * int64_t(sizeof(T)) >= kStreamMinBytes;
    const T* wt = static_cast<const T*>(w);
    std::vector<A> widened;
    const A* wa;
    if constexpr (std::is_same<T, A>::value) {
      wa = wt;
    } else {
      widened.resize(size_t(hidden));
      for (int64_t i = 0; i < hidden; ++i) widened[i] = to_acc(wt[i]);
      wa = widened.data();
    }
    bool w_finite = true;
    for (int64_t i = 0; i < hidden && w_finite; ++i) w_finite = std::isfinite(wa[i]);
    // bf16 rows as words of two values (fwd_rows) when every row starts on a 4-byte boundary.
    std::vector<float> wpair;
    const auto aligned4 = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 4 == 0; };
    if (std::is_same<T, bf16>::value && hidden % 2 == 0 && x_stride % 2 == 0 && aligned4(x) && aligned4(y)) {
      wpair.resize(size_t(hidden));
      for (int64_t k = 0; k < hidden / 2; ++k) {
        wpair[k] = float(wa[2 * k]);
        wpair[hidden / 2 + k] = float(wa[2 * k + 1]);
      }
    }
#pragma omp parallel for schedule(static)
    for (int64_t r0 = 0; r0 < rows; r0 += step) {
      const int64_t r1 = r0 + step < rows ? r0 + step : rows;
      rms_fwd_chunk(isa, stream, static_cast<const T*>(x), x_stride, wa,
                    wpair.empty() ? nullptr : wpair.data(), w_finite, static_cast<T*>(y),
                    static_cast<A*>(rstd), r0, r1, hidden, eps);
    }
  });
}

void rms_norm_bwd(DType dt, const void* dy, int64_t dy_stride, const void* x, int64_t x_stride,
                  const void* w, const void* rstd, void* dx, void* dw, int64_t rows, int64_t hidden) {
  dispatch(dt, [&](auto tag, auto isa) {
    using T = decltype(tag);
    using A = typename Acc<T>::type;
    const int64_t per = rows_per_chunk(rows);
    const int64_t chunks = rows == 0 ? 0 : (rows + per - 1) / per;
    std::vector<A> part(size_t(chunks) * size_t(hidden));
    const bool stream = rows * hidden * int64_t(sizeof(T)) >= kStreamMinBytes;
#pragma omp parallel for schedule(static)
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t r0 = c * per, r1 = r0 + per < rows ? r0 + per : rows;
      rms_bwd_chunk(isa, stream, static_cast<const T*>(dy), dy_stride, static_cast<const T*>(x), x_stride,
                static_cast<const T*>(w), static_cast<const A*>(rstd), static_cast<T*>(dx),
                part.data() + c * hidden, r0, r1, hidden);
    }
    T* dwp = static_cast<T*>(dw);
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < hidden; ++i) {
      A s = 0;
      for (int64_t c = 0; c < chunks; ++c) s += part[size_t(c) * hidden + i];
      dwp[i] = to_dtype<T>(s);
    }
  });
}

}  // namespace cpu
}  // namespace instella
