// MLX's own float32 CPU formulas, op for op, for the kernels that must give MLX's results to the
// bit (the encoder's GELU and LayerNorm, the attention's softmax, the SiLU: a seed trains the
// same run with the fused kernels as without them). Sources: mlx/backend/cpu/simd/math.h,
// base_simd.h and unary_ops.h (MLX 0.32). On x86 MLX runs these one element at a time (its Simd width is 1);
// written here as scalar code that `omp simd` loops vectorize without changing a bit.
//
// Files that include this build with -ffp-contract=off (CMakeLists.txt): MLX's x86 wheel and the
// code its compiler JIT-builds for mx.compile contract nothing into FMAs, so a*b+c must stay a
// rounded multiply and a rounded add here too; the std::fma calls are MLX's own.
#pragma once

#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>

namespace mlxlab::detail {

// simd::exp: 2^(x log2 e) as 2^i (exponent bits) times a Cephes polynomial in the fraction.
inline float mlx_exp(float x0) {
  const float x = x0 * 1.442695f;
  // MLX takes floor(x + 0.5) in double (a float plus the double 0.5); floor(x) + (x - floor(x)
  // >= 0.5) is that number in float ops (x - floor(x) is exact), which vectorize.
  const float fl = std::floor(x);
  float ipart = fl + ((x - fl) >= 0.5f ? 1.0f : 0.0f);
  const float f = x - ipart;
  float p = 1.535336188319500e-4f;
  p = std::fma(p, f, 1.339887440266574e-3f);
  p = std::fma(p, f, 9.618437357674640e-3f);
  p = std::fma(p, f, 5.550332471162809e-2f);
  p = std::fma(p, f, 2.402264791363012e-1f);
  p = std::fma(p, f, 6.931472028550421e-1f);
  p = std::fma(p, f, 1.000000000000000f);
  // Outside [-88, 88] (or NaN) the selects below decide; the clamp only keeps the conversion
  // defined there.
  ipart = ipart < -200.0f ? -200.0f : (ipart > 200.0f ? 200.0f : ipart);
  const int32_t bits = (static_cast<int32_t>(ipart) + 127) * (int32_t{1} << 23);
  float r = std::bit_cast<float>(bits) * p;
  r = x0 != x0 ? x0 : r;
  r = x0 > 88.0f ? std::numeric_limits<float>::infinity() : r;
  return x0 < -88.0f ? 0.0f : r;
}

// Sigmoid (unary_ops.h): 1 / (1 + exp(|x|)), or 1 minus that for x >= 0.
inline float mlx_sigmoid(float x) {
  const float y = 1.0f / (1.0f + mlx_exp(std::fabs(x)));
  return x < 0.0f ? y : 1.0f - y;
}

// simd::erf: Abramowitz & Stegun 7.1.26 with MLX's exp.
inline float mlx_erf(float x) {
  const float t = 1.0f / std::fma(0.3275911f, std::fabs(x), 1.0f);
  float r = std::fma(1.061405429f, t, -1.453152027f);
  r = std::fma(r, t, 1.421413741f);
  r = std::fma(r, t, -0.284496736f);
  r = std::fma(r, t, 0.254829592f);
  const float e = -mlx_exp(-x * x);
  const float result = std::fma(e * t, r, 1.0f);
  return x > 0.0f ? result : -result;
}

// The float32 constants MLX's graphs hold: Python's math.sqrt(2) and C's M_2_SQRTPI as float32
// arrays.
constexpr float kMlxSqrt2 = static_cast<float>(1.4142135623730951);
constexpr float kMlx2OverSqrtPi = static_cast<float>(1.1283791670955126);

} // namespace mlxlab::detail
