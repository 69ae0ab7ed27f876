// The encoder's element-wise and row kernels: the exact GELU and LayerNorm (BERT, issue 24).
// On x86 MLX's CPU erf is a scalar libm call on one thread: the GELU of the default BERT's MLP
// took more than half of its training step. These run vectorized and over the pool.
#include "common.h"
#include "kernels.h"

#include <cstring>
#include <vector>

#include "mlx/backend/cpu/encoder.h"

namespace mlxlab {

using namespace detail;

namespace {

// erf(x) for float32 as a branch-free rational function of x on [-4, 4] (erf is +-1 to float
// precision beyond): the minimax fit Eigen uses for its vectorized erf, max error a few ulp.
inline float fast_erf(float x) {
  x = x < -4.0f ? -4.0f : x; // ternaries, not fmin/fmax: they vectorize and keep a NaN a NaN
  x = x > 4.0f ? 4.0f : x;
  const float x2 = x * x;
  float p = -2.72614225801306e-10f;
  p = p * x2 + 2.77068142495902e-08f;
  p = p * x2 - 2.10102402082508e-06f;
  p = p * x2 - 5.69250639462346e-05f;
  p = p * x2 - 7.34990630326855e-04f;
  p = p * x2 - 2.95459980854025e-03f;
  p = p * x2 - 1.60960333262415e-02f;
  float q = -1.45660718464996e-05f;
  q = q * x2 - 2.13374055278905e-04f;
  q = q * x2 - 1.68282697438203e-03f;
  q = q * x2 - 7.37332916720468e-03f;
  q = q * x2 - 1.42647390514189e-02f;
  return x * p / q;
}

constexpr float kInvSqrt2 = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;

inline void gelu_span(const float* __restrict x, float* __restrict y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    y[i] = 0.5f * x[i] * (1.0f + fast_erf(x[i] * kInvSqrt2));
  }
}

// d gelu / dx = (1 + erf(x / sqrt 2)) / 2 + x phi(x), phi the standard normal density.
inline void gelu_grad_span(
    const float* __restrict x, const float* __restrict g, float* __restrict dx, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    float xi = x[i];
    float cdf = 0.5f * (1.0f + fast_erf(xi * kInvSqrt2));
    dx[i] = g[i] * (cdf + xi * kInvSqrt2Pi * fast_exp(-0.5f * xi * xi));
  }
}

// y = (x - mean) r w + b of one row, r = 1 / sqrt(var + eps), var the biased variance (two
// passes over the row, as MLX's layer_norm); stores mean and r.
inline void row_layer_norm(
    const float* __restrict x,
    const float* __restrict w,
    const float* __restrict b,
    float* __restrict y,
    float* mean_out,
    float* rstd_out,
    int64_t d,
    float eps) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < d; ++j) {
    s += x[j];
  }
  const float mean = s / static_cast<float>(d);
  float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
  for (int64_t j = 0; j < d; ++j) {
    float c = x[j] - mean;
    ss += c * c;
  }
  const float r = 1.0f / std::sqrt(ss / static_cast<float>(d) + eps);
#pragma omp simd
  for (int64_t j = 0; j < d; ++j) {
    y[j] = (x[j] - mean) * r * w[j] + b[j];
  }
  *mean_out = mean;
  *rstd_out = r;
}

// dx = r (dxhat - mean(dxhat) - xhat mean(dxhat xhat)) of one row, dxhat = dy w, xhat =
// (x - mean) r; adds dy xhat to dw and dy to db.
inline void row_layer_norm_grad(
    const float* __restrict x,
    const float* __restrict w,
    const float* __restrict dy,
    float mean,
    float r,
    float* __restrict dx,
    float* __restrict dw,
    float* __restrict db,
    int64_t d) {
  float sum_g = 0.0f, sum_gx = 0.0f;
#pragma omp simd reduction(+ : sum_g, sum_gx)
  for (int64_t j = 0; j < d; ++j) {
    float g = dy[j] * w[j];
    sum_g += g;
    sum_gx += g * (x[j] - mean) * r;
  }
  const float inv_d = 1.0f / static_cast<float>(d);
  const float a = sum_g * inv_d, c = sum_gx * inv_d;
#pragma omp simd
  for (int64_t j = 0; j < d; ++j) {
    float xhat = (x[j] - mean) * r;
    dx[j] = r * (dy[j] * w[j] - a - xhat * c);
    dw[j] += dy[j] * xhat;
    db[j] += dy[j];
  }
}

// MLX's threefry2x32 (mlx/backend/cpu/threefry.cpp: 20 rounds, the key injected every 4) on the
// 32 counter pairs (c + i, c + i + offset), i in [0, 32), as four 8-lane vectors interleaved
// round by round: each pair's 20 rounds are one dependency chain, and four chains in flight run
// ~2x the throughput of a one-vector loop (AVX2, measured). A caller short of 32 words uses the
// first ones (unsigned counters wrap as MLX's do).
typedef uint32_t u32x8 __attribute__((vector_size(32)));
constexpr int64_t kThreefryBlock = 32;

inline void threefry_block(uint32_t k0, uint32_t k1, uint32_t c, uint32_t offset,
                           uint32_t* __restrict first, uint32_t* __restrict second) {
  const uint32_t k2 = k0 ^ k1 ^ 0x1BD11BDAu;
  u32x8 a[4], b[4];
  for (int u = 0; u < 4; ++u) {
    for (int l = 0; l < 8; ++l) {
      a[u][l] = c + uint32_t(8 * u + l) + k0;
      b[u][l] = c + uint32_t(8 * u + l) + offset + k1;
    }
  }
#define MLXLAB_MIX(r)                              \
  for (int u = 0; u < 4; ++u) {                    \
    a[u] += b[u];                                  \
    b[u] = (b[u] << (r)) | (b[u] >> (32 - (r)));   \
    b[u] ^= a[u];                                  \
  }
#define MLXLAB_INJECT(x, y) \
  for (int u = 0; u < 4; ++u) { \
    a[u] += (x);                \
    b[u] += (y);                \
  }
  MLXLAB_MIX(13) MLXLAB_MIX(15) MLXLAB_MIX(26) MLXLAB_MIX(6) MLXLAB_INJECT(k1, k2 + 1u)
  MLXLAB_MIX(17) MLXLAB_MIX(29) MLXLAB_MIX(16) MLXLAB_MIX(24) MLXLAB_INJECT(k2, k0 + 2u)
  MLXLAB_MIX(13) MLXLAB_MIX(15) MLXLAB_MIX(26) MLXLAB_MIX(6) MLXLAB_INJECT(k0, k1 + 3u)
  MLXLAB_MIX(17) MLXLAB_MIX(29) MLXLAB_MIX(16) MLXLAB_MIX(24) MLXLAB_INJECT(k1, k2 + 4u)
  MLXLAB_MIX(13) MLXLAB_MIX(15) MLXLAB_MIX(26) MLXLAB_MIX(6) MLXLAB_INJECT(k2, k0 + 5u)
#undef MLXLAB_MIX
#undef MLXLAB_INJECT
  std::memcpy(first, a, sizeof(a));
  std::memcpy(second, b, sizeof(b));
}

// y = x * scale_i, scale_i = keep_scale where float(bits_i) < threshold, else 0: MLX's
// (bernoulli(keep) * x) * (1 / keep) to the bit (a kept x * 1 is x; a dropped one is +-0).
inline void dropout_apply(
    const float* __restrict x,
    const uint32_t* __restrict bits,
    float* __restrict y,
    float* __restrict scale,
    int64_t n,
    float threshold,
    float keep_scale) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    float s = static_cast<float>(bits[i]) < threshold ? keep_scale : 0.0f;
    scale[i] = s;
    y[i] = x[i] * s;
  }
}

void set_arrays(mx::cpu::CommandEncoder& encoder, const std::vector<mx::array>& inputs,
                std::vector<mx::array>& outputs) {
  for (auto& a : inputs) {
    encoder.set_input_array(a);
  }
  for (auto& a : outputs) {
    alloc(a);
    encoder.set_output_array(a);
  }
}

} // namespace

// ---- GELU ----------------------------------------------------------------------------------

mx::array gelu(const mx::array& x) {
  check_cpu_float32(x, "gelu");
  auto s = mx::to_stream(mx::Device::cpu);
  return mx::array(x.shape(), mx::float32, std::make_shared<Gelu>(s), {mx::contiguous(x, false, s)});
}

void Gelu::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& encoder = mx::cpu::get_command_encoder(stream());
  set_arrays(encoder, inputs, outputs);
  encoder.dispatch([px = inputs[0].data<float>(),
                    py = outputs[0].data<float>(),
                    n = int64_t(inputs[0].size())]() {
    // cost 8: an erf is several multiply-adds and a division; small arrays stay on one thread
    parallel_for(n, 8, [=](int64_t begin, int64_t end) {
      gelu_span(px + begin, py + begin, end - begin);
    });
  });
}

std::vector<mx::array> Gelu::vjp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>&,
    const std::vector<mx::array>&) {
  return {mx::array(
      primals[0].shape(),
      mx::float32,
      std::make_shared<GeluGrad>(stream()),
      {primals[0], mx::contiguous(cotangents[0], false, stream())})};
}

void GeluGrad::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& encoder = mx::cpu::get_command_encoder(stream());
  set_arrays(encoder, inputs, outputs);
  encoder.dispatch([px = inputs[0].data<float>(),
                    pg = inputs[1].data<float>(),
                    pd = outputs[0].data<float>(),
                    n = int64_t(inputs[0].size())]() {
    parallel_for(n, 12, [=](int64_t begin, int64_t end) {
      gelu_grad_span(px + begin, pg + begin, pd + begin, end - begin);
    });
  });
}

// ---- dropout -------------------------------------------------------------------------------

mx::array dropout(const mx::array& x, const mx::array& key, float keep, float scale) {
  check_cpu_float32(x, "dropout");
  if (key.dtype() != mx::uint32 || key.size() != 2) {
    throw std::invalid_argument("dropout: the key must be a uint32 array of 2 elements");
  }
  if (!(keep > 0.0f && keep <= 1.0f)) {
    throw std::invalid_argument("dropout: keep must be in (0, 1]");
  }
  auto s = mx::to_stream(mx::Device::cpu);
  return mx::array::make_arrays(
      {x.shape(), x.shape()},
      {mx::float32, mx::float32},
      std::make_shared<Dropout>(s, keep, scale),
      {mx::contiguous(x, false, s), mx::contiguous(key, false, s)})[0];
}

void Dropout::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& encoder = mx::cpu::get_command_encoder(stream());
  set_arrays(encoder, inputs, outputs);
  // mlx::core::random::bernoulli: keep where float(bits) < keep * nextafter(2^32, inf)
  const float threshold = keep_ * std::nextafter(4294967296.0f, 3.0e38f);
  encoder.dispatch([px = inputs[0].data<float>(),
                    key = inputs[1].data<uint32_t>(),
                    py = outputs[0].data<float>(),
                    ps = outputs[1].data<float>(),
                    n = int64_t(inputs[0].size()),
                    threshold,
                    keep_scale = scale_]() {
    // MLX's RandomBits for one key and n 32-bit words: word j < n / 2 and word j + n / 2 + n % 2
    // are the two halves of threefry(key, (j, j + n / 2 + n % 2)); an odd n's middle word is the
    // first half of threefry(key, (n / 2, 0)).
    const uint32_t k0 = key[0], k1 = key[1];
    const int64_t half = n / 2, offset = half + n % 2;
    if (n % 2) {
      uint32_t middle[kThreefryBlock], unused[kThreefryBlock];
      threefry_block(k0, k1, uint32_t(half), uint32_t(-half), middle, unused);  // (n / 2, 0)
      dropout_apply(px + half, middle, py + half, ps + half, 1, threshold, keep_scale);
    }
    parallel_for(half, 8, [=](int64_t begin, int64_t end) {
      uint32_t first[kThreefryBlock], second[kThreefryBlock];
      for (int64_t at = begin; at < end; at += kThreefryBlock) {
        const int64_t m = std::min(kThreefryBlock, end - at);
        threefry_block(k0, k1, uint32_t(at), uint32_t(offset), first, second);
        dropout_apply(px + at, first, py + at, ps + at, m, threshold, keep_scale);
        dropout_apply(px + at + offset, second, py + at + offset, ps + at + offset, m, threshold,
                      keep_scale);
      }
    });
  });
}

std::vector<mx::array> Dropout::vjp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>& argnums,
    const std::vector<mx::array>& outputs) {
  std::vector<mx::array> grads;
  for (int arg : argnums) {
    grads.push_back(arg == 0 ? mx::multiply(cotangents[0], outputs[1], stream())
                             : mx::zeros_like(primals[arg], stream()));
  }
  return grads;
}

// ---- LayerNorm -----------------------------------------------------------------------------

mx::array layer_norm(const mx::array& x, const mx::array& weight, const mx::array& bias, float eps) {
  for (auto* a : {&x, &weight, &bias}) {
    check_cpu_float32(*a, "layer_norm");
  }
  if (x.ndim() < 1 || weight.ndim() != 1 || weight.shape(0) != x.shape(-1) ||
      bias.shape() != weight.shape()) {
    throw std::invalid_argument("layer_norm: expected x (..., D), weight (D,) and bias (D,)");
  }
  auto s = mx::to_stream(mx::Device::cpu);
  int rows = x.size() / x.shape(-1);
  auto outs = mx::array::make_arrays(
      {x.shape(), {rows}, {rows}},
      {mx::float32, mx::float32, mx::float32},
      std::make_shared<LayerNorm>(s, eps),
      {mx::contiguous(x, false, s), mx::contiguous(weight, false, s), mx::contiguous(bias, false, s)});
  return outs[0];
}

void LayerNorm::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& encoder = mx::cpu::get_command_encoder(stream());
  set_arrays(encoder, inputs, outputs);
  int64_t d = inputs[0].shape(-1), n = inputs[0].size() / d;
  encoder.dispatch([px = inputs[0].data<float>(),
                    pw = inputs[1].data<float>(),
                    pb = inputs[2].data<float>(),
                    py = outputs[0].data<float>(),
                    pm = outputs[1].data<float>(),
                    pr = outputs[2].data<float>(),
                    n,
                    d,
                    eps = eps_]() {
    parallel_for(n, d, [=](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        row_layer_norm(px + i * d, pw, pb, py + i * d, pm + i, pr + i, d, eps);
      }
    });
  });
}

std::vector<mx::array> LayerNorm::vjp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>& argnums,
    const std::vector<mx::array>& outputs) {
  auto grads = mx::array::make_arrays(
      {primals[0].shape(), primals[1].shape(), primals[2].shape()},
      {mx::float32, mx::float32, mx::float32},
      std::make_shared<LayerNormGrad>(stream()),
      {primals[0], primals[1], outputs[1], outputs[2],
       mx::contiguous(cotangents[0], false, stream())});
  std::vector<mx::array> out;
  for (int arg : argnums) {
    out.push_back(grads[arg]);
  }
  return out;
}

void LayerNormGrad::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& encoder = mx::cpu::get_command_encoder(stream());
  set_arrays(encoder, inputs, outputs);
  int64_t d = inputs[0].shape(-1), n = inputs[0].size() / d;
  encoder.dispatch([px = inputs[0].data<float>(),
                    pw = inputs[1].data<float>(),
                    pm = inputs[2].data<float>(),
                    pr = inputs[3].data<float>(),
                    pg = inputs[4].data<float>(),
                    pdx = outputs[0].data<float>(),
                    pdw = outputs[1].data<float>(),
                    pdb = outputs[2].data<float>(),
                    n,
                    d]() {
    // As RMSNormGrad: each block of rows sums its weight and bias gradients into its own row of
    // `partial`, added in block order afterwards, so the result does not depend on the threads.
    int64_t parts = plan_threads(n, d), block = (n + parts - 1) / parts;
    std::vector<float> partial(parts * 2 * d, 0.0f);
    parallel_parts(parts, [&](int t) {
      float* dw = partial.data() + t * 2 * d;
      for (int64_t i = t * block, end = std::min(n, (t + 1) * block); i < end; ++i) {
        row_layer_norm_grad(px + i * d, pw, pg + i * d, pm[i], pr[i], pdx + i * d, dw, dw + d, d);
      }
    });
    std::fill(pdw, pdw + d, 0.0f);
    std::fill(pdb, pdb + d, 0.0f);
    for (int64_t t = 0; t < parts; ++t) {
      for (int64_t j = 0; j < d; ++j) {
        pdw[j] += partial[t * 2 * d + j];
        pdb[j] += partial[t * 2 * d + d + j];
      }
    }
  });
}

} // namespace mlxlab
