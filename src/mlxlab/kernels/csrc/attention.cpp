// The attention's masked softmax, forward and backward, as MLX computes
// mx.fast.scaled_dot_product_attention's on the CPU (its fallback: scores + mask, or the
// scores where a boolean mask is true and float32's lowest where it is false, then
// mx.softmax; the VJP MLX's autodiff builds). The two matmuls around it are MLX's own
// (kernels/__init__.py), so the attention as a whole gives MLX's results to the bit.
#include "common.h"
#include "kernels.h"
#include "mlx_math.h"

#include <limits>
#include <optional>
#include <vector>

#include "mlx/backend/cpu/encoder.h"

namespace mlxlab {

using namespace detail;

namespace {

// out = softmax(x + mask) of one row (mask may be null), MLX's CPU softmax op for op: the max,
// e = exp(x - max) with MLX's exp, their sum in order from the first, then e * (1 / sum).
inline void row_softmax(
    const float* __restrict x, const float* __restrict mask, float* __restrict out, int64_t v) {
  if (mask) {
#pragma omp simd
    for (int64_t j = 0; j < v; ++j) {
      out[j] = x[j] + mask[j];
    }
  } else {
    std::copy(x, x + v, out);
  }
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < v; ++j) {
    // A ternary, not fmax: x86 has no instruction with fmax's NaN rule (a max is exact in any
    // order; a NaN score still makes the row NaN through exp).
    m = out[j] > m ? out[j] : m;
  }
#pragma omp simd
  for (int64_t j = 0; j < v; ++j) {
    out[j] = mlx_exp(out[j] - m);
  }
  float s = 0.0f;
  for (int64_t j = 0; j < v; ++j) {
    s += out[j];
  }
  const float inv = 1.0f / s;
#pragma omp simd
  for (int64_t j = 0; j < v; ++j) {
    out[j] = out[j] * inv;
  }
}

// ds = p dp - p sum(p dp) of one row: MLX's softmax VJP (the sum in order from the first).
inline void row_softmax_grad(
    const float* __restrict p, const float* __restrict dp, float* __restrict ds, int64_t v) {
#pragma omp simd
  for (int64_t j = 0; j < v; ++j) {
    ds[j] = p[j] * dp[j];
  }
  float dot = 0.0f;
  for (int64_t j = 0; j < v; ++j) {
    dot += ds[j];
  }
#pragma omp simd
  for (int64_t j = 0; j < v; ++j) {
    ds[j] = ds[j] - p[j] * dot;
  }
}

} // namespace

mx::array softmax(const mx::array& x, const std::optional<mx::array>& mask, bool key_mask) {
  check_cpu_float32(x, "softmax");
  if (x.ndim() < 2) {
    throw std::invalid_argument("softmax: expected scores (..., T_q, T_kv)");
  }
  auto s = mx::to_stream(mx::Device::cpu);
  std::vector<mx::array> inputs{x};
  if (mask) {
    check_cpu_float32(*mask, "softmax mask");
    int rows = key_mask ? x.shape(0) : x.shape(-2);
    if (mask->ndim() != 2 || mask->shape(0) != rows || mask->shape(1) != x.shape(-1)) {
      throw std::invalid_argument(
          key_mask ? "softmax: a key mask must be (B, T_kv) for scores (B, ..., T_kv)"
                   : "softmax: the mask must be (T_q, T_kv) like the scores' last axes");
    }
    inputs.push_back(*mask);
  }
  return mx::array(
      x.shape(), mx::float32, std::make_shared<Softmax>(s, key_mask && mask), std::move(inputs));
}

void Softmax::eval_cpu(const std::vector<mx::array>& given, std::vector<mx::array>& outputs) {
  auto& encoder = mx::cpu::get_command_encoder(stream());
  const auto inputs = row_contiguous_all(given, encoder);
  auto& x = inputs[0];
  auto& out = outputs[0];
  set_arrays(encoder, inputs, outputs);
  int64_t v = x.shape(-1), rows = x.size() / v;
  // Row i of the scores reads mask row (i / per) % wrap: (T_q, T_kv) masks cycle with the query
  // (per 1, wrap T_q), key masks stay for all rows of one batch element (per = rows / B).
  int64_t per = key_mask_ ? rows / x.shape(0) : 1, wrap = key_mask_ ? x.shape(0) : x.shape(-2);
  const float* mask = inputs.size() > 1 ? inputs[1].data<float>() : nullptr;
  encoder.dispatch([px = x.data<float>(), mask, po = out.data<float>(), rows, per, wrap, v]() {
    parallel_for(rows, v, [=](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        row_softmax(px + i * v, mask ? mask + ((i / per) % wrap) * v : nullptr, po + i * v, v);
      }
    });
  });
}

std::vector<mx::array> Softmax::vjp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>& argnums,
    const std::vector<mx::array>& outputs) {
  auto ds = mx::array(
      outputs[0].shape(),
      mx::float32,
      std::make_shared<SoftmaxGrad>(stream()),
      {outputs[0], cotangents[0]});
  std::vector<mx::array> grads;
  for (int arg : argnums) {
    if (arg == 0) {
      grads.push_back(ds);
    } else {
      // The mask is broadcast over the other axes: its gradient sums them.
      auto& mask = primals[1];
      mx::Shape shape = key_mask_ ? mx::Shape{mask.shape(0), -1, mask.shape(1)}
                                  : mx::Shape{-1, mask.shape(0), mask.shape(1)};
      grads.push_back(mx::sum(mx::reshape(ds, shape, stream()), key_mask_ ? 1 : 0, false, stream()));
    }
  }
  return grads;
}

void SoftmaxGrad::eval_cpu(const std::vector<mx::array>& given, std::vector<mx::array>& outputs) {
  auto& encoder = mx::cpu::get_command_encoder(stream());
  const auto inputs = row_contiguous_all(given, encoder);
  auto& p = inputs[0];
  auto& dp = inputs[1];
  auto& ds = outputs[0];
  set_arrays(encoder, inputs, outputs);
  int64_t v = p.shape(-1), rows = p.size() / v;
  encoder.dispatch([pp = p.data<float>(), pd = dp.data<float>(), po = ds.data<float>(), rows, v]() {
    parallel_for(rows, v, [=](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        row_softmax_grad(pp + i * v, pd + i * v, po + i * v, v);
      }
    });
  });
}

} // namespace mlxlab
