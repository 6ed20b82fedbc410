// SwiGLU on Megatron's fc1 layout [gate | up] on the GPU (same contract as csrc/cpu/swiglu.cpp):
// elementwise, grid-stride over rows * F.
#include "common.cuh"
#include "kernels.cuh"

namespace instella {
namespace gpu {
namespace {

template <class T>
__global__ void fwd_kernel(const T* x, int64_t xs, T* y, int64_t rows, int64_t f) {
  using A = typename Acc<T>::type;
  const int64_t total = rows * f;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = e / f, i = e % f;
    const A g = to_acc(x[r * xs + i]), u = to_acc(x[r * xs + f + i]);
    y[e] = from_acc<T>(g * sigmoid_acc(g) * u);
  }
}

template <class T>
__global__ void bwd_kernel(const T* dy, int64_t dys, const T* x, int64_t xs, T* dx, int64_t rows,
                           int64_t f) {
  using A = typename Acc<T>::type;
  const int64_t total = rows * f;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = e / f, i = e % f;
    const A g = to_acc(x[r * xs + i]), u = to_acc(x[r * xs + f + i]), gy = to_acc(dy[r * dys + i]);
    const A s = sigmoid_acc(g);
    dx[r * 2 * f + i] = from_acc<T>(gy * u * (s * (A(1) + g * (A(1) - s))));
    dx[r * 2 * f + f + i] = from_acc<T>(gy * (g * s));
  }
}

unsigned grid_for(int64_t total) {
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  return unsigned(blocks < 65535 * 8 ? (blocks > 0 ? blocks : 1) : 65535 * 8);
}

template <class F> void dispatch(DType dt, F&& f) {
  if (dt == DType::f32) f(float{});
  else if (dt == DType::f64) f(double{});
  else f(bf16{});
}

}  // namespace

void swiglu_fwd(DType dt, const void* x, int64_t x_stride, void* y, int64_t rows, int64_t f,
                cudaStream_t stream) {
  if (rows * f == 0) return;
  dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    fwd_kernel<T><<<grid_for(rows * f), kThreads, 0, stream>>>(
        static_cast<const T*>(x), x_stride, static_cast<T*>(y), rows, f);
  });
}

void swiglu_bwd(DType dt, const void* dy, int64_t dy_stride, const void* x, int64_t x_stride,
                void* dx, int64_t rows, int64_t f, cudaStream_t stream) {
  if (rows * f == 0) return;
  dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    bwd_kernel<T><<<grid_for(rows * f), kThreads, 0, stream>>>(
        static_cast<const T*>(dy), dy_stride, static_cast<const T*>(x), x_stride,
        static_cast<T*>(dx), rows, f);
  });
}

}  // namespace gpu
}  // namespace instella
