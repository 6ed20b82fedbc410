// Geometry of a q or k tensor in Megatron's [s, b, heads, head_dim] layout; no torch headers.
#pragma once
#include <stdint.h>

namespace instella {

// Element strides of the first three dims; the last dim is contiguous.
struct QKShape {
  int64_t s, b, heads, head_dim;
  int64_t stride_s, stride_b, stride_h;
};

}  // namespace instella
