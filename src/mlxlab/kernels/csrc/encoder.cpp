// The encoder's element-wise and row kernels: the exact GELU and LayerNorm (BERT).
// On x86 MLX's CPU erf is a scalar libm call on one thread: the GELU of the default BERT's MLP
// took more than half of its training step. These run vectorized and over the pool.
#include "common.h"
#include "kernels.h"
#include "mlx_math.h"

#include <cstring>
#include <vector>

#include "mlx/backend/cpu/encoder.h"

namespace mlxlab {

using namespace detail;

namespace {

// nn.gelu, x * (1 + erf(x / sqrt 2)) / 2, op for op as MLX's compiled graph computes it.
inline void gelu_span(const float* __restrict x, float* __restrict y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    y[i] = x[i] * (1.0f + mlx_erf(x[i] / kMlxSqrt2)) * 0.5f; // / 2 exactly, as MLX divides
  }
}

// nn.gelu's gradient as MLX's autodiff builds it from the forward's ops: (g / 2) through the
// product x (1 + erf u) to x (`product`), and through erf's VJP (2 / sqrt pi) g' exp(-u^2) and
// u = x / sqrt 2 to x (`erf_path`). The two are returned apart: see Gelu::vjp.
inline void gelu_grad_span(
    const float* __restrict x,
    const float* __restrict g,
    float* __restrict product,
    float* __restrict erf_path,
    int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float xi = x[i], u = xi / kMlxSqrt2;
    const float gm = g[i] * 0.5f; // MLX divides by 2: the same number
    product[i] = (1.0f + mlx_erf(u)) * gm;
    erf_path[i] = kMlx2OverSqrtPi * (xi * gm) * mlx_exp(-(u * u)) / kMlxSqrt2;
  }
}

// LayerNorm as MLX's CPU runs mx.fast.layer_norm (its fallback: mean, centre, mean of squares,
// rsqrt, scale, shift), op for op, and its gradient as MLX's autodiff builds it from those ops.
// MLX sums a row in order from the first element (one accumulator on x86), and the weight and
// bias gradients over the rows in order from the first row; so do these. An in-order sum is one
// chain of dependent adds, so rows go in groups of kRows whose chains interleave. c = 1 / d as
// MLX's NumberOfElements makes it.
constexpr int64_t kRows = 8;

// out[r] = a[r][0] + a[r][1] + ... in that order, for `rows` <= kRows rows `stride` apart.
inline void sums_in_order(const float* __restrict a, int64_t stride, int64_t rows, int64_t d,
                          float* __restrict out) {
  if (rows == kRows) {
    float s[kRows] = {};
    for (int64_t j = 0; j < d; ++j) {
      for (int64_t r = 0; r < kRows; ++r) {
        s[r] += a[r * stride + j];
      }
    }
    std::copy(s, s + kRows, out);
    return;
  }
  for (int64_t r = 0; r < rows; ++r) {
    float s = 0.0f;
    for (int64_t j = 0; j < d; ++j) {
      s += a[r * stride + j];
    }
    out[r] = s;
  }
}

// Rows [0, rows) of x: y = (x - mu) r w + b, mu = sum(x) c, r = 1 / sqrt(sum((x - mu)^2) c +
// eps); stores mu and ve = var + eps for the gradient. `scratch` holds kRows * d floats.
inline void rows_layer_norm(
    const float* __restrict x,
    const float* __restrict w,
    const float* __restrict b,
    float* __restrict y,
    float* __restrict scratch,
    float* __restrict mean_out,
    float* __restrict ve_out,
    int64_t rows,
    int64_t d,
    float c,
    float eps) {
  float mu[kRows], ve[kRows];
  sums_in_order(x, d, rows, d, mu);
  for (int64_t r = 0; r < rows; ++r) {
    mu[r] = mu[r] * c;
    const float* xr = x + r * d;
    float* sq = scratch + r * d;
    const float m = mu[r];
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) {
      const float xc = xr[j] - m;
      sq[j] = xc * xc;
    }
  }
  sums_in_order(scratch, d, rows, d, ve);
  for (int64_t r = 0; r < rows; ++r) {
    ve[r] = ve[r] * c + eps;
    const float m = mu[r], rs = 1.0f / std::sqrt(ve[r]);
    const float* xr = x + r * d;
    float* yr = y + r * d;
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) {
      yr[j] = (xr[j] - m) * rs * w[j] + b[j];
    }
    mean_out[r] = m;
    ve_out[r] = ve[r];
  }
}

// x's gradient for rows [0, rows) in its two parts: gxc = r gxn + xc (2 c d ve) (through
// xc = x - mu: via xc r and via the square; gxn = w g, gr = sum(xc gxn), d ve = (-0.5 gr)
// (r / ve), rsqrt's VJP) into dx, and gs1 = c sum(-gxc) (through the mean, one number a row)
// into gs1. `scratch` holds kRows * d floats.
inline void rows_layer_norm_grad(
    const float* __restrict x,
    const float* __restrict w,
    const float* __restrict g,
    const float* __restrict mean,
    const float* __restrict ve,
    float c,
    float* __restrict dx,
    float* __restrict gs1,
    float* __restrict scratch,
    int64_t rows,
    int64_t d) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * d;
    const float* gr = g + r * d;
    float* t = scratch + r * d;
    const float m = mean[r];
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) {
      t[j] = (xr[j] - m) * (w[j] * gr[j]);
    }
  }
  float sums[kRows];
  sums_in_order(scratch, d, rows, d, sums);
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * d;
    const float* gr = g + r * d;
    float* dxr = dx + r * d;
    float* t = scratch + r * d;
    const float m = mean[r], rs = 1.0f / std::sqrt(ve[r]);
    const float two_gs2 = 2.0f * (c * ((-0.5f * sums[r]) * (rs / ve[r])));
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) {
      const float gxc = rs * (w[j] * gr[j]) + (xr[j] - m) * two_gs2;
      dxr[j] = gxc;
      t[j] = -gxc;
    }
  }
  sums_in_order(scratch, d, rows, d, sums);
  for (int64_t r = 0; r < rows; ++r) {
    gs1[r] = c * sums[r];
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


} // namespace

// ---- GELU ----------------------------------------------------------------------------------

// x enters twice: MLX's graph reaches x through the product and through erf(x / sqrt 2), and
// its autodiff adds those two gradients to whatever else x's gradient holds one after the
// other, product first. Gelu::vjp returns them as the gradients of inputs 0 and 1, which MLX
// adds in that order: the same sums in the same order, so x's gradient is MLX's to the bit.
mx::array gelu(const mx::array& x) {
  check_cpu_float32(x, "gelu");
  auto s = mx::to_stream(mx::Device::cpu);
  return mx::array(x.shape(), mx::float32, std::make_shared<Gelu>(s), {x, x});
}

void Gelu::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& encoder = mx::cpu::get_command_encoder(stream());
  mx::array x = row_contiguous(inputs[0], encoder);
  set_arrays(encoder, {x}, outputs);
  encoder.dispatch([px = x.data<float>(), py = outputs[0].data<float>(), n = int64_t(x.size())]() {
    // cost 8: an erf is several multiply-adds and a division; small arrays stay on one thread
    parallel_for(n, 8, [=](int64_t begin, int64_t end) {
      gelu_span(px + begin, py + begin, end - begin);
    });
  });
}

std::vector<mx::array> Gelu::vjp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>& argnums,
    const std::vector<mx::array>&) {
  auto parts = mx::array::make_arrays(
      {primals[0].shape(), primals[0].shape()},
      {mx::float32, mx::float32},
      std::make_shared<GeluGrad>(stream()),
      {primals[0], cotangents[0]});
  std::vector<mx::array> grads;
  for (int arg : argnums) {
    grads.push_back(parts[arg]);
  }
  return grads;
}

void GeluGrad::eval_cpu(const std::vector<mx::array>& given, std::vector<mx::array>& outputs) {
  auto& encoder = mx::cpu::get_command_encoder(stream());
  const auto inputs = row_contiguous_all(given, encoder);
  const mx::array& x = inputs[0];
  set_arrays(encoder, {x, inputs[1]}, outputs);
  encoder.dispatch([px = x.data<float>(),
                    pg = inputs[1].data<float>(),
                    pp = outputs[0].data<float>(),
                    pe = outputs[1].data<float>(),
                    n = int64_t(x.size())]() {
    parallel_for(n, 12, [=](int64_t begin, int64_t end) {
      gelu_grad_span(px + begin, pg + begin, pp + begin, pe + begin, end - begin);
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
      {x, key})[0];
}

void Dropout::eval_cpu(const std::vector<mx::array>& given, std::vector<mx::array>& outputs) {
  auto& encoder = mx::cpu::get_command_encoder(stream());
  const auto inputs = row_contiguous_all(given, encoder);
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

// x enters twice, as in gelu: MLX's graph reaches x through x - mean (gxc) and through the mean
// (gs1, one number a row), and adds them to x's gradient in that order; LayerNorm::vjp returns
// them as the gradients of inputs 0 and 1.
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
      {x, x, weight, bias});
  return outs[0];
}

void LayerNorm::eval_cpu(const std::vector<mx::array>& given, std::vector<mx::array>& outputs) {
  auto& encoder = mx::cpu::get_command_encoder(stream());
  const auto inputs = row_contiguous_all(given, encoder);
  const mx::array& x = inputs[0];
  set_arrays(encoder, {x, inputs[2], inputs[3]}, outputs);
  int64_t d = x.shape(-1), n = x.size() / d;
  encoder.dispatch([px = x.data<float>(),
                    pw = inputs[2].data<float>(),
                    pb = inputs[3].data<float>(),
                    py = outputs[0].data<float>(),
                    pm = outputs[1].data<float>(),
                    pve = outputs[2].data<float>(),
                    n,
                    d,
                    eps = eps_]() {
    const float c = static_cast<float>(1.0 / static_cast<double>(d));
    parallel_for(n, d, [=](int64_t begin, int64_t end) {
      std::vector<float> scratch(kRows * d);
      for (int64_t i = begin; i < end; i += kRows) {
        rows_layer_norm(px + i * d, pw, pb, py + i * d, scratch.data(), pm + i, pve + i,
                        std::min(kRows, end - i), d, c, eps);
      }
    });
  });
}

std::vector<mx::array> LayerNorm::vjp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>& argnums,
    const std::vector<mx::array>& outputs) {
  auto& x = primals[0];
  auto grads = mx::array::make_arrays(
      {x.shape(), outputs[1].shape(), primals[2].shape(), primals[3].shape()},
      {mx::float32, mx::float32, mx::float32, mx::float32},
      std::make_shared<LayerNormGrad>(stream()),
      {x, primals[2], outputs[1], outputs[2], cotangents[0]});
  mx::Shape row_shape = x.shape();
  row_shape.back() = 1;
  auto through_mean =
      mx::broadcast_to(mx::reshape(grads[1], row_shape, stream()), x.shape(), stream());
  std::vector<mx::array> out;
  for (int arg : argnums) {
    out.push_back(arg == 1 ? through_mean : grads[arg]);
  }
  return out;
}

void LayerNormGrad::eval_cpu(const std::vector<mx::array>& given, std::vector<mx::array>& outputs) {
  auto& encoder = mx::cpu::get_command_encoder(stream());
  const auto inputs = row_contiguous_all(given, encoder);
  const mx::array& x = inputs[0];
  set_arrays(encoder, {x, inputs[1], inputs[2], inputs[3], inputs[4]}, outputs);
  int64_t d = x.shape(-1), n = x.size() / d;
  encoder.dispatch([px = x.data<float>(),
                    pw = inputs[1].data<float>(),
                    pm = inputs[2].data<float>(),
                    pve = inputs[3].data<float>(),
                    pg = inputs[4].data<float>(),
                    pdx = outputs[0].data<float>(),
                    pgs1 = outputs[1].data<float>(),
                    pdw = outputs[2].data<float>(),
                    pdb = outputs[3].data<float>(),
                    n,
                    d]() {
    const float c = static_cast<float>(1.0 / static_cast<double>(d));
    parallel_for(n, d, [=](int64_t begin, int64_t end) {
      std::vector<float> scratch(kRows * d);
      for (int64_t i = begin; i < end; i += kRows) {
        rows_layer_norm_grad(px + i * d, pw, pg + i * d, pm + i, pve + i, c, pdx + i * d,
                             pgs1 + i, scratch.data(), std::min(kRows, end - i), d);
      }
    });
    // dw = sum over rows of xn g, db = sum of g, each column summed from the first row on as
    // MLX's reduction does: the threads split the columns, not the rows.
    parallel_for(d, 4 * n, [=](int64_t begin, int64_t end) {
      std::fill(pdw + begin, pdw + end, 0.0f);
      std::fill(pdb + begin, pdb + end, 0.0f);
      for (int64_t i = 0; i < n; ++i) {
        const float* x = px + i * d;
        const float* g = pg + i * d;
        const float mu = pm[i], r = 1.0f / std::sqrt(pve[i]);
#pragma omp simd
        for (int64_t j = begin; j < end; ++j) {
          pdw[j] = pdw[j] + (x[j] - mu) * r * g[j];
          pdb[j] = pdb[j] + g[j];
        }
      }
    });
  });
}

} // namespace mlxlab
