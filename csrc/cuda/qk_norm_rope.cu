// Full-width QK-norm fused with RoPE on the GPU (same contract as csrc/cpu/qk_norm_rope.cpp).
// One block per (s, b) row; cos/sin of the row's head_dim angles are computed once into shared
// memory; each thread handles rotate-half pairs (d, d + head_dim/2) of every head. The backward
// gives each block a fixed chunk of rows and writes weight-gradient partial sums (deterministic).
#include "common.cuh"
#include "kernels.cuh"

namespace instella {
namespace gpu {
namespace {

template <class A>
__device__ __forceinline__ void load_angles(const A* f, int64_t hd, A* cs, A* sn) {
  for (int64_t d = threadIdx.x; d < hd; d += blockDim.x) sincos_acc(f[d], &sn[d], &cs[d]);
}

template <class T>
__device__ __forceinline__ double row_sumsq(const T* xr, const QKShape& sh) {
  double ss = 0;
  const int64_t hd = sh.head_dim;
  for (int64_t e = threadIdx.x; e < sh.heads * hd; e += blockDim.x) {
    const double v = to_acc(xr[(e / hd) * sh.stride_h + e % hd]);
    ss += v * v;
  }
  return ss;
}

template <class T>
__global__ void __launch_bounds__(kThreads) sumsq_kernel(const T* x, QKShape sh, typename Acc<T>::type* ss) {
  __shared__ double red[kMaxWarps];
  const int64_t r = blockIdx.x;
  const double v = block_sum(row_sumsq<T>(x + (r / sh.b) * sh.stride_s + (r % sh.b) * sh.stride_b, sh), red);
  if (threadIdx.x == 0) ss[r] = typename Acc<T>::type(v);
}

template <class T>
__global__ void __launch_bounds__(kThreads) fwd_kernel(const T* x, QKShape sh, const T* w,
                                                      const typename Acc<T>::type* freqs,
                                                      const typename Acc<T>::type* ss_in,
                                                      int64_t full_width, double eps, T* y,
                                                      typename Acc<T>::type* rstd) {
  using A = typename Acc<T>::type;
  extern __shared__ unsigned char smem[];
  A* cs = reinterpret_cast<A*>(smem);
  A* sn = cs + sh.head_dim;
  __shared__ double red[kMaxWarps];
  const int64_t r = blockIdx.x, is = r / sh.b, ib = r % sh.b;
  const int64_t hd = sh.head_dim, half = hd / 2;
  const T* xr = x + is * sh.stride_s + ib * sh.stride_b;
  load_angles<A>(freqs + is * hd, hd, cs, sn);
  const double ss = ss_in ? double(ss_in[r]) : block_sum(row_sumsq<T>(xr, sh), red);
  __syncthreads();  // angles ready
  const A inv = A(1.0 / sqrt(ss / double(full_width) + eps));
  T* yr = y + r * sh.heads * hd;
  for (int64_t p = threadIdx.x; p < sh.heads * half; p += blockDim.x) {
    const int64_t h = p / half, d = p % half;
    const T* xh = xr + h * sh.stride_h;
    const T* wh = w + h * hd;
    const A a = round_to<T>(to_acc(wh[d]) * round_to<T>(to_acc(xh[d]) * inv));
    const A b = round_to<T>(to_acc(wh[d + half]) * round_to<T>(to_acc(xh[d + half]) * inv));
    yr[h * hd + d] = from_acc<T>(a * cs[d] - b * sn[d]);
    yr[h * hd + d + half] = from_acc<T>(b * cs[d + half] + a * sn[d + half]);
  }
  if (threadIdx.x == 0) rstd[r] = inv;
}

template <class T>
__global__ void __launch_bounds__(kThreads) bwd_kernel(const T* dy, QKShape gsh, const T* x, QKShape sh,
                                                      const T* w, const typename Acc<T>::type* freqs,
                                                      const typename Acc<T>::type* rstd,
                                                      int64_t full_width, bool split, T* dx,
                                                      typename Acc<T>::type* dss,
                                                      typename Acc<T>::type* part, int64_t per) {
  using A = typename Acc<T>::type;
  extern __shared__ unsigned char smem[];
  A* cs = reinterpret_cast<A*>(smem);
  A* sn = cs + sh.head_dim;
  __shared__ double red[kMaxWarps];
  const int64_t hd = sh.head_dim, half = hd / 2, width = sh.heads * hd, rows = sh.s * sh.b;
  A* pc = part + int64_t(blockIdx.x) * width;
  for (int64_t i = threadIdx.x; i < width; i += blockDim.x) pc[i] = 0;
  const int64_t r0 = int64_t(blockIdx.x) * per;
  const int64_t r1 = r0 + per < rows ? r0 + per : rows;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t is = r / sh.b, ib = r % sh.b;
    __syncthreads();  // previous row done with the angles
    load_angles<A>(freqs + is * hd, hd, cs, sn);
    __syncthreads();
    const T* xr = x + is * sh.stride_s + ib * sh.stride_b;
    const T* gr = dy + is * gsh.stride_s + ib * gsh.stride_b;
    const A inv = rstd[r];
    double dot = 0;
    for (int64_t p = threadIdx.x; p < sh.heads * half; p += blockDim.x) {
      const int64_t h = p / half, d = p % half;
      const T* gh = gr + h * gsh.stride_h;
      const T* xh = xr + h * sh.stride_h;
      const A g1 = to_acc(gh[d]), g2 = to_acc(gh[d + half]);
      const A u1 = g1 * cs[d] + g2 * sn[d + half];  // RoPE^T dy
      const A u2 = g2 * cs[d + half] - g1 * sn[d];
      const A x1 = to_acc(xh[d]), x2 = to_acc(xh[d + half]);
      pc[h * hd + d] += u1 * round_to<T>(x1 * inv);  // columns owned by this thread
      pc[h * hd + d + half] += u2 * round_to<T>(x2 * inv);
      dot += double(u1 * to_acc(w[h * hd + d])) * double(x1) +
             double(u2 * to_acc(w[h * hd + d + half])) * double(x2);
    }
    dot = block_sum(dot, red);
    const double c = double(inv) * inv * inv * dot / double(full_width);
    if (split && threadIdx.x == 0) dss[r] = A(-0.5 * c);
    const A cc = split ? A(0) : A(c);
    T* dxr = dx + r * width;
    for (int64_t p = threadIdx.x; p < sh.heads * half; p += blockDim.x) {
      const int64_t h = p / half, d = p % half;
      const T* gh = gr + h * gsh.stride_h;
      const T* xh = xr + h * sh.stride_h;
      const A g1 = to_acc(gh[d]), g2 = to_acc(gh[d + half]);
      const A n1 = (g1 * cs[d] + g2 * sn[d + half]) * to_acc(w[h * hd + d]);
      const A n2 = (g2 * cs[d + half] - g1 * sn[d]) * to_acc(w[h * hd + d + half]);
      dxr[h * hd + d] = from_acc<T>(inv * n1 - cc * to_acc(xh[d]));
      dxr[h * hd + d + half] = from_acc<T>(inv * n2 - cc * to_acc(xh[d + half]));
    }
  }
}

template <class F> void dispatch(DType dt, F&& f) {
  if (dt == DType::f32) f(float{});
  else if (dt == DType::f64) f(double{});
  else f(bf16{});
}

}  // namespace

void qk_sumsq(DType dt, const void* x, QKShape sh, void* ss, cudaStream_t stream) {
  if (sh.s * sh.b == 0) return;
  dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    sumsq_kernel<T><<<unsigned(sh.s * sh.b), kThreads, 0, stream>>>(
        static_cast<const T*>(x), sh, static_cast<typename Acc<T>::type*>(ss));
  });
}

void qk_norm_rope_fwd(DType dt, const void* x, QKShape sh, const void* w, const void* freqs,
                      const void* ss, int64_t full_width, double eps, void* y, void* rstd,
                      cudaStream_t stream) {
  if (sh.s * sh.b == 0) return;
  dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    using A = typename Acc<T>::type;
    fwd_kernel<T><<<unsigned(sh.s * sh.b), kThreads, 2 * sh.head_dim * sizeof(A), stream>>>(
        static_cast<const T*>(x), sh, static_cast<const T*>(w), static_cast<const A*>(freqs),
        static_cast<const A*>(ss), full_width, eps, static_cast<T*>(y), static_cast<A*>(rstd));
  });
}

void qk_norm_rope_bwd(DType dt, const void* dy, QKShape gsh, const void* x, QKShape sh, const void* w,
                      const void* freqs, const void* rstd, int64_t full_width, bool split, void* dx,
                      void* dw, void* dss, void* workspace, cudaStream_t stream) {
  dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    using A = typename Acc<T>::type;
    const int64_t rows = sh.s * sh.b, width = sh.heads * sh.head_dim;
    const int64_t chunks = partial_chunks(rows);
    A* part = static_cast<A*>(workspace);
    if (chunks > 0) {
      bwd_kernel<T><<<unsigned(chunks), kThreads, 2 * sh.head_dim * sizeof(A), stream>>>(
          static_cast<const T*>(dy), gsh, static_cast<const T*>(x), sh, static_cast<const T*>(w),
          static_cast<const A*>(freqs), static_cast<const A*>(rstd), full_width, split,
          static_cast<T*>(dx), static_cast<A*>(dss), part, rows_per_chunk(rows));
    }
    sum_partials<T><<<unsigned((width + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
        part, chunks, width, static_cast<T*>(dw));
  });
}

}  // namespace gpu
}  // namespace instella
