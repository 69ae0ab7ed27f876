// Fused CPU kernels for mlxlab; see kernels.h for what and why.
#include "kernels.h"
#include "common.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <sched.h>
#include <bit>
#include <condition_variable>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <thread>
#include <vector>

#include <unistd.h>

#include "mlx/backend/cpu/encoder.h"

namespace mlxlab {

using namespace detail;

namespace {

std::atomic<int> g_threads{0};


// Microseconds a worker stays awake after its job, and the caller waits awake for the workers,
// before sleeping on a condition variable (set_spin_us; 0: sleep at once).
std::atomic<int> g_spin_us{0};

// Yields the core until `done()` or `g_spin_us` microseconds have passed; whether done() held.
template <typename Done>
bool spin_until(Done&& done) {
  int us = g_spin_us.load(std::memory_order_relaxed);
  if (us <= 0) {
    return done();
  }
  auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(us);
  while (!done()) {
    if (std::chrono::steady_clock::now() >= until) {
      return false;
    }
    sched_yield();
  }
  return true;
}

// A persistent pool of num_threads() - 1 workers, started on first use. Why not a thread per
// call: a nano training step makes ~100 kernel calls of 0.05-1 ms each, and starting a thread
// costs ~20-50 us. Why the short spin (g_spin_us) before a worker sleeps: waking a sleeping
// thread costs ~100 us on a VM, more than many of a step's calls take, and the calls of a step
// follow each other within microseconds. The spin yields the core (sched_yield) on every
// round, so a process beside this one on a busy machine runs as if the worker slept (measured:
// a Python loop on the same 2 cores made as much progress). fork() copies no threads: a child
// process (DataLoader workers, joblib) sees a pool owned by another pid and starts its own.
class Pool {
 public:
  // Runs job(t) for t in [0, parts): job(0) on the caller, the others on the workers; returns
  // when all are done. False when another thread is inside run(): the caller then does the work alone.
  bool run(int parts, const std::function<void(int)>& job) {
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (!busy.owns_lock()) {
      return false;
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      while (static_cast<int>(workers_) < parts - 1) {
        std::thread([this] { loop(); }).detach(); // lives as long as the process (see pool())
        ++workers_;
      }
      job_ = &job;
      fp_state_ = fp_state(); // the caller's denormal mode, for the workers (fp_mode.cpp)
      parts_ = parts;
      next_ = 1;
      remaining_.store(parts - 1, std::memory_order_relaxed);
      posted_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    job(0);
    std::unique_lock<std::mutex> lock(mu_);
    // Parts no worker has picked up yet (a busy machine may not have scheduled one) are run
    // here rather than waited for.
    while (next_ < parts_) {
      int t = next_++;
      lock.unlock();
      job(t);
      lock.lock();
      remaining_.fetch_sub(1, std::memory_order_acq_rel);
    }
    if (remaining_.load(std::memory_order_acquire) != 0) {
      lock.unlock();
      spin_until([this] { return remaining_.load(std::memory_order_acquire) == 0; });
      lock.lock();
    }
    done_.wait(lock, [this] { return remaining_.load(std::memory_order_acquire) == 0; });
    job_ = nullptr;
    return true;
  }

 private:
  void loop() {
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      if (!(job_ != nullptr && next_ < parts_)) {
        unsigned seen = posted_.load(std::memory_order_acquire);
        lock.unlock();
        spin_until([this, seen] { return posted_.load(std::memory_order_acquire) != seen; });
        lock.lock();
      }
      wake_.wait(lock, [this] { return job_ != nullptr && next_ < parts_; });
      int t = next_++;
      auto* job = job_;
      uint64_t state = fp_state_;
      lock.unlock();
      if (fp_state() != state) {
        set_fp_state(state);
      }
      (*job)(t);
      lock.lock();
      if (remaining_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        done_.notify_one();
      }
    }
  }

  std::atomic<unsigned> posted_{0};  // jobs posted so far: a spinning worker watches it
  std::mutex busy_, mu_;
  std::condition_variable wake_, done_;
  int workers_ = 0;
  const std::function<void(int)>* job_ = nullptr;
  int parts_ = 0, next_ = 0;
  std::atomic<int> remaining_{0};  // parts not finished: a spinning caller watches it
  uint64_t fp_state_ = 0;
};

Pool& pool() {
  // Never destroyed (detached workers wait on it until the process exits); one per process.
  static std::atomic<Pool*> current{nullptr};
  static std::atomic<pid_t> owner{0};
  static std::mutex create;
  pid_t pid = getpid();
  if (owner.load() != pid) {
    std::lock_guard<std::mutex> lock(create);
    if (owner.load() != pid) {
      current = new Pool(); // a forked child's copy of the parent's pool has no threads
      owner = pid;
    }
  }
  return *current.load();
}


// One row: lse = max + log(sum exp(x - max)); NaN anywhere in the row makes lse NaN (as the
// composed MLX ops would), which the max/sum reductions alone would drop.
inline float row_logsumexp(const float* __restrict x, int64_t v) {
  float m = -std::numeric_limits<float>::infinity();
  int bad = 0;
#pragma omp simd reduction(max : m) reduction(| : bad)
  for (int64_t j = 0; j < v; ++j) {
    m = x[j] > m ? x[j] : m;
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


} // namespace

namespace detail {

int64_t plan_threads(int64_t n, int64_t cost) {
  constexpr int64_t kMinWork = 1 << 15;
  int64_t threads = std::min<int64_t>(num_threads(), std::max<int64_t>(1, n * cost / kMinWork));
  return std::max<int64_t>(1, std::min(threads, n));
}

mx::array row_contiguous(const mx::array& a, mx::cpu::CommandEncoder& encoder) {
  if (a.flags().row_contiguous) {
    return a;
  }
  mx::array copy(a.shape(), a.dtype(), nullptr, {});
  alloc(copy);
  encoder.set_input_array(a);
  encoder.set_output_array(copy);
  encoder.add_temporary(copy);
  // Row by row of the last axis (a transposed or broadcast view): the outer index steps as an
  // odometer over the leading axes.
  encoder.dispatch([src = static_cast<const char*>(a.data<void>()),
                    dst = static_cast<char*>(copy.data<void>()), shape = a.shape(),
                    strides = a.strides(), item = int64_t(a.itemsize()),
                    n = int64_t(a.size())]() {
    if (n == 0) {
      return;
    }
    int nd = static_cast<int>(shape.size());
    int64_t inner = nd ? shape[nd - 1] : 1, step = nd ? strides[nd - 1] * item : 0;
    std::vector<int64_t> index(std::max(nd - 1, 0), 0);
    for (int64_t row = 0; row < n / inner; ++row) {
      int64_t offset = 0;
      for (int k = 0; k + 1 < nd; ++k) {
        offset += index[k] * strides[k];
      }
      const char* s = src + offset * item;
      char* d = dst + row * inner * item;
      if (item == 4) {
        for (int64_t j = 0; j < inner; ++j) {
          std::memcpy(d + j * 4, s + j * step, 4);
        }
      } else {
        for (int64_t j = 0; j < inner; ++j) {
          std::memcpy(d + j * item, s + j * step, item);
        }
      }
      for (int k = nd - 2; k >= 0 && ++index[k] == shape[k]; --k) {
        index[k] = 0;
      }
    }
  });
  return copy;
}

void parallel_parts(int64_t parts, const std::function<void(int)>& part) {
  if (parts <= 1 || !pool().run(static_cast<int>(parts), part)) {
    for (int t = 0; t < parts; ++t) {
      part(t);
    }
  }
}

} // namespace detail

void set_num_threads(int n) {
  g_threads = std::max(1, n);
}

void set_spin_us(int us) {
  g_spin_us = std::max(0, us);
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
      {logits, targets});
  return outs[0];
}

void CrossEntropy::eval_cpu(const std::vector<mx::array>& given, std::vector<mx::array>& outputs) {
  auto& encoder = mx::cpu::get_command_encoder(stream());
  const auto inputs = row_contiguous_all(given, encoder);
  auto& logits = inputs[0];
  auto& targets = inputs[1];
  auto& ce = outputs[0];
  auto& lse = outputs[1];
  alloc(ce);
  alloc(lse);
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
          {logits, primals[1], outputs[1], cotangents[0]}));
    } else {
      grads.push_back(mx::zeros_like(primals[arg], stream()));
    }
  }
  return grads;
}

void CrossEntropyGrad::eval_cpu(
    const std::vector<mx::array>& given,
    std::vector<mx::array>& outputs) {
  auto& encoder = mx::cpu::get_command_encoder(stream());
  const auto inputs = row_contiguous_all(given, encoder);
  auto& logits = inputs[0];
  auto& targets = inputs[1];
  auto& lse = inputs[2];
  auto& cot = inputs[3];
  auto& dx = outputs[0];
  alloc(dx);
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

// ---- Gated units: SwiGLU, GELU-gated (one element-wise function of gate and up each way) ----

// The op's array of gate and up (float32, one shape), made contiguous for the spans.
template <typename P>
mx::array gated_unit(const mx::array& gate, const mx::array& up, const char* what) {
  if (gate.shape() != up.shape()) {
    throw std::invalid_argument(std::string(what) + ": gate and up must have one shape");
  }
  check_cpu_float32(gate, what);
  check_cpu_float32(up, what);
  auto s = mx::to_stream(mx::Device::cpu);
  return mx::array(
      gate.shape(),
      mx::float32,
      std::make_shared<P>(s),
      {gate, up});
}

template <void (*Span)(const float*, const float*, float*, int64_t)>
void eval_gated_unit(
    const mx::Stream& stream, const std::vector<mx::array>& given, std::vector<mx::array>& outputs) {
  auto& encoder = mx::cpu::get_command_encoder(stream);
  const auto inputs = row_contiguous_all(given, encoder);
  set_arrays(encoder, inputs, outputs);
  encoder.dispatch([pa = inputs[0].data<float>(),
                    pb = inputs[1].data<float>(),
                    po = outputs[0].data<float>(),
                    n = int64_t(inputs[0].size())]() {
    parallel_for(n, 1, [=](int64_t begin, int64_t end) {
      Span(pa + begin, pb + begin, po + begin, end - begin);
    });
  });
}

// The backward reads gate and up alone (nothing of the forward's is kept for it): (d gate, d up)
// from one Grad primitive, those of `argnums` returned.
template <typename Grad>
std::vector<mx::array> gated_unit_vjp(
    const mx::Stream& stream,
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>& argnums) {
  auto grads = mx::array::make_arrays(
      {primals[0].shape(), primals[0].shape()},
      {mx::float32, mx::float32},
      std::make_shared<Grad>(stream),
      {primals[0], primals[1], cotangents[0]});
  std::vector<mx::array> out;
  for (int arg : argnums) {
    out.push_back(grads[arg]);
  }
  return out;
}

template <void (*Span)(const float*, const float*, const float*, float*, float*, int64_t)>
void eval_gated_unit_grad(
    const mx::Stream& stream, const std::vector<mx::array>& given, std::vector<mx::array>& outputs) {
  auto& encoder = mx::cpu::get_command_encoder(stream);
  const auto inputs = row_contiguous_all(given, encoder);
  set_arrays(encoder, inputs, outputs);
  encoder.dispatch([pa = inputs[0].data<float>(),
                    pb = inputs[1].data<float>(),
                    pg = inputs[2].data<float>(),
                    da = outputs[0].data<float>(),
                    db = outputs[1].data<float>(),
                    n = int64_t(inputs[0].size())]() {
    parallel_for(n, 1, [=](int64_t begin, int64_t end) {
      Span(pa + begin, pb + begin, pg + begin, da + begin, db + begin, end - begin);
    });
  });
}

mx::array swiglu(const mx::array& gate, const mx::array& up) {
  return gated_unit<SwiGLU>(gate, up, "swiglu");
}

void SwiGLU::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  eval_gated_unit<swiglu_span>(stream(), inputs, outputs);
}

std::vector<mx::array> SwiGLU::vjp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>& argnums,
    const std::vector<mx::array>&) {
  return gated_unit_vjp<SwiGLUGrad>(stream(), primals, cotangents, argnums);
}

void SwiGLUGrad::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  eval_gated_unit_grad<swiglu_grad_span>(stream(), inputs, outputs);
}

// gelu_approx(g) * u, gelu_approx(g) = g (1 + tanh(z)) / 2 = g sigmoid(2z) with
// 2z = k1 g + k3 g^3, k1 = 2 sqrt(2 / pi), k3 = k1 * 0.044715: the sigmoid form vectorizes
// (fast_exp) where MLX's tanh runs scalar; the two agree to float32 rounding.
constexpr float kGeluK1 = 1.5957691216057308f;
constexpr float kGeluK3 = 0.07135481627260025f;

inline void gelu_gate_span(
    const float* __restrict a, const float* __restrict b, float* __restrict out, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    float x = a[i];
    out[i] = x * sigmoid(x * (kGeluK1 + kGeluK3 * x * x)) * b[i];
  }
}

inline void gelu_gate_grad_span(
    const float* __restrict a,
    const float* __restrict b,
    const float* __restrict g,
    float* __restrict da,
    float* __restrict db,
    int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    float x = a[i], gi = g[i], sq = x * x;
    float s = sigmoid(x * (kGeluK1 + kGeluK3 * sq));
    // d gelu / dx = s + x s (1 - s) (k1 + 3 k3 x^2)
    da[i] = gi * b[i] * (s + x * s * (1.0f - s) * (kGeluK1 + 3.0f * kGeluK3 * sq));
    db[i] = gi * x * s;
  }
}

mx::array gelu_gate(const mx::array& gate, const mx::array& up) {
  return gated_unit<GeluGate>(gate, up, "gelu_gate");
}

void GeluGate::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  eval_gated_unit<gelu_gate_span>(stream(), inputs, outputs);
}

std::vector<mx::array> GeluGate::vjp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>& argnums,
    const std::vector<mx::array>&) {
  return gated_unit_vjp<GeluGateGrad>(stream(), primals, cotangents, argnums);
}

void GeluGateGrad::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  eval_gated_unit_grad<gelu_gate_grad_span>(stream(), inputs, outputs);
}

// ---- RMSNorm -------------------------------------------------------------------------------

// y = x * r * w of one row, r = 1 / sqrt(mean(x^2) + eps); returns r.
inline float row_rms_norm(
    const float* __restrict x, const float* __restrict w, float* __restrict y, int64_t d, float eps) {
  float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
  for (int64_t j = 0; j < d; ++j) {
    ss += x[j] * x[j];
  }
  float r = 1.0f / std::sqrt(ss / static_cast<float>(d) + eps);
#pragma omp simd
  for (int64_t j = 0; j < d; ++j) {
    y[j] = x[j] * r * w[j];
  }
  return r;
}

// dx = r (dy w - xhat mean(dy w xhat)) of one row, xhat = x r; adds dy xhat to dw.
inline void row_rms_norm_grad(
    const float* __restrict x,
    const float* __restrict w,
    const float* __restrict dy,
    float r,
    float* __restrict dx,
    float* __restrict dw,
    int64_t d) {
  float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
  for (int64_t j = 0; j < d; ++j) {
    dot += dy[j] * w[j] * x[j];
  }
  float k = dot * r * r / static_cast<float>(d);
#pragma omp simd
  for (int64_t j = 0; j < d; ++j) {
    dx[j] = r * (dy[j] * w[j] - x[j] * k);
    dw[j] += dy[j] * x[j] * r;
  }
}

mx::array rms_norm(const mx::array& x, const mx::array& weight, float eps) {
  check_cpu_float32(x, "rms_norm");
  check_cpu_float32(weight, "rms_norm weight");
  if (x.ndim() < 1 || weight.ndim() != 1 || weight.shape(0) != x.shape(-1)) {
    throw std::invalid_argument("rms_norm: expected x (..., D) and weight (D,)");
  }
  auto s = mx::to_stream(mx::Device::cpu);
  int rows = x.size() / x.shape(-1);
  auto outs = mx::array::make_arrays(
      {x.shape(), {rows}},
      {mx::float32, mx::float32},
      std::make_shared<RMSNorm>(s, eps),
      {x, weight});
  return outs[0];
}

void RMSNorm::eval_cpu(const std::vector<mx::array>& given, std::vector<mx::array>& outputs) {
  auto& encoder = mx::cpu::get_command_encoder(stream());
  const auto inputs = row_contiguous_all(given, encoder);
  auto& x = inputs[0];
  alloc(outputs[0]);
  alloc(outputs[1]);
  encoder.set_input_array(x);
  encoder.set_input_array(inputs[1]);
  encoder.set_output_array(outputs[0]);
  encoder.set_output_array(outputs[1]);
  int64_t d = x.shape(-1), n = x.size() / d;
  encoder.dispatch([px = x.data<float>(),
                    pw = inputs[1].data<float>(),
                    py = outputs[0].data<float>(),
                    pr = outputs[1].data<float>(),
                    n,
                    d,
                    eps = eps_]() {
    parallel_for(n, d, [=](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        pr[i] = row_rms_norm(px + i * d, pw, py + i * d, d, eps);
      }
    });
  });
}

std::vector<mx::array> RMSNorm::vjp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>& argnums,
    const std::vector<mx::array>& outputs) {
  auto grads = mx::array::make_arrays(
      {primals[0].shape(), primals[1].shape()},
      {mx::float32, mx::float32},
      std::make_shared<RMSNormGrad>(stream()),
      {primals[0], primals[1], outputs[1], cotangents[0]});
  std::vector<mx::array> out;
  for (int arg : argnums) {
    out.push_back(grads[arg]);
  }
  return out;
}

void RMSNormGrad::eval_cpu(const std::vector<mx::array>& given, std::vector<mx::array>& outputs) {
  auto& encoder = mx::cpu::get_command_encoder(stream());
  const auto inputs = row_contiguous_all(given, encoder);
  auto& x = inputs[0];
  alloc(outputs[0]);
  alloc(outputs[1]);
  for (auto& a : inputs) {
    encoder.set_input_array(a);
  }
  encoder.set_output_array(outputs[0]);
  encoder.set_output_array(outputs[1]);
  int64_t d = x.shape(-1), n = x.size() / d;
  encoder.dispatch([px = x.data<float>(),
                    pw = inputs[1].data<float>(),
                    pr = inputs[2].data<float>(),
                    pg = inputs[3].data<float>(),
                    pdx = outputs[0].data<float>(),
                    pdw = outputs[1].data<float>(),
                    n,
                    d]() {
    // Each block of rows sums its weight gradient into its own row of `partial`; the rows are
    // then added in block order, so the result does not depend on which thread ran what.
    int64_t parts = plan_threads(n, d), block = (n + parts - 1) / parts;
    std::vector<float> partial(parts * d, 0.0f);
    parallel_parts(parts, [&](int t) {
      float* dw = partial.data() + t * d;
      for (int64_t i = t * block, end = std::min(n, (t + 1) * block); i < end; ++i) {
        row_rms_norm_grad(px + i * d, pw, pg + i * d, pr[i], pdx + i * d, dw, d);
      }
    });
    std::copy(partial.begin(), partial.begin() + d, pdw);
    for (int64_t t = 1; t < parts; ++t) {
      for (int64_t j = 0; j < d; ++j) {
        pdw[j] += partial[t * d + j];
      }
    }
  });
}

// ---- AdamW ---------------------------------------------------------------------------------

// No __restrict: p' may share p's buffer (donation, below); `omp simd` states that the
// iterations are independent, which in-place element-wise updates are.
// fp-contract=off: no fused multiply-adds, so the update rounds as MLX's separate ops do.
__attribute__((optimize("fp-contract=off"))) inline void adamw_span(
    const float* p,
    const float* g,
    const float* m,
    const float* v,
    float* po,
    float* mo,
    float* vo,
    int64_t n,
    double beta1,
    double beta2,
    float eps,
    float decay,
    float c1,
    float c2) {
  const float b1 = static_cast<float>(beta1), a1 = static_cast<float>(1.0 - beta1);
  const float b2 = static_cast<float>(beta2), a2 = static_cast<float>(1.0 - beta2);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    float gi = g[i];
    float mi = b1 * m[i] + a1 * gi;
    float vi = b2 * v[i] + a2 * (gi * gi);
    mo[i] = mi;
    vo[i] = vi;
    po[i] = p[i] * decay - (c1 * mi) / (std::sqrt(vi) * c2 + eps);
  }
}

std::vector<mx::array> adamw(
    const mx::array& p,
    const mx::array& g,
    const mx::array& m,
    const mx::array& v,
    const mx::array& coef,
    double b1,
    double b2,
    float eps) {
  for (auto* a : {&p, &g, &m, &v, &coef}) {
    check_cpu_float32(*a, "adamw");
  }
  if (g.shape() != p.shape() || m.shape() != p.shape() || v.shape() != p.shape() || coef.size() != 3) {
    throw std::invalid_argument("adamw: p, g, m, v must have one shape and coef 3 values");
  }
  auto s = mx::to_stream(mx::Device::cpu);
  std::vector<mx::array> inputs;
  for (auto* a : {&p, &g, &m, &v, &coef}) {
    inputs.push_back(*a);
  }
  return mx::array::make_arrays(
      {p.shape(), p.shape(), p.shape()},
      {mx::float32, mx::float32, mx::float32},
      std::make_shared<AdamW>(s, b1, b2, eps),
      std::move(inputs));
}

void AdamW::eval_cpu(const std::vector<mx::array>& given, std::vector<mx::array>& outputs) {
  // p', m', v' take over the buffers of p, m, v when nothing else holds them (as MLX's own
  // element-wise ops do): no fresh 3 x 4 bytes per parameter each step.
  for (int k = 0; k < 3; ++k) {
    auto& in = given[k == 0 ? 0 : k + 1];
    if (in.is_donatable() && in.flags().row_contiguous && in.nbytes() == outputs[k].nbytes()) {
      outputs[k].copy_shared_buffer(in);
    } else {
      alloc(outputs[k]);
    }
  }
  auto& encoder = mx::cpu::get_command_encoder(stream());
  std::vector<mx::array> inputs;
  for (auto& a : given) {
    inputs.push_back(row_contiguous(a, encoder));
    encoder.set_input_array(inputs.back());
  }
  for (auto& o : outputs) {
    encoder.set_output_array(o);
  }
  encoder.dispatch([p = inputs[0].data<float>(),
                    g = inputs[1].data<float>(),
                    m = inputs[2].data<float>(),
                    v = inputs[3].data<float>(),
                    coef = inputs[4].data<float>(),
                    po = outputs[0].data<float>(),
                    mo = outputs[1].data<float>(),
                    vo = outputs[2].data<float>(),
                    n = int64_t(inputs[0].size()),
                    b1 = b1_,
                    b2 = b2_,
                    eps = eps_]() {
    float decay = coef[0], c1 = coef[1], c2 = coef[2];
    parallel_for(n, 4, [=](int64_t begin, int64_t end) {
      adamw_span(p + begin, g + begin, m + begin, v + begin, po + begin, mo + begin, vo + begin,
                 end - begin, b1, b2, eps, decay, c1, c2);
    });
  });
}

// ---- RoPE ----------------------------------------------------------------------------------

// One head vector: out = (x1 c - x2 s, x1 s + x2 c) with x1, x2 its halves; `sign` -1 applies
// the inverse rotation (the VJP).
inline void rotate_half(
    const float* __restrict x,
    const float* __restrict c,
    const float* __restrict sn,
    float* __restrict out,
    int64_t half,
    float sign) {
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) {
    float x1 = x[i], x2 = x[i + half], s = sign * sn[i];
    out[i] = x1 * c[i] - x2 * s;
    out[i + half] = x1 * s + x2 * c[i];
  }
}

// Rotates every (b, t, h) vector of `in` into `out` (copies it when c is null); `in_bthd` says
// which of the two is laid out (B, T, H, D) (the other is (B, H, T, D)).
void rope_rows(
    const float* in,
    const float* c,
    const float* sn,
    float* out,
    int64_t b,
    int64_t t,
    int64_t h,
    int64_t d,
    bool in_bthd,
    float sign) {
  int64_t half = d / 2;
  parallel_for(b * t * h, d, [=](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      int64_t hi = r % h, ti = (r / h) % t, bi = r / (h * t);
      const float* src = in + (in_bthd ? r : (bi * h + hi) * t + ti) * d;
      float* dst = out + (in_bthd ? (bi * h + hi) * t + ti : r) * d;
      if (c) {
        rotate_half(src, c + ti * half, sn + ti * half, dst, half, sign);
      } else {
        std::copy(src, src + d, dst);
      }
    }
  });
}

mx::array rope(const mx::array& x, const mx::array& cos, const mx::array& sin) {
  for (auto* a : {&x, &cos, &sin}) {
    check_cpu_float32(*a, "rope");
  }
  if (x.ndim() != 4 || x.shape(-1) % 2 || cos.shape() != sin.shape() || cos.ndim() != 2 ||
      cos.shape(0) != x.shape(1) || cos.shape(1) * 2 != x.shape(-1)) {
    throw std::invalid_argument("rope: expected x (B, T, H, D) and cos, sin (T, D/2)");
  }
  auto s = mx::to_stream(mx::Device::cpu);
  return mx::array(
      {x.shape(0), x.shape(2), x.shape(1), x.shape(3)},
      mx::float32,
      std::make_shared<Rope>(s),
      {x, cos, sin});
}

// Shared by Rope (in (B, T, H, D) -> out (B, H, T, D)) and RopeGrad (the other way).
void eval_rope(
    const mx::Stream& stream,
    const std::vector<mx::array>& given,
    mx::array& out,
    bool in_bthd,
    float sign) {
  auto& encoder = mx::cpu::get_command_encoder(stream);
  const auto inputs = row_contiguous_all(given, encoder);
  auto& in = inputs[0];
  alloc(out);
  for (auto& a : inputs) {
    encoder.set_input_array(a);
  }
  encoder.set_output_array(out);
  const auto& bthd = in_bthd ? in.shape() : out.shape();
  encoder.dispatch([pi = in.data<float>(),
                    pc = inputs[1].data<float>(),
                    ps = inputs[2].data<float>(),
                    po = out.data<float>(),
                    b = int64_t(bthd[0]),
                    t = int64_t(bthd[1]),
                    h = int64_t(bthd[2]),
                    d = int64_t(bthd[3]),
                    in_bthd,
                    sign]() { rope_rows(pi, pc, ps, po, b, t, h, d, in_bthd, sign); });
}

void Rope::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  eval_rope(stream(), inputs, outputs[0], true, 1.0f);
}

std::vector<mx::array> Rope::vjp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>& argnums,
    const std::vector<mx::array>&) {
  std::vector<mx::array> grads;
  for (int arg : argnums) {
    if (arg == 0) {
      grads.push_back(mx::array(
          primals[0].shape(),
          mx::float32,
          std::make_shared<RopeGrad>(stream()),
          {cotangents[0], primals[1], primals[2]}));
    } else {
      grads.push_back(mx::zeros_like(primals[arg], stream())); // the angles are constants
    }
  }
  return grads;
}

void RopeGrad::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  eval_rope(stream(), inputs, outputs[0], false, -1.0f);
}

mx::array swap_heads(const mx::array& x, bool to_heads) {
  check_cpu_float32(x, "swap_heads");
  if (x.ndim() != 4) {
    throw std::invalid_argument("swap_heads: expected a 4-D array");
  }
  auto s = mx::to_stream(mx::Device::cpu);
  return mx::array(
      {x.shape(0), x.shape(2), x.shape(1), x.shape(3)},
      mx::float32,
      std::make_shared<SwapHeads>(s, to_heads),
      {x});
}

void SwapHeads::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& encoder = mx::cpu::get_command_encoder(stream());
  mx::array in = row_contiguous(inputs[0], encoder);
  auto& out = outputs[0];
  alloc(out);
  encoder.set_input_array(in);
  encoder.set_output_array(out);
  const auto& bthd = to_heads_ ? in.shape() : out.shape();
  encoder.dispatch([pi = in.data<float>(),
                    po = out.data<float>(),
                    b = int64_t(bthd[0]),
                    t = int64_t(bthd[1]),
                    h = int64_t(bthd[2]),
                    d = int64_t(bthd[3]),
                    in_bthd = to_heads_]() {
    rope_rows(pi, nullptr, nullptr, po, b, t, h, d, in_bthd, 1.0f);
  });
}

std::vector<mx::array> SwapHeads::vjp(
    const std::vector<mx::array>&,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>&,
    const std::vector<mx::array>&) {
  return {swap_heads(cotangents[0], !to_heads_)};
}

void CpuPrimitive::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error(std::string(name()) + " has no GPU kernel; use the pure-MLX path");
}

} // namespace mlxlab
