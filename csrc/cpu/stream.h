// Streaming (non-temporal) stores of a kernel's output, per ISA level (isa.h).
//
// An output larger than the caches is written once and read by the next op only after much else, so
// going through the cache costs a read of each line before it is written (and, on pages the OS has
// just zeroed for a fresh tensor, a second pass over them). The kernels compute kStage values into an
// L1 buffer with their (auto-vectorised) loop and stream that buffer to the output; small outputs
// (stream == false) are written normally, as the next op finds them in the cache.
#pragma once
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "isa.h"

#if defined(INSTELLA_X86_LEVELS)
#include <immintrin.h>
#endif

namespace instella {
namespace cpu {

constexpr int64_t kStage = 512;                  // values per staged block (2 KiB of fp32)
constexpr int64_t kStreamMinBytes = 16ll << 20;  // outputs from this size on are streamed

#define INSTELLA_STREAM_INLINE inline __attribute__((always_inline))

#if defined(INSTELLA_X86_LEVELS)
// Copies n bytes src -> dst, the vector-aligned middle of dst with non-temporal stores. (Not forced
// inline: write_out, generic over the level, may call a function of a higher target but not inline it.)
#define INSTELLA_STREAM_BYTES(L, TARGET, VEC, BYTES, LOAD, STORE)                            \
  TARGET inline void stream_bytes(IsaTag<L>, void* dst, const void* src, size_t n) {         \
    char* d = static_cast<char*>(dst);                                                        \
    const char* s = static_cast<const char*>(src);                                            \
    size_t head = (BYTES - (reinterpret_cast<uintptr_t>(d) & (BYTES - 1))) & (BYTES - 1);     \
    if (head > n) head = n;                                                                   \
    memcpy(d, s, head);                                                                       \
    size_t i = head;                                                                          \
    for (; i + BYTES <= n; i += BYTES) {                                                      \
      STORE(reinterpret_cast<VEC*>(d + i), LOAD(reinterpret_cast<const VEC*>(s + i)));        \
    }                                                                                         \
    memcpy(d + i, s + i, n - i);                                                              \
  }
INSTELLA_STREAM_BYTES(0, , __m128i, 16, _mm_loadu_si128, _mm_stream_si128)
INSTELLA_STREAM_BYTES(1, INSTELLA_TARGET_AVX2, __m256i, 32, _mm256_loadu_si256, _mm256_stream_si256)
INSTELLA_STREAM_BYTES(2, INSTELLA_TARGET_AVX512, __m512i, 64, _mm512_loadu_si512, _mm512_stream_si512)
#undef INSTELLA_STREAM_BYTES

// Orders this thread's streaming stores before its later stores (call once a worker is done).
INSTELLA_STREAM_INLINE void stream_fence() { _mm_sfence(); }
#else
inline void stream_bytes(IsaTag<0>, void* dst, const void* src, size_t n) { memcpy(dst, src, n); }
INSTELLA_STREAM_INLINE void stream_fence() {}
#endif

// Writes out[i] = f(i) for i in [0, n): through stage blocks and streaming stores when stream is set,
// else directly. f is the kernel's per-element expression (vectorised by the compiler either way).
template <class T, class Tag, class F>
INSTELLA_STREAM_INLINE void write_out(Tag isa, bool stream, T* out, int64_t n, F&& f) {
  if (!stream) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = f(i);
    return;
  }
  alignas(64) T stage[kStage];
  for (int64_t i0 = 0; i0 < n; i0 += kStage) {
    const int64_t m = n - i0 < kStage ? n - i0 : kStage;
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) stage[j] = f(i0 + j);
    stream_bytes(isa, out + i0, stage, size_t(m) * sizeof(T));
  }
}

// The same for two outputs of one expression: f(i, out1[i], out2[i]) assigns both.
template <class T, class Tag, class F>
INSTELLA_STREAM_INLINE void write_out2(Tag isa, bool stream, T* out1, T* out2, int64_t n, F&& f) {
  if (!stream) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) f(i, out1[i], out2[i]);
    return;
  }
  alignas(64) T stage1[kStage];
  alignas(64) T stage2[kStage];
  for (int64_t i0 = 0; i0 < n; i0 += kStage) {
    const int64_t m = n - i0 < kStage ? n - i0 : kStage;
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) f(i0 + j, stage1[j], stage2[j]);
    stream_bytes(isa, out1 + i0, stage1, size_t(m) * sizeof(T));
    stream_bytes(isa, out2 + i0, stage2, size_t(m) * sizeof(T));
  }
}

}  // namespace cpu
}  // namespace instella
