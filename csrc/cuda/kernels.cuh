// Host entry points of the CUDA/HIP kernels: raw device pointers, sizes and a stream; no torch
// headers (the torch binding is torch_ops_gpu.cpp). Same contracts as csrc/cpu/kernels.h; the
// weight-gradient kernels take a workspace of partial_chunks(rows) * width Acc values.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

#include "instella_kernels/qk_shape.h"
#include "instella_kernels/scalar.h"

namespace instella {
namespace gpu {

int64_t partial_chunks(int64_t rows);

void rms_norm_fwd(DType dt, const void* x, int64_t x_stride, const void* w, void* y, void* rstd,
                  int64_t rows, int64_t hidden, double eps, cudaStream_t stream);
void rms_norm_bwd(DType dt, const void* dy, int64_t dy_stride, const void* x, int64_t x_stride,
                  const void* w, const void* rstd, void* dx, void* dw, void* workspace, int64_t rows,
                  int64_t hidden, cudaStream_t stream);

void qk_sumsq(DType dt, const void* x, QKShape shape, void* ss, cudaStream_t stream);
void qk_norm_rope_fwd(DType dt, const void* x, QKShape shape, const void* w, const void* freqs,
                      const void* ss, int64_t full_width, double eps, void* y, void* rstd,
                      cudaStream_t stream);
void qk_norm_rope_bwd(DType dt, const void* dy, QKShape dy_shape, const void* x, QKShape x_shape,
                      const void* w, const void* freqs, const void* rstd, int64_t full_width,
                      bool split, void* dx, void* dw, void* dss, void* workspace, cudaStream_t stream);

void swiglu_fwd(DType dt, const void* x, int64_t x_stride, void* y, int64_t rows, int64_t f,
                cudaStream_t stream);
void swiglu_bwd(DType dt, const void* dy, int64_t dy_stride, const void* x, int64_t x_stride,
                void* dx, int64_t rows, int64_t f, cudaStream_t stream);

// cudaGetErrorString of the last launch, or nullptr when it succeeded.
const char* last_error();

}  // namespace gpu
}  // namespace instella
