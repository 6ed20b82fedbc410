// The CPU ops' output cache (output_cache.h).
#include "output_cache.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/core/impl/alloc_cpu.h>

#include <cstdlib>
#include <list>
#include <mutex>
#include <utility>

namespace instella {
namespace cpu {
namespace {

constexpr size_t kMinBytes = size_t(1) << 20;

size_t cap_bytes() {
  static const size_t cap = [] {
    const char* env = std::getenv("INSTELLA_CPU_OUTPUT_CACHE_MB");
    const long long mb = env && *env ? std::atoll(env) : 512;
    return mb > 0 ? size_t(mb) << 20 : size_t(0);
  }();
  return cap;
}

struct Cache {
  std::mutex mu;
  std::list<std::pair<size_t, void*>> blocks;  // freed blocks (size, address), the oldest first
  size_t held = 0;
};

Cache& cache() {
  static Cache* c = new Cache;  // never destroyed: tensors may be freed during interpreter exit
  return *c;
}

void* take(size_t bytes) {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  for (auto it = c.blocks.rbegin(); it != c.blocks.rend(); ++it) {  // the most recently freed first
    if (it->first == bytes) {
      void* p = it->second;
      c.blocks.erase(std::next(it).base());
      c.held -= bytes;
      return p;
    }
  }
  return nullptr;
}

// Keeps a freed block, dropping the oldest ones beyond the cap (shapes no longer in use).
void give_back(size_t bytes, void* p) {
  if (bytes > cap_bytes()) {
    c10::free_cpu(p);
    return;
  }
  std::list<std::pair<size_t, void*>> dropped;
  {
    Cache& c = cache();
    std::lock_guard<std::mutex> lock(c.mu);
    c.blocks.emplace_back(bytes, p);
    c.held += bytes;
    while (c.held > cap_bytes()) {
      c.held -= c.blocks.front().first;
      dropped.splice(dropped.end(), c.blocks, c.blocks.begin());
    }
  }
  for (auto& b : dropped) c10::free_cpu(b.second);
}

}  // namespace

at::Tensor cached_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const size_t bytes = size_t(numel) * options.dtype().itemsize();
  if (bytes < kMinBytes || cap_bytes() == 0) {
    return at::empty(sizes, options.memory_format(at::MemoryFormat::Contiguous));
  }
  void* p = take(bytes);
  if (p == nullptr) p = c10::alloc_cpu(bytes);
  return at::from_blob(p, sizes, [bytes](void* q) { give_back(bytes, q); }, options);
}

int64_t output_cache_held() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  return int64_t(c.held);
}

int64_t output_cache_cap() { return int64_t(cap_bytes()); }

}  // namespace cpu
}  // namespace instella
