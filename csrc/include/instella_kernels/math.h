// Elementary functions for the kernels, identical on CPU and GPU; no torch headers.
//
// The fp32 paths (bf16 and fp32 tensors) evaluate in double with branch-free code the compilers
// vectorise, then round once to float: cos/sin of a RoPE angle and the SwiGLU sigmoid are then
// correctly rounded in practice, at least as accurate as torch's own fp32 cos/sin/exp. The fp64
// paths (tensors of dtype float64, used by gradcheck) call the C library.
#pragma once
#include <math.h>

#include "scalar.h"

namespace instella {

// sin and cos of r for |r| <= pi/4 (+ rounding slack): Taylor series, truncation error < 1e-16.
INSTELLA_HD void sincos_small(double r, double* s, double* c) {
  const double r2 = r * r;
  double ps = 1.0 / 355687428096000.0;   // 1/17!
  ps = ps * r2 - 1.0 / 1307674368000.0;  // 1/15!
  ps = ps * r2 + 1.0 / 6227020800.0;     // 1/13!
  ps = ps * r2 - 1.0 / 39916800.0;       // 1/11!
  ps = ps * r2 + 1.0 / 362880.0;         // 1/9!
  ps = ps * r2 - 1.0 / 5040.0;
  ps = ps * r2 + 1.0 / 120.0;
  ps = ps * r2 - 1.0 / 6.0;
  *s = r + r * r2 * ps;
  double pc = 1.0 / 6402373705728000.0;  // 1/18!
  pc = pc * r2 - 1.0 / 20922789888000.0; // 1/16!
  pc = pc * r2 + 1.0 / 87178291200.0;    // 1/14!
  pc = pc * r2 - 1.0 / 479001600.0;      // 1/12!
  pc = pc * r2 + 1.0 / 3628800.0;        // 1/10!
  pc = pc * r2 - 1.0 / 40320.0;
  pc = pc * r2 + 1.0 / 720.0;
  pc = pc * r2 - 1.0 / 24.0;
  pc = pc * r2 + 0.5;
  *c = 1.0 - r2 * pc;
}

// cos/sin of a float angle (|a| up to ~1e6 rad, ample for RoPE positions), rounded to float.
INSTELLA_HD void sincos_acc(float a, float* s_out, float* c_out) {
  const double x = double(a);
  const double k = rint(x * 0.63661977236758134308);  // 2/pi
  double r = fma(-k, 1.5707963267948966, x);           // pi/2, high part
  r = fma(-k, 6.123233995736766e-17, r);               // pi/2, low part
  double s, c;
  sincos_small(r, &s, &c);
  const double q = k - 4.0 * floor(k * 0.25);  // quadrant 0..3
  const double sin_v = q == 0.0 ? s : q == 1.0 ? c : q == 2.0 ? -s : -c;
  const double cos_v = q == 0.0 ? c : q == 1.0 ? -s : q == 2.0 ? -c : s;
  *s_out = float(sin_v);
  *c_out = float(cos_v);
}

INSTELLA_HD void sincos_acc(double a, double* s_out, double* c_out) {
  *s_out = sin(a);
  *c_out = cos(a);
}

// exp(x) for |x| <= 200 in double: exp(r) * 2^k with |r| <= ln2/2, Taylor to r^13.
INSTELLA_HD double exp_bounded(double x) {
  const double k = rint(x * 1.4426950408889634);
  double r = fma(-k, 0.6931471805599453, x);
  r = fma(-k, 2.3190468138462996e-17, r);
  double p = 1.0 / 6227020800.0;  // 1/13!
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r + 1.0;
  p = p * r + 1.0;
  const int64_t bits = (int64_t(k) + 1023) << 52;  // 2^k, |k| <= 289
  double scale;
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
  scale = __longlong_as_double(bits);
#else
  memcpy(&scale, &bits, sizeof scale);
#endif
  return p * scale;
}

// Logistic sigmoid of a float, evaluated in double (the input is clamped where it saturates).
INSTELLA_HD double sigmoid_acc(float g) {
  double t = -double(g);
  t = t > 200.0 ? 200.0 : (t < -200.0 ? -200.0 : t);
  return 1.0 / (1.0 + exp_bounded(t));
}

INSTELLA_HD double sigmoid_acc(double g) { return 1.0 / (1.0 + exp(-g)); }

}  // namespace instella
