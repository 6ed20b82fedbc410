// Full-width QK-norm fused with RoPE on the CPU, for q or k in Megatron's [s, b, heads, head_dim].
//
// Per (s, b) row of width heads*head_dim: n = cast(x * r) with r = 1/sqrt(ss/full_width + eps),
// y = cast(w * n) (Instella's RMSNorm), then out = cast(y*cos + rotate_half(y)*sin) in Acc, with
// cos/sin of the angles freqs[s, :] evaluated in Acc (rotate_half(y) = [-y2, y1] per head).
// Under tensor parallelism ss is the all-reduced sum of squares and full_width the global width.
#include <math.h>
#include <omp.h>

#include <vector>

#include "cpu_common.h"
#include "instella_kernels/math.h"
#include "kernels.h"
#include "stream.h"

namespace instella {
namespace cpu {
namespace {

template <class T>
INSTELLA_INLINE double row_sumsq(const T* xr, const QKShape& sh) {
  LaneSums<> ss;  // reductions in double: exact to fp32 for any width
  for (int64_t h = 0; h < sh.heads; ++h) {
    const T* xh = xr + h * sh.stride_h;
    lane_sum(ss, sh.head_dim, [&](int64_t d) {
      const double v = to_acc(xh[d]);
      return v * v;
    });
  }
  return ss.total();
}

template <class A>
INSTELLA_INLINE void angles(const A* f, int64_t hd, A* cs, A* sn) {
#pragma omp simd
  for (int64_t d = 0; d < hd; ++d) {
    A s, c;
    sincos_acc(f[d], &s, &c);
    sn[d] = s;
    cs[d] = c;
  }
}

// Rows [r0, r1) of the flattened (s, b) index; cs/sn hold head_dim values of scratch each, nb a row.
// stream: write y (dx) a row at a time from scratch with streaming stores (stream.h).
template <class T, class Tag>
INSTELLA_INLINE void fwd_rows(Tag isa, bool stream, const T* x, QKShape sh, const T* w, const typename Acc<T>::type* freqs,
                              const typename Acc<T>::type* ss_in, int64_t full_width, double eps, T* y,
                              typename Acc<T>::type* rstd, typename Acc<T>::type* cs,
                              typename Acc<T>::type* sn, typename Acc<T>::type* nb, int64_t r0, int64_t r1) {
  using A = typename Acc<T>::type;
  const int64_t hd = sh.head_dim, half = hd / 2, width = sh.heads * hd;
  int64_t cur_s = -1;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t is = r / sh.b, ib = r % sh.b;
    if (is != cur_s) {
      angles<A>(freqs + is * hd, hd, cs, sn);
      cur_s = is;
    }
    const T* xr = x + is * sh.stride_s + ib * sh.stride_b;
    const double ss = ss_in ? double(ss_in[r]) : row_sumsq<T>(xr, sh);
    const A inv = A(1.0 / sqrt(ss / double(full_width) + eps));
    rstd[r] = inv;
    T* yr = y + r * width;
    const A *c1 = cs, *c2 = cs + half, *s1 = sn, *s2 = sn + half;
    if constexpr (sizeof(T) != sizeof(A)) {
      // bf16: loops holding 16-bit lanes get twice the vector length, which leaves each half head
      // (40 values for Instella) a scalar tail. So: normalise and scale head by head into Acc
      // scratch (head_dim-long loops), rotate there in Acc only, then round the whole row at once.
      for (int64_t h = 0; h < sh.heads; ++h) {
        const T *xh = xr + h * sh.stride_h, *wh = w + h * hd;
        A* nh = nb + h * hd;
#pragma omp simd
        for (int64_t d = 0; d < hd; ++d) nh[d] = round_dtype<T>(to_acc(wh[d]) * round_dtype<T>(to_acc(xh[d]) * inv));
      }
      for (int64_t h = 0; h < sh.heads; ++h) {
        A *n1 = nb + h * hd, *n2 = n1 + half;
#pragma omp simd
        for (int64_t d = 0; d < half; ++d) {
          const A a = n1[d], b = n2[d];
          n1[d] = a * c1[d] - b * s1[d];
          n2[d] = b * c2[d] + a * s2[d];
        }
      }
      write_out(isa, stream, yr, width, [&](int64_t i) { return to_dtype<T>(nb[i]); });
      continue;
    }
    T* out = stream ? reinterpret_cast<T*>(nb) : yr;  // fp32: the row in scratch, then streamed
    for (int64_t h = 0; h < sh.heads; ++h) {  // first and second halves of each head: x1, x2
      const T *x1 = xr + h * sh.stride_h, *x2 = x1 + half, *w1 = w + h * hd, *w2 = w1 + half;
      T *y1 = out + h * hd, *y2 = y1 + half;
#pragma omp simd
      for (int64_t d = 0; d < half; ++d) {
        const A a = round_dtype<T>(to_acc(w1[d]) * round_dtype<T>(to_acc(x1[d]) * inv));
        const A b = round_dtype<T>(to_acc(w2[d]) * round_dtype<T>(to_acc(x2[d]) * inv));
        y1[d] = to_dtype<T>(a * c1[d] - b * s1[d]);
        y2[d] = to_dtype<T>(b * c2[d] + a * s2[d]);
      }
    }
    if (stream) stream_bytes(isa, yr, out, size_t(width) * sizeof(T));
  }
  if (stream) stream_fence();
}

// Backward of a chunk of rows; part[0..width) receives the chunk's weight-gradient partial sums and
// dn (width values) is scratch for dL/dn = w * (RoPE^T dy).
template <class T, class Tag>
INSTELLA_INLINE void bwd_rows(Tag isa, bool stream, const T* dy, QKShape gsh, const T* x, QKShape sh, const T* w,
                              const typename Acc<T>::type* freqs, const typename Acc<T>::type* rstd,
                              int64_t full_width, bool split, T* dx, typename Acc<T>::type* dss,
                              typename Acc<T>::type* part, typename Acc<T>::type* dn,
                              typename Acc<T>::type* cs, typename Acc<T>::type* sn,
                              typename Acc<T>::type* wide, int64_t r0, int64_t r1) {
  using A = typename Acc<T>::type;
  const int64_t hd = sh.head_dim, half = hd / 2, width = sh.heads * hd;
  // bf16: the half-head loop below works on Acc values only. Loops holding 16-bit lanes get twice
  // the vector length, which would leave each half head (40 values for Instella) a scalar tail; so
  // w is widened once per chunk (wide[0..width)) and x, dy once per head (wide[width..width+2hd)).
  constexpr bool kWiden = sizeof(T) != sizeof(A);
  const A* wa_all = reinterpret_cast<const A*>(w);
  if constexpr (kWiden) {
#pragma omp simd
    for (int64_t i = 0; i < width; ++i) wide[i] = to_acc(w[i]);
    wa_all = wide;
  }
  A *xw = wide + width, *gw = xw + hd;
#pragma omp simd
  for (int64_t i = 0; i < width; ++i) part[i] = 0;
  int64_t cur_s = -1;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t is = r / sh.b, ib = r % sh.b;
    if (is != cur_s) {
      angles<A>(freqs + is * hd, hd, cs, sn);
      cur_s = is;
    }
    const T* xr = x + is * sh.stride_s + ib * sh.stride_b;
    const T* gr = dy + is * gsh.stride_s + ib * gsh.stride_b;
    const A inv = rstd[r];
    double dot = 0;  // sum over the row of dn * x
    const A *c1 = cs, *c2 = cs + half, *s1 = sn, *s2 = sn + half;
    for (int64_t h = 0; h < sh.heads; ++h) {  // first and second halves of each head
      const A *xa, *ga;
      if constexpr (kWiden) {
        const T *xh = xr + h * sh.stride_h, *gh = gr + h * gsh.stride_h;
#pragma omp simd
        for (int64_t d = 0; d < hd; ++d) {
          xw[d] = to_acc(xh[d]);
          gw[d] = to_acc(gh[d]);
        }
        xa = xw;
        ga = gw;
      } else {
        xa = reinterpret_cast<const A*>(xr + h * sh.stride_h);
        ga = reinterpret_cast<const A*>(gr + h * gsh.stride_h);
      }
      const A *xb = xa + half, *gb = ga + half, *wa = wa_all + h * hd, *wb = wa + half;
      A *pa = part + h * hd, *pb = pa + half, *na = dn + h * hd, *nb = na + half;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < half; ++d) {
        const A g1 = to_acc(ga[d]), g2 = to_acc(gb[d]);
        const A u1 = g1 * c1[d] + g2 * s2[d];  // RoPE^T dy
        const A u2 = g2 * c2[d] - g1 * s1[d];
        const A x1 = to_acc(xa[d]), x2 = to_acc(xb[d]);
        pa[d] += u1 * round_dtype<T>(x1 * inv);
        pb[d] += u2 * round_dtype<T>(x2 * inv);
        const A n1 = u1 * to_acc(wa[d]), n2 = u2 * to_acc(wb[d]);
        na[d] = n1;
        nb[d] = n2;
        dot += double(n1) * double(x1) + double(n2) * double(x2);
      }
    }
    const A c = A(double(inv) * inv * inv * dot / double(full_width));
    T* dxr = dx + r * width;
    if (split) {
      dss[r] = A(-0.5 * double(inv) * inv * inv * dot / double(full_width));
      write_out(isa, stream, dxr, width, [&](int64_t i) { return to_dtype<T>(inv * dn[i]); });
    } else {
      for (int64_t h = 0; h < sh.heads; ++h) {  // dn becomes the gradient in Acc, then one row write
        const T* xh = xr + h * sh.stride_h;
        A* gh = dn + h * hd;
#pragma omp simd
        for (int64_t d = 0; d < hd; ++d) gh[d] = inv * gh[d] - c * to_acc(xh[d]);
      }
      write_out(isa, stream, dxr, width, [&](int64_t i) { return to_dtype<T>(dn[i]); });
    }
  }
  if (stream) stream_fence();
}

// The workers, once per ISA level (isa.h).
#define INSTELLA_QK_WORKERS(L, TARGET)                                                          \
  template <class T>                                                                            \
  TARGET INSTELLA_WORKER void qk_sumsq_chunk(IsaTag<L>, const T* x, QKShape sh,                 \
                                             typename Acc<T>::type* ss, int64_t r0, int64_t r1) { \
    for (int64_t r = r0; r < r1; ++r) {                                                         \
      const T* xr = x + (r / sh.b) * sh.stride_s + (r % sh.b) * sh.stride_b;                    \
      ss[r] = typename Acc<T>::type(row_sumsq<T>(xr, sh));                                      \
    }                                                                                           \
  }                                                                                             \
  template <class T>                                                                            \
  TARGET INSTELLA_WORKER void qk_fwd_chunk(                                                     \
      IsaTag<L> isa, bool stream, const T* x, QKShape sh, const T* w,                           \
      const typename Acc<T>::type* freqs, const typename Acc<T>::type* ss, int64_t fw,          \
      double eps, T* y, typename Acc<T>::type* rstd, typename Acc<T>::type* cs,                 \
      typename Acc<T>::type* sn, typename Acc<T>::type* nb, int64_t r0, int64_t r1) {           \
    fwd_rows<T>(isa, stream, x, sh, w, freqs, ss, fw, eps, y, rstd, cs, sn, nb, r0, r1);        \
  }                                                                                             \
  template <class T>                                                                            \
  TARGET INSTELLA_WORKER void qk_bwd_chunk(                                                     \
      IsaTag<L> isa, bool stream, const T* dy, QKShape gsh, const T* x, QKShape sh, const T* w, \
      const typename Acc<T>::type* freqs, const typename Acc<T>::type* rstd, int64_t fw,        \
      bool split, T* dx, typename Acc<T>::type* dss, typename Acc<T>::type* part,               \
      typename Acc<T>::type* dn, typename Acc<T>::type* cs, typename Acc<T>::type* sn,          \
      typename Acc<T>::type* wide, int64_t r0, int64_t r1) {                                    \
    bwd_rows<T>(isa, stream, dy, gsh, x, sh, w, freqs, rstd, fw, split, dx, dss, part, dn, cs,  \
                sn, wide, r0, r1);                                                              \
  }
INSTELLA_FOR_EACH_ISA(INSTELLA_QK_WORKERS)

}  // namespace

void qk_sumsq(DType dt, const void* x, QKShape sh, void* ss) {
  dispatch(dt, [&](auto tag, auto isa) {
    using T = decltype(tag);
    using A = typename Acc<T>::type;
    const int64_t rows = sh.s * sh.b, step = 16;
#pragma omp parallel for schedule(static)
    for (int64_t r0 = 0; r0 < rows; r0 += step) {
      qk_sumsq_chunk(isa, static_cast<const T*>(x), sh, static_cast<A*>(ss), r0,
                  r0 + step < rows ? r0 + step : rows);
    }
  });
}

void qk_norm_rope_fwd(DType dt, const void* x, QKShape sh, const void* w, const void* freqs,
                      const void* ss, int64_t full_width, double eps, void* y, void* rstd) {
  dispatch(dt, [&](auto tag, auto isa) {
    using T = decltype(tag);
    using A = typename Acc<T>::type;
    const int64_t rows = sh.s * sh.b, step = 16;
    const bool stream = rows * sh.heads * sh.head_dim * int64_t(sizeof(T)) >= kStreamMinBytes;
#pragma omp parallel
    {
      std::vector<A> scratch(2 * size_t(sh.head_dim) + size_t(sh.heads * sh.head_dim));
#pragma omp for schedule(static)
      for (int64_t r0 = 0; r0 < rows; r0 += step) {
        qk_fwd_chunk(isa, stream, static_cast<const T*>(x), sh, static_cast<const T*>(w),
                  static_cast<const A*>(freqs), static_cast<const A*>(ss), full_width, eps,
                  static_cast<T*>(y), static_cast<A*>(rstd), scratch.data(), scratch.data() + sh.head_dim,
                  scratch.data() + 2 * sh.head_dim, r0, r0 + step < rows ? r0 + step : rows);
      }
    }
  });
}

void qk_norm_rope_bwd(DType dt, const void* dy, QKShape gsh, const void* x, QKShape sh, const void* w,
                      const void* freqs, const void* rstd, int64_t full_width, bool split, void* dx,
                      void* dw, void* dss) {
  dispatch(dt, [&](auto tag, auto isa) {
    using T = decltype(tag);
    using A = typename Acc<T>::type;
    const int64_t rows = sh.s * sh.b, width = sh.heads * sh.head_dim;
    const int64_t per = rows_per_chunk(rows);
    const int64_t chunks = rows == 0 ? 0 : (rows + per - 1) / per;
    std::vector<A> part(size_t(chunks) * size_t(width));
    const bool stream = rows * width * int64_t(sizeof(T)) >= kStreamMinBytes;
#pragma omp parallel
    {
      // dn [width], cos and sin [head_dim each], widened w, x and dy [width + 2 head_dim]
      std::vector<A> scratch(2 * size_t(width) + 4 * size_t(sh.head_dim));
      A* base = scratch.data();
#pragma omp for schedule(static)
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t r0 = c * per, r1 = r0 + per < rows ? r0 + per : rows;
        qk_bwd_chunk(isa, stream, static_cast<const T*>(dy), gsh, static_cast<const T*>(x), sh,
                  static_cast<const T*>(w), static_cast<const A*>(freqs), static_cast<const A*>(rstd),
                  full_width, split, static_cast<T*>(dx), static_cast<A*>(dss),
                  part.data() + c * width, base, base + width, base + width + sh.head_dim,
                  base + width + 2 * sh.head_dim, r0, r1);
      }
    }
    T* dwp = static_cast<T*>(dw);
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < width; ++i) {
      A s = 0;
      for (int64_t c = 0; c < chunks; ++c) s += part[size_t(c) * width + i];
      dwp[i] = to_dtype<T>(s);
    }
  });
}

}  // namespace cpu
}  // namespace instella
