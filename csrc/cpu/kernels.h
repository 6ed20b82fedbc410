// CPU kernels: raw pointers and sizes, no torch headers (the torch binding is torch_ops.cpp).
//
// Every kernel is deterministic: rows are independent, and the weight gradient is summed in fixed
// chunks of rows (chunking depends on the shape only, never on the thread count) whose partial sums
// are then added in chunk order. Accumulation is in Acc<T> (fp32 for bf16/fp32, fp64 for fp64).
#pragma once
#include <stdint.h>

#include "instella_kernels/qk_shape.h"
#include "instella_kernels/scalar.h"

namespace instella {
namespace cpu {

// RMSNorm over the last dimension of a [rows, hidden] matrix whose rows are x_stride elements apart.
// y (contiguous, dtype of x) = weight * cast(x * rstd); rstd (Acc, [rows]) = 1/sqrt(mean(x^2) + eps).
void rms_norm_fwd(DType dt, const void* x, int64_t x_stride, const void* w, void* y, void* rstd,
                  int64_t rows, int64_t hidden, double eps);
// dx (contiguous) and dw (dtype of w, [hidden]) from dy, x and the saved rstd.
void rms_norm_bwd(DType dt, const void* dy, int64_t dy_stride, const void* x, int64_t x_stride,
                  const void* w, const void* rstd, void* dx, void* dw, int64_t rows, int64_t hidden);

// Sum of squares of each (s, b) row over heads*head_dim, into ss (Acc, [s*b]).
void qk_sumsq(DType dt, const void* x, QKShape shape, void* ss);
// Full-width RMSNorm (mean over full_width elements) then rotate-half RoPE with angles freqs
// (Acc, contiguous [s, head_dim]). With ss == nullptr the sum of squares is this tensor's own
// (full_width = heads*head_dim); otherwise ss holds the TP-reduced sums. Writes y (contiguous) and
// rstd (Acc, [s*b]).
void qk_norm_rope_fwd(DType dt, const void* x, QKShape shape, const void* w, const void* freqs,
                      const void* ss, int64_t full_width, double eps, void* y, void* rstd);
// Backward of qk_norm_rope_fwd. split == false: dx is the full gradient. split == true (TP apply
// kernel): dx is the direct part r*dn and dss (Acc, [s*b]) the gradient of the sum of squares.
void qk_norm_rope_bwd(DType dt, const void* dy, QKShape dy_shape, const void* x, QKShape x_shape,
                      const void* w, const void* freqs, const void* rstd, int64_t full_width,
                      bool split, void* dx, void* dw, void* dss);

// SwiGLU on Megatron's fc1 layout: x rows are [gate (F) | up (F)]; y = silu(gate) * up, [rows, F].
void swiglu_fwd(DType dt, const void* x, int64_t x_stride, void* y, int64_t rows, int64_t f);
// dx ([rows, 2F], contiguous) from dy ([rows, F], rows dy_stride apart) and x.
void swiglu_bwd(DType dt, const void* dy, int64_t dy_stride, const void* x, int64_t x_stride,
                void* dx, int64_t rows, int64_t f);

}  // namespace cpu
}  // namespace instella
