// RMSNorm with Instella's rounding order on the GPU (same contract as csrc/cpu/rms_norm.cpp):
// one block per row for the forward; the backward gives each block a fixed chunk of rows and
// writes the chunk's weight-gradient partial sums, which sum_partials adds in chunk order.
#include "common.cuh"
#include "kernels.cuh"

namespace instella {
namespace gpu {
namespace {

template <class T>
__global__ void __launch_bounds__(kThreads) rms_fwd_kernel(const T* x, int64_t xs, const T* w, T* y,
                                                          typename Acc<T>::type* rstd, int64_t n,
                                                          double eps) {
  using A = typename Acc<T>::type;
  __shared__ double red[kMaxWarps];
  const int64_t r = blockIdx.x;
  const T* xr = x + r * xs;
  T* yr = y + r * n;
  double ss = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const double v = to_acc(xr[i]);
    ss += v * v;
  }
  ss = block_sum(ss, red);
  const A inv = A(1.0 / sqrt(ss / double(n) + eps));
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    yr[i] = from_acc<T>(to_acc(w[i]) * round_to<T>(to_acc(xr[i]) * inv));
  }
  if (threadIdx.x == 0) rstd[r] = inv;
}

template <class T>
__global__ void __launch_bounds__(kThreads) rms_bwd_kernel(const T* dy, int64_t dys, const T* x,
                                                          int64_t xs, const T* w,
                                                          const typename Acc<T>::type* rstd, T* dx,
                                                          typename Acc<T>::type* part, int64_t rows,
                                                          int64_t n, int64_t per) {
  using A = typename Acc<T>::type;
  __shared__ double red[kMaxWarps];
  A* pc = part + int64_t(blockIdx.x) * n;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) pc[i] = 0;
  const int64_t r0 = int64_t(blockIdx.x) * per;
  const int64_t r1 = r0 + per < rows ? r0 + per : rows;
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = x + r * xs;
    const T* gr = dy + r * dys;
    const A inv = rstd[r];
    double dot = 0;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      const A xv = to_acc(xr[i]), g = to_acc(gr[i]);
      dot += double(g * to_acc(w[i])) * double(xv);
      pc[i] += g * round_to<T>(xv * inv);  // column i is only ever touched by this thread
    }
    dot = block_sum(dot, red);
    const A c = A(double(inv) * inv * inv * dot / double(n));
    T* dxr = dx + r * n;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      dxr[i] = from_acc<T>(inv * to_acc(gr[i]) * to_acc(w[i]) - c * to_acc(xr[i]));
    }
  }
}

template <class F> void dispatch(DType dt, F&& f) {
  if (dt == DType::f32) f(float{});
  else if (dt == DType::f64) f(double{});
  else f(bf16{});
}

}  // namespace

int64_t partial_chunks(int64_t rows) {
  return rows == 0 ? 0 : (rows + rows_per_chunk(rows) - 1) / rows_per_chunk(rows);
}

const char* last_error() {
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

void rms_norm_fwd(DType dt, const void* x, int64_t x_stride, const void* w, void* y, void* rstd,
                  int64_t rows, int64_t hidden, double eps, cudaStream_t stream) {
  if (rows == 0) return;
  dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    using A = typename Acc<T>::type;
    rms_fwd_kernel<T><<<unsigned(rows), kThreads, 0, stream>>>(
        static_cast<const T*>(x), x_stride, static_cast<const T*>(w), static_cast<T*>(y),
        static_cast<A*>(rstd), hidden, eps);
  });
}

void rms_norm_bwd(DType dt, const void* dy, int64_t dy_stride, const void* x, int64_t x_stride,
                  const void* w, const void* rstd, void* dx, void* dw, void* workspace, int64_t rows,
                  int64_t hidden, cudaStream_t stream) {
  dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    using A = typename Acc<T>::type;
    const int64_t chunks = partial_chunks(rows);
    A* part = static_cast<A*>(workspace);
    if (chunks > 0) {
      rms_bwd_kernel<T><<<unsigned(chunks), kThreads, 0, stream>>>(
          static_cast<const T*>(dy), dy_stride, static_cast<const T*>(x), x_stride,
          static_cast<const T*>(w), static_cast<const A*>(rstd), static_cast<T*>(dx), part, rows,
          hidden, rows_per_chunk(rows));
    }
    sum_partials<T><<<unsigned((hidden + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
        part, chunks, hidden, static_cast<T*>(dw));
  });
}

}  // namespace gpu
}  // namespace instella
