// The large outputs of the CPU ops (y, dx) from a small cache of their own freed blocks.
//
// PyTorch's CPU allocator maps every tensor this size afresh, so each out-of-place op pays for its
// output's pages twice: the OS zeroes them on first touch, then the op writes them (at 16384 tokens
// of RMSNorm this costs about as much as the kernel). A training step allocates the same shapes
// every step, so a block freed by one step's tensor fits the next step's: the cache keeps freed
// output blocks and hands them back, already resident, to an output of the same size in bytes. It
// holds at most INSTELLA_CPU_OUTPUT_CACHE_MB in all (default 512; 0 turns it off), dropping the
// blocks freed longest ago beyond that. Blocks under 1 MiB go straight back to PyTorch's allocator. Tensors from the cache are ordinary CPU tensors whose
// storage cannot be resized.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>

namespace instella {
namespace cpu {

// at::empty(sizes, options) (contiguous), from the cache when the block is large enough.
at::Tensor cached_empty(at::IntArrayRef sizes, const at::TensorOptions& options);

// Bytes the cache holds now (freed blocks waiting for reuse), and its cap.
int64_t output_cache_held();
int64_t output_cache_cap();

}  // namespace cpu
}  // namespace instella
