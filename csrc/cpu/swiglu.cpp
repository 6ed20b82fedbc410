// SwiGLU on Megatron's fc1 output [..., 2F] = [gate | up]: y = silu(gate) * up, computed in Acc
// and rounded once to the input dtype.
#include <math.h>
#include <omp.h>

#include <type_traits>

#include "cpu_common.h"
#include "instella_kernels/math.h"
#include "kernels.h"
#include "sigmoid.h"
#include "stream.h"

namespace instella {
namespace cpu {
namespace {

// s[i] = sigmoid(to_acc(g[i])), i < m, by the explicit vector sigmoid of the level (sigmoid.h; fp32
// math: fp32 and bf16 tensors). Returns the gate in float: g itself for fp32, else gw, filled here.
template <class T, class Tag>
INSTELLA_INLINE const float* gate_sigmoid(Tag isa, const T* g, float* gw, float* s, int64_t m) {
  const float* gp = reinterpret_cast<const float*>(g);
  if constexpr (!std::is_same<T, float>::value) {
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) gw[j] = to_acc(g[j]);
    gp = gw;
  }
  sigmoid_block(isa, gp, s, m);
  return gp;
}

// Rows [r0, r1); stream: write y with streaming stores (stream.h). fp32 rows go through
// silu_mul_block (sigmoid.h: gate, sigmoid and up multiplied in registers, one pass); bf16 rows in
// blocks of kStage values: the block's sigmoids first (in an L1 buffer), then the elementwise rest.
template <class T, class Tag>
INSTELLA_INLINE void fwd_rows(Tag isa, bool stream, const T* x, int64_t xs, T* y, int64_t f, int64_t r0,
                              int64_t r1) {
  using A = typename Acc<T>::type;
  for (int64_t r = r0; r < r1; ++r) {
    const T* g = x + r * xs;
    const T* u = g + f;
    if constexpr (std::is_same<A, double>::value) {
      write_out(isa, stream, y + r * f, f, [&](int64_t i) {
        const A gv = to_acc(g[i]);
        return to_dtype<T>(gv * sigmoid_acc(gv) * to_acc(u[i]));
      });
    } else if constexpr (std::is_same<T, float>::value) {  // one vector pass: the sigmoid stays in registers
      if (!stream) {
        silu_mul_block(isa, g, u, y + r * f, f);
        continue;
      }
      alignas(64) float stage[kStage];
      for (int64_t i0 = 0; i0 < f; i0 += kStage) {
        const int64_t m = f - i0 < kStage ? f - i0 : kStage;
        silu_mul_block(isa, g + i0, u + i0, stage, m);
        stream_bytes(isa, y + r * f + i0, stage, size_t(m) * sizeof(float));
      }
    } else {
      for (int64_t i0 = 0; i0 < f; i0 += kStage) {
        const int64_t m = f - i0 < kStage ? f - i0 : kStage;
        alignas(64) float gw[kStage];
        alignas(64) float s[kStage];
        const float* gp = gate_sigmoid(isa, g + i0, gw, s, m);
        const T* ub = u + i0;
        write_out(isa, stream, y + r * f + i0, m, [&](int64_t j) { return to_dtype<T>(gp[j] * s[j] * to_acc(ub[j])); });
      }
    }
  }
  if (stream) stream_fence();
}

template <class T, class Tag>
INSTELLA_INLINE void bwd_rows(Tag isa, bool stream, const T* dy, int64_t dys, const T* x, int64_t xs, T* dx,
                              int64_t f, int64_t r0, int64_t r1) {
  using A = typename Acc<T>::type;
  // dg = dy u silu'(g) and du = dy silu(g), from gv, its sigmoid sv, uv and dyv.
  auto grads = [](A gv, A sv, A uv, A dyv, T& dgi, T& dui) {
    const A silu = gv * sv;
    const A dsilu = sv * (A(1) + gv * (A(1) - sv));
    dgi = to_dtype<T>(dyv * uv * dsilu);
    dui = to_dtype<T>(dyv * silu);
  };
  for (int64_t r = r0; r < r1; ++r) {
    const T* g = x + r * xs;
    const T* u = g + f;
    const T* gy = dy + r * dys;
    T* dg = dx + r * 2 * f;
    if constexpr (std::is_same<A, double>::value) {
      write_out2(isa, stream, dg, dg + f, f, [&](int64_t i, T& dgi, T& dui) {
        const A gv = to_acc(g[i]);
        grads(gv, sigmoid_acc(gv), to_acc(u[i]), to_acc(gy[i]), dgi, dui);
      });
    } else {
      for (int64_t i0 = 0; i0 < f; i0 += kStage) {
        const int64_t m = f - i0 < kStage ? f - i0 : kStage;
        alignas(64) float gw[kStage];
        alignas(64) float s[kStage];
        const float* gp = gate_sigmoid(isa, g + i0, gw, s, m);
        const T* ub = u + i0;
        const T* gyb = gy + i0;
        write_out2(isa, stream, dg + i0, dg + f + i0, m, [&](int64_t j, T& dgi, T& dui) {
          grads(gp[j], s[j], to_acc(ub[j]), to_acc(gyb[j]), dgi, dui);
        });
      }
    }
  }
  if (stream) stream_fence();
}

// The workers, once per ISA level (isa.h).
#define INSTELLA_SWIGLU_WORKERS(L, TARGET)                                                        \
  template <class T>                                                                              \
  TARGET INSTELLA_WORKER void swiglu_fwd_chunk(IsaTag<L> isa, bool stream, const T* x, int64_t xs, T* y, \
                                               int64_t f, int64_t r0, int64_t r1) {               \
    fwd_rows<T>(isa, stream, x, xs, y, f, r0, r1);                                                \
  }                                                                                               \
  template <class T>                                                                              \
  TARGET INSTELLA_WORKER void swiglu_bwd_chunk(IsaTag<L> isa, bool stream, const T* dy, int64_t dys,   \
                                               const T* x, int64_t xs, T* dx, int64_t f, int64_t r0, \
                                               int64_t r1) {                                      \
    bwd_rows<T>(isa, stream, dy, dys, x, xs, dx, f, r0, r1);                                      \
  }
INSTELLA_FOR_EACH_ISA(INSTELLA_SWIGLU_WORKERS)

}  // namespace

void swiglu_fwd(DType dt, const void* x, int64_t x_stride, void* y, int64_t rows, int64_t f) {
  dispatch(dt, [&](auto tag, auto isa) {
    using T = decltype(tag);
    const int64_t step = 8;
    const bool stream = rows * f * int64_t(sizeof(T)) >= kStreamMinBytes;
#pragma omp parallel for schedule(static)
    for (int64_t r0 = 0; r0 < rows; r0 += step) {
      swiglu_fwd_chunk(isa, stream, static_cast<const T*>(x), x_stride, static_cast<T*>(y), f, r0,
                r0 + step < rows ? r0 + step : rows);
    }
  });
}

void swiglu_bwd(DType dt, const void* dy, int64_t dy_stride, const void* x, int64_t x_stride,
                void* dx, int64_t rows, int64_t f) {
  dispatch(dt, [&](auto tag, auto isa) {
    using T = decltype(tag);
    const int64_t step = 8;
    const bool stream = rows * 2 * f * int64_t(sizeof(T)) >= kStreamMinBytes;
#pragma omp parallel for schedule(static)
    for (int64_t r0 = 0; r0 < rows; r0 += step) {
      swiglu_bwd_chunk(isa, stream, static_cast<const T*>(dy), dy_stride, static_cast<const T*>(x), x_stride,
                static_cast<T*>(dx), f, r0, r0 + step < rows ? r0 + step : rows);
    }
  });
}

}  // namespace cpu
}  // namespace instella
