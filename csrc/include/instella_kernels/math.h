// Elementary functions for the kernels, identical on CPU and GPU; no torch headers.
//
// Branch-free plain arithmetic (+ - * /, compares, integer shifts) that the compilers vectorise on
// every CPU level, SSE2 included: no rint (SSE2 has no roundps) and no fma (a library call where
// the CPU has none; a*b+c still contracts to an FMA where it has one). cos/sin of a fp32 RoPE angle
// are evaluated in double and rounded once (correctly rounded in practice, at least as accurate as
// torch's fp32 cos/sin); the fp32 SwiGLU sigmoid uses a float exp within ~2 ulp. The fp64 paths
// (tensors of dtype float64, used by gradcheck) call the C library.
#pragma once
#include <math.h>

#include "scalar.h"

namespace instella {

// x rounded to the nearest integer (ties to even) for |x| < 2^22 (float) / 2^51 (double): adding and
// subtracting 1.5 * 2^23 (2^52) leaves only the integer bits, in the current (nearest) rounding mode.
// The compilers keep both operations (no -ffast-math).
INSTELLA_HD float round_int(float x) { return (x + 12582912.0f) - 12582912.0f; }
INSTELLA_HD double round_int(double x) { return (x + 6755399441055744.0) - 6755399441055744.0; }

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
// Cody-Waite reduction by pi/2 in three parts: the first two have 33 significant bits, so k * part
// is exact for |k| < 2^20 and the reduced angle is accurate to about one ulp without an fma.
INSTELLA_HD void sincos_acc(float a, float* s_out, float* c_out) {
  const double x = double(a);
  const double k = round_int(x * 0.63661977236758134308);  // 2/pi
  double r = x - k * 1.57079632673412561417e+00;            // pi/2: first 33 bits
  r = r - k * 6.07710050630396597660e-11;                   // next 33 bits
  r = r - k * 2.02226624879595063154e-21;                   // the rest
  double s, c;
  sincos_small(r, &s, &c);
  const int q = int(k) & 3;  // quadrant 0..3 (two's complement: also for negative k); vectorises
  const double sin_v = q == 0 ? s : q == 1 ? c : q == 2 ? -s : -c;
  const double cos_v = q == 0 ? c : q == 1 ? -s : q == 2 ? -c : s;
  *s_out = float(sin_v);
  *c_out = float(cos_v);
}

INSTELLA_HD void sincos_acc(double a, double* s_out, double* c_out) {
  *s_out = sin(a);
  *c_out = cos(a);
}

// exp(x) in float for x in [-87, 88] (clamped): Cody-Waite reduction by ln2 (k * 0.693359375 is
// exact: the constant has 9 significant bits, |k| <= 127), Taylor to r^7 (truncation < 0.1 ulp),
// scaling by 2^k through the exponent bits. Within ~2 ulp of exp.
INSTELLA_HD float exp_f32(float x) {
  x = x < 88.0f ? x : 88.0f;  // the operand order of minps/maxps, so these map to one instruction
  x = x > -87.0f ? x : -87.0f;
  const float k = round_int(x * 1.44269504f);
  float r = x - k * 0.693359375f;
  r = r + k * 2.12194440e-4f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  return p * bits_to_float(uint32_t(int32_t(k) + 127) << 23);
}

// Logistic sigmoid in the accumulation type: fp32 (via exp_f32) or fp64 (C library).
INSTELLA_HD float sigmoid_acc(float g) { return 1.0f / (1.0f + exp_f32(-g)); }

INSTELLA_HD double sigmoid_acc(double g) { return 1.0 / (1.0 + exp(-g)); }

}  // namespace instella
