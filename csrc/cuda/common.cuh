// Device helpers shared by the CUDA kernels; compiles with nvcc and, after torch's hipify, hipcc.
//
// Warp shuffles sit behind one macro: CUDA has __shfl_xor_sync with a 32-bit lane mask, HIP has
// __shfl_xor over a 64-wide wavefront on CDNA (gfx90a, gfx94x). Reductions use warpSize, never a
// literal 32, and accumulate in double, as the CPU kernels do.
#pragma once
#include <stdint.h>

#include "instella_kernels/math.h"
#include "instella_kernels/scalar.h"

#if defined(__HIPCC__) || defined(__HIP_PLATFORM_AMD__)
#define INSTELLA_SHFL_XOR(v, mask) __shfl_xor((v), (mask))
#else
#define INSTELLA_SHFL_XOR(v, mask) __shfl_xor_sync(0xffffffffu, (v), (mask))
#endif

namespace instella {
namespace gpu {

constexpr int kThreads = 256;     // threads per block of the row kernels (a multiple of 64)
constexpr int kMaxWarps = 32;     // kThreads / smallest warp size
constexpr int64_t kMaxChunks = 512;  // row chunks of a deterministic column sum

__host__ __device__ inline int64_t rows_per_chunk(int64_t rows) {
  return rows <= kMaxChunks ? 1 : (rows + kMaxChunks - 1) / kMaxChunks;
}

__device__ __forceinline__ double warp_sum(double v) {
  for (int m = warpSize / 2; m > 0; m >>= 1) v += INSTELLA_SHFL_XOR(v, m);
  return v;
}

// Sum over the block (blockDim.x a multiple of warpSize); every thread gets the result.
// Fixed reduction tree, so the result is the same on every run.
__device__ __forceinline__ double block_sum(double v, double* shared /* kMaxWarps */) {
  const int lane = threadIdx.x % warpSize, warp = threadIdx.x / warpSize;
  const int warps = blockDim.x / warpSize;
  v = warp_sum(v);
  __syncthreads();  // shared may still be read by a previous call
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  double total = 0;
  for (int i = 0; i < warps; ++i) total += shared[i];
  return total;
}

// out[i] = sum over chunks c (in order) of part[c * n + i], rounded to T.
template <class T>
__global__ void sum_partials(const typename Acc<T>::type* part, int64_t chunks, int64_t n, T* out) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  typename Acc<T>::type s = 0;
  for (int64_t c = 0; c < chunks; ++c) s += part[c * n + i];
  out[i] = from_acc<T>(s);
}

}  // namespace gpu
}  // namespace instella
