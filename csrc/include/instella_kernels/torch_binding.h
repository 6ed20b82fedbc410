// The torch side of the kernels, shared by the CPU and GPU bindings: input checks that name the
// problem and the fix (raised as ValueError), and the op bodies, generic over a backend B that
// supplies the raw kernels (kernels.h / kernels.cuh), a device test, a workspace allocator and the
// allocator of the large outputs (contiguous).
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <string>
#include <tuple>
#include <vector>

#include "instella_kernels/qk_shape.h"
#include "instella_kernels/scalar.h"

namespace instella {

using at::Tensor;

inline DType dtype_of(const Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::f32;
    case at::kDouble: return DType::f64;
    case at::kBFloat16: return DType::bf16;
    default:
      TORCH_CHECK_VALUE(false, op, ": unsupported dtype ", t.scalar_type(),
                  "; supported are float32, float64 and bfloat16 (cast the input first)");
  }
}

inline at::ScalarType acc_type(const Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

template <class B> void check_device(const char* op, std::initializer_list<const Tensor*> ts) {
  for (const Tensor* t : ts) {
    TORCH_CHECK_VALUE(B::on_device(*t), op, ": expected ", B::kDevice, " tensors but got one on ",
                      t->device(), "; this is the ", B::kDevice, " kernel (", B::kHint, ")");
  }
}

inline void check_same_dtype(const char* op, const Tensor& x, const Tensor& other, const char* name) {
  TORCH_CHECK_VALUE(other.scalar_type() == x.scalar_type(), op, ": ", name, " has dtype ",
              other.scalar_type(), " but x has ", x.scalar_type(), "; cast ", name,
              " to the dtype of x");
}

// x as [rows, n] with a row stride and a contiguous last dim (copies only when it must).
inline Tensor as_rows(const Tensor& x, int64_t n) {
  Tensor m = x.reshape({-1, n});
  return n > 1 && m.stride(1) != 1 ? m.contiguous() : m;
}

template <class B>
std::tuple<Tensor, Tensor> rms_norm_fwd(const Tensor& x, const Tensor& w, double eps) {
  const char* op = "instella::rms_norm_fwd";
  check_device<B>(op, {&x, &w});
  const typename B::Guard guard(x.device());
  const DType dt = dtype_of(x, op);
  check_same_dtype(op, x, w, "weight");
  TORCH_CHECK_VALUE(x.dim() >= 1 && w.dim() == 1 && w.size(0) == x.size(-1), op, ": weight shape ",
              w.sizes(), " does not match the last dim of x ", x.sizes(), "; expected [", 
              x.dim() ? x.size(-1) : 0, "]");
  const int64_t n = x.size(-1);
  Tensor xm = as_rows(x, n), wc = w.contiguous();
  Tensor y = B::output(x.sizes(), x.options());
  Tensor rstd = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(acc_type(x)));
  B::rms_norm_fwd(dt, xm.data_ptr(), xm.stride(0), wc.data_ptr(), y.data_ptr(), rstd.data_ptr(),
                  xm.size(0), n, eps);
  return {y, rstd};
}

template <class B>
std::tuple<Tensor, Tensor> rms_norm_bwd(const Tensor& dy, const Tensor& x, const Tensor& w,
                                        const Tensor& rstd) {
  const char* op = "instella::rms_norm_bwd";
  check_device<B>(op, {&dy, &x, &w, &rstd});
  const typename B::Guard guard(x.device());
  const DType dt = dtype_of(x, op);
  check_same_dtype(op, x, w, "weight");
  check_same_dtype(op, x, dy, "grad");
  TORCH_CHECK_VALUE(dy.sizes() == x.sizes() && w.dim() == 1 && w.size(0) == x.size(-1) &&
                  rstd.numel() * x.size(-1) == x.numel() && rstd.scalar_type() == acc_type(x),
              op, ": inconsistent shapes/dtypes: grad ", dy.sizes(), ", x ", x.sizes(), ", weight ",
              w.sizes(), ", rstd ", rstd.sizes(), " ", rstd.scalar_type(),
              "; pass the tensors saved by rms_norm_fwd");
  const int64_t n = x.size(-1);
  Tensor xm = as_rows(x, n), gm = as_rows(dy, n), wc = w.contiguous(), rc = rstd.contiguous();
  Tensor dx = B::output(x.sizes(), x.options());
  Tensor dw = at::empty({n}, w.options());
  Tensor ws = B::workspace(x, xm.size(0), n);
  B::rms_norm_bwd(dt, gm.data_ptr(), gm.stride(0), xm.data_ptr(), xm.stride(0), wc.data_ptr(),
                  rc.data_ptr(), dx.data_ptr(), dw.data_ptr(), ws.data_ptr(), xm.size(0), n);
  return {dx, dw};
}

// [s, b, heads, head_dim] geometry; copies x only when its last dim is strided.
inline QKShape qk_shape(const char* op, Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": expected q or k of shape [s, b, heads, head_dim], got ",
              x.sizes(), " (Megatron's layout)");
  TORCH_CHECK_VALUE(x.size(3) % 2 == 0, op, ": head_dim ", x.size(3),
              " is odd; rotate-half RoPE needs an even head_dim");
  if (x.stride(3) != 1) x = x.contiguous();
  return QKShape{x.size(0), x.size(1), x.size(2), x.size(3), x.stride(0), x.stride(1), x.stride(2)};
}

inline Tensor freqs_table(const char* op, const Tensor& freqs, const Tensor& x) {
  TORCH_CHECK_VALUE(freqs.scalar_type() == at::kFloat || freqs.scalar_type() == at::kDouble, op,
              ": freqs must be float32 or float64 (RoPE angles), got ", freqs.scalar_type());
  TORCH_CHECK_VALUE(freqs.dim() >= 2 && freqs.size(0) == x.size(0) && freqs.size(-1) == x.size(3) &&
                  freqs.numel() == x.size(0) * x.size(3),
              op, ": freqs of shape ", freqs.sizes(), " do not match x ", x.sizes(),
              "; expected [s, 1, 1, head_dim] = [", x.size(0), ", 1, 1, ", x.size(3), "]");
  return freqs.to(acc_type(x)).reshape({x.size(0), x.size(3)}).contiguous();
}

inline void check_qk_weight(const char* op, const Tensor& x, const Tensor& w) {
  check_same_dtype(op, x, w, "weight");
  TORCH_CHECK_VALUE(w.dim() == 1 && w.size(0) == x.size(2) * x.size(3), op, ": weight of shape ",
              w.sizes(), " does not cover the local width heads*head_dim = ", x.size(2) * x.size(3),
              " of x ", x.sizes());
}

template <class B>
std::tuple<Tensor, Tensor> qk_fwd_impl(const char* op, const Tensor& x_in, const Tensor& w,
                                       const Tensor& freqs, const Tensor* ss, int64_t full_width,
                                       double eps) {
  Tensor x = x_in;
  check_device<B>(op, {&x, &w, &freqs});
  const typename B::Guard guard(x.device());
  const DType dt = dtype_of(x, op);
  QKShape sh = qk_shape(op, x);
  check_qk_weight(op, x, w);
  Tensor f = freqs_table(op, freqs, x);
  Tensor ssc;
  if (ss) {
    check_device<B>(op, {ss});
    TORCH_CHECK_VALUE(ss->scalar_type() == acc_type(x) && ss->numel() == sh.s * sh.b, op,
                ": ss must hold ", sh.s * sh.b, " sums of squares of dtype ", acc_type(x),
                " (the output of qk_sumsq, all-reduced), got ", ss->sizes(), " ", ss->scalar_type());
    TORCH_CHECK_VALUE(full_width >= sh.heads * sh.head_dim, op, ": full_width ", full_width,
                " is smaller than the local width ", sh.heads * sh.head_dim,
                "; pass the width of q or k before tensor-parallel splitting");
    ssc = ss->contiguous();
  }
  Tensor wc = w.contiguous();
  Tensor y = B::output(x.sizes(), x.options());
  Tensor rstd = at::empty({sh.s, sh.b}, x.options().dtype(acc_type(x)));
  B::qk_norm_rope_fwd(dt, x.data_ptr(), sh, wc.data_ptr(), f.data_ptr(),
                      ss ? ssc.data_ptr() : nullptr, full_width, eps, y.data_ptr(), rstd.data_ptr());
  return {y, rstd};
}

template <class B>
std::tuple<Tensor, Tensor> qk_norm_rope_fwd(const Tensor& x, const Tensor& w, const Tensor& freqs,
                                            double eps) {
  return qk_fwd_impl<B>("instella::qk_norm_rope_fwd", x, w, freqs, nullptr,
                     x.dim() == 4 ? x.size(2) * x.size(3) : 0, eps);
}

template <class B>
std::tuple<Tensor, Tensor> qk_norm_rope_apply(const Tensor& x, const Tensor& w, const Tensor& freqs,
                                              const Tensor& ss, int64_t full_width, double eps) {
  return qk_fwd_impl<B>("instella::qk_norm_rope_apply", x, w, freqs, &ss, full_width, eps);
}

template <class B>
Tensor qk_sumsq(const Tensor& x_in) {
  const char* op = "instella::qk_sumsq";
  Tensor x = x_in;
  check_device<B>(op, {&x});
  const typename B::Guard guard(x.device());
  const DType dt = dtype_of(x, op);
  QKShape sh = qk_shape(op, x);
  Tensor ss = at::empty({sh.s, sh.b}, x.options().dtype(acc_type(x)));
  B::qk_sumsq(dt, x.data_ptr(), sh, ss.data_ptr());
  return ss;
}

template <class B>
std::tuple<Tensor, Tensor, Tensor> qk_norm_rope_bwd(const Tensor& dy_in, const Tensor& x_in,
                                                    const Tensor& w, const Tensor& freqs,
                                                    const Tensor& rstd, int64_t full_width,
                                                    bool split) {
  const char* op = "instella::qk_norm_rope_bwd";
  Tensor x = x_in, dy = dy_in;
  check_device<B>(op, {&dy, &x, &w, &freqs, &rstd});
  const typename B::Guard guard(x.device());
  const DType dt = dtype_of(x, op);
  check_same_dtype(op, x, dy, "grad");
  QKShape sh = qk_shape(op, x);
  TORCH_CHECK_VALUE(dy.sizes() == x.sizes(), op, ": grad ", dy.sizes(), " and x ", x.sizes(),
              " differ in shape");
  QKShape gsh = qk_shape(op, dy);
  check_qk_weight(op, x, w);
  Tensor f = freqs_table(op, freqs, x);
  TORCH_CHECK_VALUE(rstd.scalar_type() == acc_type(x) && rstd.numel() == sh.s * sh.b &&
                  full_width >= sh.heads * sh.head_dim,
              op, ": rstd ", rstd.sizes(), " ", rstd.scalar_type(), " / full_width ", full_width,
              " inconsistent with x ", x.sizes(), "; pass what the forward op saved");
  Tensor wc = w.contiguous(), rc = rstd.contiguous();
  Tensor dx = B::output(x.sizes(), x.options());
  Tensor dw = at::empty({sh.heads * sh.head_dim}, w.options());
  Tensor dss = at::empty({split ? sh.s : 0, split ? sh.b : 0}, x.options().dtype(acc_type(x)));
  Tensor ws = B::workspace(x, sh.s * sh.b, sh.heads * sh.head_dim);
  B::qk_norm_rope_bwd(dt, dy.data_ptr(), gsh, x.data_ptr(), sh, wc.data_ptr(), f.data_ptr(),
                      rc.data_ptr(), full_width, split, dx.data_ptr(), dw.data_ptr(),
                      split ? dss.data_ptr() : nullptr, ws.data_ptr());
  return {dx, dw, dss};
}

inline int64_t swiglu_width(const char* op, const Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) % 2 == 0, op, ": the last dim of x ", x.sizes(),
              " must be even: it holds [gate | up] (Megatron's fc1 output with gated_linear_unit)");
  return x.size(-1) / 2;
}

template <class B>
Tensor swiglu_fwd(const Tensor& x) {
  const char* op = "instella::swiglu_fwd";
  check_device<B>(op, {&x});
  const typename B::Guard guard(x.device());
  const DType dt = dtype_of(x, op);
  const int64_t f = swiglu_width(op, x);
  Tensor xm = as_rows(x, 2 * f);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = f;
  Tensor y = B::output(shape, x.options());
  B::swiglu_fwd(dt, xm.data_ptr(), xm.stride(0), y.data_ptr(), xm.size(0), f);
  return y;
}

template <class B>
Tensor swiglu_bwd(const Tensor& dy, const Tensor& x) {
  const char* op = "instella::swiglu_bwd";
  check_device<B>(op, {&dy, &x});
  const typename B::Guard guard(x.device());
  const DType dt = dtype_of(x, op);
  check_same_dtype(op, x, dy, "grad");
  const int64_t f = swiglu_width(op, x);
  TORCH_CHECK_VALUE(dy.dim() == x.dim() && dy.size(-1) == f && dy.numel() * 2 == x.numel(), op,
              ": grad ", dy.sizes(), " does not match x ", x.sizes(), " (expected last dim ", f, ")");
  Tensor xm = as_rows(x, 2 * f), gm = as_rows(dy, f);
  Tensor dx = B::output(x.sizes(), x.options());
  B::swiglu_bwd(dt, gm.data_ptr(), gm.stride(0), xm.data_ptr(), xm.stride(0), dx.data_ptr(),
                xm.size(0), f);
  return dx;
}

}  // namespace instella

