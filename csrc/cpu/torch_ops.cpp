// torch binding of the CPU kernels: registers CPU implementations of the instella:: ops whose
// schemas, fake (meta) implementations and autograd formulas are defined in Python
// (instella_plugin/kernels/ops.py). Checks and op bodies: instella_kernels/torch_binding.h.
#include <Python.h>
#include <torch/library.h>

#include <exception>

#include "instella_kernels/torch_binding.h"
#include "isa.h"
#include "kernels.h"
#include "output_cache.h"

namespace instella {
namespace {

struct CpuBackend {
  static constexpr const char* kDevice = "CPU";
  static constexpr const char* kHint =
      "build the GPU extension with INSTELLA_KERNELS=all on a CUDA/ROCm torch, or move the tensors to the CPU";
  struct Guard {
    explicit Guard(const at::Device&) {}
  };
  static bool on_device(const Tensor& t) { return t.device().is_cpu(); }
  static Tensor output(at::IntArrayRef sizes, const at::TensorOptions& options) {
    return cpu::cached_empty(sizes, options);
  }
  static Tensor workspace(const Tensor& x, int64_t, int64_t) { return at::empty({0}, x.options()); }
  static void rms_norm_fwd(DType dt, const void* x, int64_t xs, const void* w, void* y, void* rstd,
                           int64_t rows, int64_t n, double eps) {
    cpu::rms_norm_fwd(dt, x, xs, w, y, rstd, rows, n, eps);
  }
  static void rms_norm_bwd(DType dt, const void* dy, int64_t dys, const void* x, int64_t xs,
                           const void* w, const void* rstd, void* dx, void* dw, void*, int64_t rows,
                           int64_t n) {
    cpu::rms_norm_bwd(dt, dy, dys, x, xs, w, rstd, dx, dw, rows, n);
  }
  static void qk_sumsq(DType dt, const void* x, QKShape sh, void* ss) { cpu::qk_sumsq(dt, x, sh, ss); }
  static void qk_norm_rope_fwd(DType dt, const void* x, QKShape sh, const void* w, const void* f,
                               const void* ss, int64_t fw, double eps, void* y, void* rstd) {
    cpu::qk_norm_rope_fwd(dt, x, sh, w, f, ss, fw, eps, y, rstd);
  }
  static void qk_norm_rope_bwd(DType dt, const void* dy, QKShape gsh, const void* x, QKShape sh,
                               const void* w, const void* f, const void* rstd, int64_t fw, bool split,
                               void* dx, void* dw, void* dss, void*) {
    cpu::qk_norm_rope_bwd(dt, dy, gsh, x, sh, w, f, rstd, fw, split, dx, dw, dss);
  }
  static void swiglu_fwd(DType dt, const void* x, int64_t xs, void* y, int64_t rows, int64_t f) {
    cpu::swiglu_fwd(dt, x, xs, y, rows, f);
  }
  static void swiglu_bwd(DType dt, const void* dy, int64_t dys, const void* x, int64_t xs, void* dx,
                         int64_t rows, int64_t f) {
    cpu::swiglu_bwd(dt, dy, dys, x, xs, dx, rows, f);
  }
};

}  // namespace
}  // namespace instella

TORCH_LIBRARY_IMPL(instella, CPU, m) {
  using B = instella::CpuBackend;
  m.impl("rms_norm_fwd", &instella::rms_norm_fwd<B>);
  m.impl("rms_norm_bwd", &instella::rms_norm_bwd<B>);
  m.impl("qk_sumsq", &instella::qk_sumsq<B>);
  m.impl("qk_norm_rope_fwd", &instella::qk_norm_rope_fwd<B>);
  m.impl("qk_norm_rope_apply", &instella::qk_norm_rope_apply<B>);
  m.impl("qk_norm_rope_bwd", &instella::qk_norm_rope_bwd<B>);
  m.impl("swiglu_fwd", &instella::swiglu_fwd<B>);
  m.impl("swiglu_bwd", &instella::swiglu_bwd<B>);
}

// Which ISA level the ops dispatch to (isa.h), for kernels.dispatched_isa() and the logs.
namespace {

const char* const kOps[] = {"rms_norm", "qk_norm_rope", "swiglu"};

// {op: level name} of the next call of each op: INSTELLA_CPU_ISA or the best level of this CPU.
// An unknown or unsupported INSTELLA_CPU_ISA raises ValueError saying which levels run here.
PyObject* dispatched_isa(PyObject*, PyObject*) {
  int level;
  try {
    level = instella::cpu::dispatch_isa();
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
    return nullptr;
  }
  PyObject* out = PyDict_New();
  for (const char* op : kOps) {
    PyObject* name = PyUnicode_FromString(instella::cpu::isa_name(level));
    PyDict_SetItemString(out, op, name);
    Py_DECREF(name);
  }
  return out;
}

// The levels this CPU runs, best first (those INSTELLA_CPU_ISA may name).
PyObject* supported_isas(PyObject*, PyObject*) {
  PyObject* out = PyList_New(0);
  for (int l = instella::cpu::best_isa(); l >= 0; --l) {
    PyObject* name = PyUnicode_FromString(instella::cpu::isa_name(l));
    PyList_Append(out, name);
    Py_DECREF(name);
  }
  return out;
}

// {"held": bytes of freed outputs the cache holds now, "cap": its cap} (output_cache.h).
PyObject* output_cache(PyObject*, PyObject*) {
  return Py_BuildValue("{s:L,s:L}", "held", (long long)instella::cpu::output_cache_held(), "cap",
                       (long long)instella::cpu::output_cache_cap());
}

PyMethodDef kMethods[] = {
    {"dispatched_isa", dispatched_isa, METH_NOARGS, "{op: ISA level its next call runs}"},
    {"supported_isas", supported_isas, METH_NOARGS, "ISA levels this CPU runs, best first"},
    {"output_cache", output_cache, METH_NOARGS, "{held, cap}: bytes of the CPU ops' output cache"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

// Importing the module (instella_plugin.kernels._cpu) runs the registration above.
PyMODINIT_FUNC PyInit__cpu(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "_cpu", "instella CPU kernels", -1, kMethods};
  return PyModule_Create(&def);
}
