// torch binding of the CUDA (or, hipified, ROCm) kernels: registers CUDA implementations of the
// instella:: ops defined in instella_plugin/kernels/ops.py. Kernels run on the current stream of
// the tensors' device; weight-gradient workspaces come from torch's caching allocator.
#include <Python.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "instella_kernels/torch_binding.h"
#include "kernels.cuh"

namespace instella {
namespace {

void check_launch() {
  const char* err = gpu::last_error();
  TORCH_CHECK(err == nullptr, "instella GPU kernel launch failed: ", err);
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream(); }

struct GpuBackend {
  static constexpr const char* kDevice = "CUDA";
  static constexpr const char* kHint = "move all inputs to the same GPU";
  using Guard = c10::cuda::CUDAGuard;
  static bool on_device(const Tensor& t) { return t.device().is_cuda(); }
  static Tensor output(at::IntArrayRef sizes, const at::TensorOptions& options) {
    return at::empty(sizes, options.memory_format(at::MemoryFormat::Contiguous));
  }
  static Tensor workspace(const Tensor& x, int64_t rows, int64_t width) {
    const at::ScalarType acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    return at::empty({gpu::partial_chunks(rows) * width + 1}, x.options().dtype(acc));
  }
  static void rms_norm_fwd(DType dt, const void* x, int64_t xs, const void* w, void* y, void* rstd,
                           int64_t rows, int64_t n, double eps) {
    gpu::rms_norm_fwd(dt, x, xs, w, y, rstd, rows, n, eps, stream());
    check_launch();
  }
  static void rms_norm_bwd(DType dt, const void* dy, int64_t dys, const void* x, int64_t xs,
                           const void* w, const void* rstd, void* dx, void* dw, void* ws, int64_t rows,
                           int64_t n) {
    gpu::rms_norm_bwd(dt, dy, dys, x, xs, w, rstd, dx, dw, ws, rows, n, stream());
    check_launch();
  }
  static void qk_sumsq(DType dt, const void* x, QKShape sh, void* ss) {
    gpu::qk_sumsq(dt, x, sh, ss, stream());
    check_launch();
  }
  static void qk_norm_rope_fwd(DType dt, const void* x, QKShape sh, const void* w, const void* f,
                               const void* ss, int64_t fw, double eps, void* y, void* rstd) {
    gpu::qk_norm_rope_fwd(dt, x, sh, w, f, ss, fw, eps, y, rstd, stream());
    check_launch();
  }
  static void qk_norm_rope_bwd(DType dt, const void* dy, QKShape gsh, const void* x, QKShape sh,
                               const void* w, const void* f, const void* rstd, int64_t fw, bool split,
                               void* dx, void* dw, void* dss, void* ws) {
    gpu::qk_norm_rope_bwd(dt, dy, gsh, x, sh, w, f, rstd, fw, split, dx, dw, dss, ws, stream());
    check_launch();
  }
  static void swiglu_fwd(DType dt, const void* x, int64_t xs, void* y, int64_t rows, int64_t f) {
    gpu::swiglu_fwd(dt, x, xs, y, rows, f, stream());
    check_launch();
  }
  static void swiglu_bwd(DType dt, const void* dy, int64_t dys, const void* x, int64_t xs, void* dx,
                         int64_t rows, int64_t f) {
    gpu::swiglu_bwd(dt, dy, dys, x, xs, dx, rows, f, stream());
    check_launch();
  }
};

}  // namespace
}  // namespace instella

TORCH_LIBRARY_IMPL(instella, CUDA, m) {
  using B = instella::GpuBackend;
  m.impl("rms_norm_fwd", &instella::rms_norm_fwd<B>);
  m.impl("rms_norm_bwd", &instella::rms_norm_bwd<B>);
  m.impl("qk_sumsq", &instella::qk_sumsq<B>);
  m.impl("qk_norm_rope_fwd", &instella::qk_norm_rope_fwd<B>);
  m.impl("qk_norm_rope_apply", &instella::qk_norm_rope_apply<B>);
  m.impl("qk_norm_rope_bwd", &instella::qk_norm_rope_bwd<B>);
  m.impl("swiglu_fwd", &instella::swiglu_fwd<B>);
  m.impl("swiglu_bwd", &instella::swiglu_bwd<B>);
}

// Importing the module (instella_plugin.kernels._gpu) runs the registration above.
PyMODINIT_FUNC PyInit__gpu(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "_gpu", "instella GPU kernels", -1, nullptr};
  return PyModule_Create(&def);
}
