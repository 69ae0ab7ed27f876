// Fused CPU kernels for mlxlab; see kernels.h for what and why.
#include "kernels.h"

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <stdexcept>
#include <thread>
#include <vector>

#include "mlx/backend/cpu/encoder.h"

namespace mlxlab {

namespace {

std::atomic<int> g_threads{0};

// exp(x) for float32, branch-free so that loops over it vectorize: Cody-Waite range reduction
// x = n ln2 + r and the Cephes degree-6 polynomial for e^r (max rel. error ~2 ulp). Inputs are
// clamped to [-87.3, 88]; below -87.3 it returns 0 (the true value is a denormal).
inline float fast_exp(float x) {
  const float x0 = x;
  // Ternaries, not fmin/fmax: those have NaN rules that block vectorization (a NaN passes
  // through here and comes out NaN).
  x = x < -87.3f ? -87.3f : x;
  x = x > 88.0f ? 88.0f : x;
  float n = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  float y = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  // Below the clamp the true value is < 1.2e-38: return exactly 0 so a -inf mask gives 0.
  return x0 < -87.3f ? 0.0f : y * std::bit_cast<float>(bits);
}

inline float sigmoid(float x) {
  return 1.0f / (1.0f + fast_exp(-x));
}

// Runs fn(begin, end) over [0, n) split into contiguous blocks on up to num_threads() threads
// (the calling thread takes the first block). `cost` is the work per index in elements: small
// jobs stay on one thread because starting a thread costs ~20 us. Threads are started per call,
// not pooled: nothing to leak across fork() (joblib, multiprocessing).
template <typename F>
void parallel_for(int64_t n, int64_t cost, F&& fn) {
  constexpr int64_t kMinWork = 1 << 16;
  int64_t threads = std::min<int64_t>(num_threads(), std::max<int64_t>(1, n * cost / kMinWork));
  threads = std::min(threads, n);
  if (threads <= 1) {
    fn(int64_t{0}, n);
    return;
  }
  int64_t block = (n + threads - 1) / threads;
  std::vector<std::thread> pool;
  pool.reserve(threads - 1);
  for (int64_t t = 1; t < threads; ++t) {
    int64_t begin = t * block, end = std::min(n, begin + block);
    if (begin < end) {
      pool.emplace_back([&fn, begin, end] { fn(begin, end); });
    }
  }
  fn(int64_t{0}, std::min(n, block));
  for (auto& th : pool) {
    th.join();
  }
}

// One row: lse = max + log(sum exp(x - max)); NaN anywhere in the row makes lse NaN (as the
// composed MLX ops would), which the max/sum reductions alone would drop.
inline float row_logsumexp(const float* __restrict x, int64_t v) {
  float m = -std::numeric_limits<float>::infinity();
  int bad = 0;
#pragma omp simd reduction(max : m) reduction(| : bad)
  for (int64_t j = 0; j < v; ++j) {
    m = std::fmax(m, x[j]);
    bad |= (x[j] != x[j]);
  }
  if (bad) {
    return std::numeric_limits<float>::quiet_NaN();
  }
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < v; ++j) {
    s += fast_exp(x[j] - m);
  }
  return m + std::log(s);
}

// d = g * exp(x - lse): the softmax of one row times the row's loss weight. Separate functions
// with restrict pointers, not loops inside the lambdas: GCC does not vectorize loads through a
// lambda's captured pointers.
inline void row_softmax_scaled(
    const float* __restrict x, float* __restrict d, float lse, float g, int64_t v) {
#pragma omp simd
  for (int64_t j = 0; j < v; ++j) {
    d[j] = g * fast_exp(x[j] - lse);
  }
}

inline void swiglu_span(
    const float* __restrict a, const float* __restrict b, float* __restrict out, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    float x = a[i];
    out[i] = x * sigmoid(x) * b[i];
  }
}

inline void swiglu_grad_span(
    const float* __restrict a,
    const float* __restrict b,
    const float* __restrict g,
    float* __restrict da,
    float* __restrict db,
    int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    float x = a[i], gi = g[i];
    float sg = sigmoid(x);
    // d silu / dx = sig(x) (1 + x (1 - sig(x)))
    da[i] = gi * b[i] * sg * (1.0f + x * (1.0f - sg));
    db[i] = gi * x * sg;
  }
}

// out = softmax(x + mask) of one row (mask may be null): max, then exp written once and summed,
// then one scaling pass.
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
    m = std::fmax(m, out[j]);
  }
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < v; ++j) {
    float e = fast_exp(out[j] - m);
    out[j] = e;
    s += e;
  }
  float inv = 1.0f / s;
#pragma omp simd
  for (int64_t j = 0; j < v; ++j) {
    out[j] *= inv;
  }
}

// ds = p * (dp - sum(p * dp)) of one row: the softmax VJP.
inline void row_softmax_grad(
    const float* __restrict p, const float* __restrict dp, float* __restrict ds, int64_t v) {
  float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
  for (int64_t j = 0; j < v; ++j) {
    dot += p[j] * dp[j];
  }
#pragma omp simd
  for (int64_t j = 0; j < v; ++j) {
    ds[j] = p[j] * (dp[j] - dot);
  }
}

template <typename T>
void cross_entropy_rows(
    const float* logits, const T* targets, float* ce, float* lse, int64_t n, int64_t v) {
  parallel_for(n, v, [=](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* x = logits + i * v;
      float l = row_logsumexp(x, v);
      int64_t t = static_cast<int64_t>(targets[i]);
      lse[i] = l;
      ce[i] = (t >= 0 && t < v) ? l - x[t] : 0.0f;
    }
  });
}

template <typename T>
void cross_entropy_grad_rows(
    const float* logits,
    const T* targets,
    const float* lse,
    const float* cot,
    float* dx,
    int64_t n,
    int64_t v) {
  parallel_for(n, v, [=](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* x = logits + i * v;
      float* d = dx + i * v;
      int64_t t = static_cast<int64_t>(targets[i]);
      float g = cot[i];
      if (g == 0.0f || t < 0 || t >= v) {
        // Masked or ignored row (loss weight 0): no exp at all.
        std::fill(d, d + v, 0.0f);
        continue;
      }
      row_softmax_scaled(x, d, lse[i], g, v);
      d[t] -= g;
    }
  });
}

void check_cpu_float32(const mx::array& a, const char* what) {
  if (a.dtype() != mx::float32) {
    throw std::invalid_argument(std::string(what) + ": mlxlab fused kernels take float32 only");
  }
}

template <typename Fn>
void dispatch_target_dtype(mx::Dtype dt, Fn&& fn) {
  switch (dt) {
    case mx::int32:
      fn(int32_t{});
      break;
    case mx::int64:
      fn(int64_t{});
      break;
    case mx::uint32:
      fn(uint32_t{});
      break;
    default:
      throw std::invalid_argument("cross_entropy: targets must be int32, int64 or uint32");
  }
}

void alloc(mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
}

} // namespace

void set_num_threads(int n) {
  g_threads = std::max(1, n);
}

int num_threads() {
  int n = g_threads.load();
  if (n <= 0) {
    n = std::max(1u, std::thread::hardware_concurrency());
  }
  return n;
}

// ---- cross-entropy -------------------------------------------------------------------------

mx::array cross_entropy(const mx::array& logits, const mx::array& targets) {
  if (logits.ndim() != 2 || targets.ndim() != 1 || targets.shape(0) != logits.shape(0)) {
    throw std::invalid_argument("cross_entropy: expected logits (N, V) and targets (N,)");
  }
  check_cpu_float32(logits, "cross_entropy");
  auto s = mx::to_stream(mx::Device::cpu);
  int n = logits.shape(0);
  auto outs = mx::array::make_arrays(
      {{n}, {n}},
      {mx::float32, mx::float32},
      std::make_shared<CrossEntropy>(s),
      {mx::contiguous(logits, false, s), mx::contiguous(targets, false, s)});
  return outs[0];
}

void CrossEntropy::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& logits = inputs[0];
  auto& targets = inputs[1];
  auto& ce = outputs[0];
  auto& lse = outputs[1];
  alloc(ce);
  alloc(lse);
  auto& encoder = mx::cpu::get_command_encoder(stream());
  encoder.set_input_array(logits);
  encoder.set_input_array(targets);
  encoder.set_output_array(ce);
  encoder.set_output_array(lse);
  int64_t n = logits.shape(0), v = logits.shape(1);
  dispatch_target_dtype(targets.dtype(), [&](auto tag) {
    using T = decltype(tag);
    encoder.dispatch([x = logits.data<float>(),
                      t = targets.data<T>(),
                      c = ce.data<float>(),
                      l = lse.data<float>(),
                      n,
                      v]() { cross_entropy_rows<T>(x, t, c, l, n, v); });
  });
}

std::vector<mx::array> CrossEntropy::vjp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>& argnums,
    const std::vector<mx::array>& outputs) {
  // Only the per-row loss carries a gradient; lse is an internal output kept for backward.
  std::vector<mx::array> grads;
  for (int arg : argnums) {
    if (arg == 0) {
      auto& logits = primals[0];
      grads.push_back(mx::array(
          logits.shape(),
          mx::float32,
          std::make_shared<CrossEntropyGrad>(stream()),
          {logits, primals[1], outputs[1], mx::contiguous(cotangents[0], false, stream())}));
    } else {
      grads.push_back(mx::zeros_like(primals[arg], stream()));
    }
  }
  return grads;
}

void CrossEntropyGrad::eval_cpu(
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs) {
  auto& logits = inputs[0];
  auto& targets = inputs[1];
  auto& lse = inputs[2];
  auto& cot = inputs[3];
  auto& dx = outputs[0];
  alloc(dx);
  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (auto& a : inputs) {
    encoder.set_input_array(a);
  }
  encoder.set_output_array(dx);
  int64_t n = logits.shape(0), v = logits.shape(1);
  dispatch_target_dtype(targets.dtype(), [&](auto tag) {
    using T = decltype(tag);
    encoder.dispatch([x = logits.data<float>(),
                      t = targets.data<T>(),
                      l = lse.data<float>(),
                      g = cot.data<float>(),
                      d = dx.data<float>(),
                      n,
                      v]() { cross_entropy_grad_rows<T>(x, t, l, g, d, n, v); });
  });
}

// ---- SwiGLU --------------------------------------------------------------------------------

mx::array swiglu(const mx::array& gate, const mx::array& up) {
  if (gate.shape() != up.shape()) {
    throw std::invalid_argument("swiglu: gate and up must have one shape");
  }
  check_cpu_float32(gate, "swiglu");
  check_cpu_float32(up, "swiglu");
  auto s = mx::to_stream(mx::Device::cpu);
  return mx::array(
      gate.shape(),
      mx::float32,
      std::make_shared<SwiGLU>(s),
      {mx::contiguous(gate, false, s), mx::contiguous(up, false, s)});
}

void SwiGLU::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& a = inputs[0];
  auto& b = inputs[1];
  auto& out = outputs[0];
  alloc(out);
  auto& encoder = mx::cpu::get_command_encoder(stream());
  encoder.set_input_array(a);
  encoder.set_input_array(b);
  encoder.set_output_array(out);
  encoder.dispatch(
      [pa = a.data<float>(), pb = b.data<float>(), po = out.data<float>(), n = int64_t(a.size())]() {
        parallel_for(n, 1, [=](int64_t begin, int64_t end) {
          swiglu_span(pa + begin, pb + begin, po + begin, end - begin);
        });
      });
}

std::vector<mx::array> SwiGLU::vjp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>& argnums,
    const std::vector<mx::array>&) {
  auto grads = mx::array::make_arrays(
      {primals[0].shape(), primals[0].shape()},
      {mx::float32, mx::float32},
      std::make_shared<SwiGLUGrad>(stream()),
      {primals[0], primals[1], mx::contiguous(cotangents[0], false, stream())});
  std::vector<mx::array> out;
  for (int arg : argnums) {
    out.push_back(grads[arg]);
  }
  return out;
}

void SwiGLUGrad::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& a = inputs[0];
  auto& b = inputs[1];
  auto& g = inputs[2];
  alloc(outputs[0]);
  alloc(outputs[1]);
  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (auto& x : inputs) {
    encoder.set_input_array(x);
  }
  encoder.set_output_array(outputs[0]);
  encoder.set_output_array(outputs[1]);
  encoder.dispatch([pa = a.data<float>(),
                    pb = b.data<float>(),
                    pg = g.data<float>(),
                    da = outputs[0].data<float>(),
                    db = outputs[1].data<float>(),
                    n = int64_t(a.size())]() {
    parallel_for(n, 1, [=](int64_t begin, int64_t end) {
      swiglu_grad_span(
          pa + begin, pb + begin, pg + begin, da + begin, db + begin, end - begin);
    });
  });
}

// ---- softmax with an additive mask (attention) ---------------------------------------------

mx::array softmax(const mx::array& x, const std::optional<mx::array>& mask) {
  check_cpu_float32(x, "softmax");
  if (x.ndim() < 2) {
    throw std::invalid_argument("softmax: expected scores (..., T_q, T_kv)");
  }
  auto s = mx::to_stream(mx::Device::cpu);
  std::vector<mx::array> inputs{mx::contiguous(x, false, s)};
  if (mask) {
    check_cpu_float32(*mask, "softmax mask");
    if (mask->ndim() != 2 || mask->shape(0) != x.shape(-2) || mask->shape(1) != x.shape(-1)) {
      throw std::invalid_argument("softmax: the mask must be (T_q, T_kv) like the scores' last axes");
    }
    inputs.push_back(mx::contiguous(*mask, false, s));
  }
  return mx::array(x.shape(), mx::float32, std::make_shared<Softmax>(s), std::move(inputs));
}

void Softmax::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& x = inputs[0];
  auto& out = outputs[0];
  alloc(out);
  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (auto& a : inputs) {
    encoder.set_input_array(a);
  }
  encoder.set_output_array(out);
  int64_t v = x.shape(-1), tq = x.shape(-2), rows = x.size() / v;
  const float* mask = inputs.size() > 1 ? inputs[1].data<float>() : nullptr;
  encoder.dispatch([px = x.data<float>(), mask, po = out.data<float>(), rows, tq, v]() {
    parallel_for(rows, v, [=](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        row_softmax(px + i * v, mask ? mask + (i % tq) * v : nullptr, po + i * v, v);
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
      {outputs[0], mx::contiguous(cotangents[0], false, stream())});
  std::vector<mx::array> grads;
  for (int arg : argnums) {
    if (arg == 0) {
      grads.push_back(ds);
    } else {
      // The mask is broadcast over the leading axes: its gradient sums them.
      auto& mask = primals[1];
      grads.push_back(mx::sum(mx::reshape(ds, {-1, mask.shape(0), mask.shape(1)}, stream()), 0, false, stream()));
    }
  }
  return grads;
}

void SoftmaxGrad::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& p = inputs[0];
  auto& dp = inputs[1];
  auto& ds = outputs[0];
  alloc(ds);
  auto& encoder = mx::cpu::get_command_encoder(stream());
  encoder.set_input_array(p);
  encoder.set_input_array(dp);
  encoder.set_output_array(ds);
  int64_t v = p.shape(-1), rows = p.size() / v;
  encoder.dispatch([pp = p.data<float>(), pd = dp.data<float>(), po = ds.data<float>(), rows, v]() {
    parallel_for(rows, v, [=](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        row_softmax_grad(pp + i * v, pd + i * v, po + i * v, v);
      }
    });
  });
}

void CpuPrimitive::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error(std::string(name()) + " has no GPU kernel; use the pure-MLX path");
}

} // namespace mlxlab
