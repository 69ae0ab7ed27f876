// The hybrids' short causal depthwise convolution (Qwen3.5 / Qwen3-Next / Kimi-Linear /
// OLMo-Hybrid gated-delta layers, Mamba-2 / Nemotron-H / Falcon-H1 / Granite-4 mixers): an
// nn.Conv1d(C, C, K, groups=C) on an input already left-padded with K - 1 rows. MLX's CPU runs a
// grouped convolution through its generic slow_conv_1D, one output at a time (C=2048, T=2048:
// 0.21 s forward, 0.7 s with its gradients, where K shifted multiply-adds take 0.035 s). Here a
// row of the output is K multiply-adds over the contiguous channels, vectorized, rows split over
// the pool; the backward is one more pass (x's, the weight's and the bias's gradients together).
//
// The forward sums the K products from k = 0, a rounded multiply and a rounded add each, and
// adds the bias after them, as nn.Conv1d adds it: nn.Conv1d's values to float32 rounding (to the
// bit beside MLX's bundled BLAS; the BLAS mlxlab binds to MLX, runtime/compute/blas.py, sums
// MLX's convolution in another order). With `silu`, silu(z) = z sigmoid(z) follows in the same
// pass, its backward recomputing z (K multiply-adds a value) rather than keeping it.
//
// With `positions` (B, T) int32, each token's place in its own row of a packed sequence (0 at a
// row's first token), an output reads no input before its row's first token: tap k of output t
// is left out where t + k - (K - 1) precedes t - positions[t], as the zeros a row of its own is
// padded with multiply to nothing. The taps left are summed in the same order from the same
// zero, so a packed row's values and gradients are those of the row alone, to the bit.
#include "common.h"
#include "kernels.h"
#include "mlx_math.h"

#include <algorithm>
#include <stdexcept>
#include <vector>

#include "mlx/backend/cpu/encoder.h"

namespace mlxlab {

using namespace detail;

namespace {

// The weight (C, K) as (K, C): a tap's C weights contiguous, as the rows of x are.
std::vector<float> taps_by_row(const float* w, int64_t c, int64_t k) {
  std::vector<float> wt(k * c);
  for (int64_t ci = 0; ci < c; ++ci) {
    for (int64_t ki = 0; ki < k; ++ki) {
      wt[ki * c + ci] = w[ci * k + ki];
    }
  }
  return wt;
}

// z = sum_k x[k] wt[k] (+ bias) of one output row, over taps k0 <= k < K: x points at its first
// input row.
inline void conv_row(const float* __restrict x, const float* __restrict wt,
                     const float* __restrict bias, float* __restrict z, int64_t c, int64_t k,
                     int64_t k0 = 0) {
  const float* __restrict x0 = x + k0 * c;
  const float* __restrict w0 = wt + k0 * c;
#pragma omp simd
  for (int64_t j = 0; j < c; ++j) {
    z[j] = 0.0f + x0[j] * w0[j]; // 0 + the first product, as an accumulator from 0 sums
  }
  for (int64_t ki = k0 + 1; ki < k; ++ki) {
    const float* __restrict xr = x + ki * c;
    const float* __restrict wr = wt + ki * c;
#pragma omp simd
    for (int64_t j = 0; j < c; ++j) {
      z[j] += xr[j] * wr[j];
    }
  }
  if (bias) {
#pragma omp simd
    for (int64_t j = 0; j < c; ++j) {
      z[j] += bias[j];
    }
  }
}

// silu.cpp's formulas (MLX's sigmoid op for op): the fused SiLU's values are kernels.silu's of
// the convolution's, so nn.silu's to the bit, and its gradient silu.cpp's.
inline void silu_row(float* __restrict z, int64_t c) {
#pragma omp simd
  for (int64_t j = 0; j < c; ++j) {
    z[j] = z[j] * mlx_sigmoid(z[j]);
  }
}

// dz = dy silu'(z) in place of z, summed as silu.cpp sums it: dy s + (dy z) (s (1 - s)).
inline void silu_grad_row(float* __restrict z, const float* __restrict dy, int64_t c) {
#pragma omp simd
  for (int64_t j = 0; j < c; ++j) {
    const float zj = z[j], gj = dy[j], s = mlx_sigmoid(zj);
    z[j] = gj * s + (gj * zj) * (s * (1.0f - s));
  }
}

// The shapes one call works on: B batch rows of L = T + K - 1 input rows, C channels.
struct ConvShape {
  int64_t b, l, t, c, k;
};

// The first tap output t reads: 0, or with a packed row's positions (the batch row's) the first
// inside its row.
inline int64_t first_tap(const int32_t* positions, int64_t t, int64_t k) {
  return positions ? std::max<int64_t>(0, k - 1 - positions[t]) : 0;
}

// The gradients of one batch row's input rows [s0, s1): dx[s] = sum_k dz[s - k] wt[k] over the
// output rows 0 <= s - k < T, and (dw not null) the output rows t in [s0, s1) added into dw
// (K, C) and db (C). dz is dy (times silu'(z), z recomputed, with `silu`); the K - 1 output rows
// before s0 that dx reads are recomputed, not added (the part before owns them). `ring` holds K
// rows of C.
void grad_rows(const float* x, const float* wt, const float* bias, const int32_t* positions,
               const float* dy, float* dx, float* dw, float* db, float* ring, const ConvShape& sh,
               int64_t s0, int64_t s1, bool silu) {
  const int64_t c = sh.c, k = sh.k;
  // dz of output row t: a row of dy, or (silu) its slot in the ring, filled here
  auto make_dz = [&](int64_t t) -> const float* {
    const float* g = dy + t * c;
    if (!silu) {
      return g;
    }
    float* z = ring + (t % k) * c;
    conv_row(x + t * c, wt, bias, z, c, k, first_tap(positions, t, k));
    silu_grad_row(z, g, c);
    return z;
  };
  auto dz_row = [&](int64_t t) -> const float* {
    return silu ? ring + (t % k) * c : dy + t * c;
  };
  for (int64_t t = std::max<int64_t>(0, s0 - k + 1); t < std::min(s0, sh.t); ++t) {
    make_dz(t);
  }
  for (int64_t s = s0; s < s1; ++s) {
    const float* __restrict g = s < sh.t ? make_dz(s) : nullptr;
    if (g && dw) {
      for (int64_t ki = first_tap(positions, s, k); ki < k; ++ki) {
        const float* __restrict xr = x + (s + ki) * c;
        float* __restrict dwr = dw + ki * c;
#pragma omp simd
        for (int64_t j = 0; j < c; ++j) {
          dwr[j] += g[j] * xr[j];
        }
      }
#pragma omp simd
      for (int64_t j = 0; j < c; ++j) {
        db[j] += g[j];
      }
    }
    float* __restrict out = dx + s * c;
    std::fill(out, out + c, 0.0f);
    for (int64_t ki = 0; ki < k; ++ki) {
      const int64_t t = s - ki;
      if (t < 0 || t >= sh.t || ki < first_tap(positions, t, k)) {
        continue;
      }
      const float* __restrict gt = dz_row(t);
      const float* __restrict wr = wt + ki * c;
#pragma omp simd
      for (int64_t j = 0; j < c; ++j) {
        out[j] += gt[j] * wr[j];
      }
    }
  }
}

ConvShape conv_shape(const mx::array& x, const mx::array& w) {
  const int64_t c = x.shape(2), k = w.size() / c;
  return {x.shape(0), x.shape(1), x.shape(1) - k + 1, c, k};
}

// The backward's arrays: x and bias null where it does not read them, dw and db where it does
// not give them.
struct GradArrays {
  const float *x, *w, *bias, *dy;
  const int32_t* positions; // (B, T), or null
  float *dx, *dw, *db;
  ConvShape sh;
  bool silu;
};

void conv_grad(const GradArrays& a) {
  const int64_t c = a.sh.c, k = a.sh.k, l = a.sh.l, rows = a.sh.b * l;
  const std::vector<float> wt = taps_by_row(a.w, c, k);
  // Each part sums its weight and bias gradients into its own (K + 1, C) rows of `partial`;
  // those are added in part order, so the result does not depend on which thread ran what.
  const int64_t parts = plan_threads(rows, 3 * c * k), block = (rows + parts - 1) / parts;
  std::vector<float> partial(a.dw ? parts * (k + 1) * c : 0, 0.0f);
  std::vector<float> rings(a.silu ? parts * k * c : 0);
  parallel_parts(parts, [&](int part) {
    float* dw = a.dw ? partial.data() + part * (k + 1) * c : nullptr;
    float* ring = a.silu ? rings.data() + part * k * c : nullptr;
    // the part's input rows, a batch row's span at a time
    for (int64_t r = part * block, end = std::min(rows, (part + 1) * block); r < end;) {
      const int64_t bi = r / l, s0 = r % l, s1 = std::min(l, s0 + end - r);
      grad_rows(a.x ? a.x + bi * l * c : nullptr, wt.data(), a.bias,
                a.positions ? a.positions + bi * a.sh.t : nullptr, a.dy + bi * a.sh.t * c,
                a.dx + bi * l * c, dw, dw ? dw + k * c : nullptr, ring, a.sh, s0, s1, a.silu);
      r += s1 - s0;
    }
  });
  if (!a.dw) {
    return;
  }
  for (int64_t part = 1; part < parts; ++part) {
    const float* src = partial.data() + part * (k + 1) * c;
    for (int64_t j = 0; j < (k + 1) * c; ++j) {
      partial[j] += src[j];
    }
  }
  for (int64_t ci = 0; ci < c; ++ci) {
    for (int64_t ki = 0; ki < k; ++ki) {
      a.dw[ci * k + ki] = partial[ki * c + ci];
    }
  }
  if (a.db) {
    std::copy(partial.begin() + k * c, partial.begin() + (k + 1) * c, a.db);
  }
}

} // namespace

mx::array depthwise_conv1d(const mx::array& x, const mx::array& w,
                           const std::optional<mx::array>& bias, bool silu,
                           const std::optional<mx::array>& positions) {
  check_cpu_float32(x, "depthwise_conv1d");
  check_cpu_float32(w, "depthwise_conv1d weight");
  if (x.ndim() != 3 || w.ndim() < 2 || w.shape(0) != x.shape(2) ||
      w.size() % x.shape(2) != 0 || w.size() / x.shape(2) != w.shape(1) ||
      x.shape(1) < w.shape(1)) {
    throw std::invalid_argument(
        "depthwise_conv1d: expected x (B, T + K - 1, C) and weight (C, K) or (C, K, 1)");
  }
  std::vector<mx::array> inputs;
  auto s = mx::to_stream(mx::Device::cpu);
  inputs.push_back(mx::contiguous(x, false, s));
  inputs.push_back(mx::contiguous(w, false, s));
  if (bias) {
    check_cpu_float32(*bias, "depthwise_conv1d bias");
    if (bias->ndim() != 1 || bias->shape(0) != x.shape(2)) {
      throw std::invalid_argument("depthwise_conv1d: expected bias (C,)");
    }
    inputs.push_back(mx::contiguous(*bias, false, s));
  }
  if (positions) {
    if (positions->dtype() != mx::int32 ||
        positions->shape() != mx::Shape{x.shape(0), x.shape(1) - w.shape(1) + 1}) {
      throw std::invalid_argument("depthwise_conv1d: expected positions (B, T) int32");
    }
    inputs.push_back(mx::contiguous(*positions, false, s));
  }
  return mx::array({x.shape(0), x.shape(1) - w.shape(1) + 1, x.shape(2)}, mx::float32,
                   std::make_shared<DepthwiseConv1d>(s, silu, positions.has_value()),
                   std::move(inputs));
}

void DepthwiseConv1d::eval_cpu(const std::vector<mx::array>& inputs,
                               std::vector<mx::array>& outputs) {
  auto& encoder = mx::cpu::get_command_encoder(stream());
  set_arrays(encoder, inputs, outputs);
  const bool has_bias = inputs.size() > (rows_ ? 3u : 2u);
  encoder.dispatch([px = inputs[0].data<float>(), pw = inputs[1].data<float>(),
                    pb = has_bias ? inputs[2].data<float>() : nullptr,
                    pp = rows_ ? inputs.back().data<int32_t>() : nullptr,
                    py = outputs[0].data<float>(), sh = conv_shape(inputs[0], inputs[1]),
                    silu = silu_]() {
    const std::vector<float> wt = taps_by_row(pw, sh.c, sh.k);
    parallel_for(sh.b * sh.t, sh.c * sh.k, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t bi = r / sh.t, ti = r % sh.t;
        float* z = py + r * sh.c;
        conv_row(px + (bi * sh.l + ti) * sh.c, wt.data(), pb, z, sh.c, sh.k,
                 first_tap(pp ? pp + bi * sh.t : nullptr, ti, sh.k));
        if (silu) {
          silu_row(z, sh.c);
        }
      }
    });
  });
}

std::vector<mx::array> DepthwiseConv1d::vjp(const std::vector<mx::array>& primals,
                                            const std::vector<mx::array>& cotangents,
                                            const std::vector<int>& argnums,
                                            const std::vector<mx::array>&) {
  // x's gradient alone (the weight frozen: LoRA) reads only the weight and dy, so x need not
  // live until the backward unless the SiLU's input is recomputed from it.
  const int floats = static_cast<int>(primals.size()) - (rows_ ? 1 : 0); // x, w (, bias)
  const bool params = std::any_of(argnums.begin(), argnums.end(),
                                  [floats](int a) { return a > 0 && a < floats; });
  const bool reads_x = params || silu_;
  std::vector<mx::array> inputs;
  if (reads_x) {
    inputs.assign(primals.begin(), primals.begin() + floats);
  } else {
    inputs.push_back(primals[1]);
  }
  if (rows_) {
    inputs.push_back(primals.back());
  }
  inputs.push_back(mx::contiguous(cotangents[0], false, stream()));
  std::vector<mx::Shape> shapes;
  for (int i = 0; i < (params ? floats : 1); ++i) {
    shapes.push_back(primals[i].shape());
  }
  const auto count = shapes.size();
  auto grads = mx::array::make_arrays(
      std::move(shapes), std::vector<mx::Dtype>(count, mx::float32),
      std::make_shared<DepthwiseConv1dGrad>(stream(), silu_, params, rows_), std::move(inputs));
  std::vector<mx::array> out;
  for (int arg : argnums) {
    out.push_back(arg < floats ? grads[arg] : mx::zeros_like(primals[arg], stream()));
  }
  return out;
}

void DepthwiseConv1dGrad::eval_cpu(const std::vector<mx::array>& inputs,
                                   std::vector<mx::array>& outputs) {
  auto& encoder = mx::cpu::get_command_encoder(stream());
  set_arrays(encoder, inputs, outputs);
  const bool reads_x = params_ || silu_;
  const bool has_bias = reads_x && inputs.size() == (rows_ ? 5u : 4u);
  const mx::array& w = inputs[reads_x ? 1 : 0];
  const mx::array& dy = inputs.back();
  const int64_t c = dy.shape(2), k = w.size() / c;
  GradArrays a{reads_x ? inputs[0].data<float>() : nullptr,
               w.data<float>(),
               has_bias ? inputs[2].data<float>() : nullptr,
               dy.data<float>(),
               rows_ ? inputs[inputs.size() - 2].data<int32_t>() : nullptr,
               outputs[0].data<float>(),
               params_ ? outputs[1].data<float>() : nullptr,
               params_ && has_bias ? outputs[2].data<float>() : nullptr,
               {dy.shape(0), dy.shape(1) + k - 1, dy.shape(1), c, k},
               silu_};
  encoder.dispatch([a]() { conv_grad(a); });
}

} // namespace mlxlab
