// Blocked ("flash-style") attention, forward and backward: softmax(q k^T * scale + mask) v with
// no [B, H, T_q, T_kv] scores tensor. Each task is one (batch, head, block of query rows): the
// block's scores go into a thread-local buffer (block x T_kv floats, which stays in L2), its
// rows' softmax runs there, and the block's output is that buffer times v. The whole-tensor path
// (kernels/ops.py's fused attention) writes and reads T_q x T_kv floats a head several times
// over: at Whisper's T = 1500 that is memory traffic, not arithmetic.
//
// The products are the BLAS's: cblas_sgemm_batch_strided (set_sgemm_batch, batched.cpp) with a
// batch of one, called from inside this file's worker threads. OpenBLAS runs a batch of one on the
// calling thread (gemm_batch_thread -> exec_blas(1, ...): no wake-up of its own pool, no lock), with
// the kernels it picked for this CPU (its AVX-512 ones where they measured faster: Whisper's
// encoder attention ran ~1.3x faster through them than through its AVX2 ones, the bound of a
// micro-kernel written at this build's fixed level, x86-64-v3). MKL is told to stay on the
// calling thread for the task (mkl_set_num_threads_local, set_blas_local_threads). A cblas_sgemm
// call would split one block's product over the BLAS's threads while ours run too.
//
// The row softmax is a plain vectorized one: x * scale + mask, its max, MLX's exp of x - max,
// their sum (vectorized, so not MLX's order), 1 / sum applied to the block's output rows. Not
// MLX's bits; within float32 rounding of mx.fast.scaled_dot_product_attention
// (tests/test_kernels_blocked_attention.py). Each row keeps (max, 1 / sum), its logsumexp in two
// parts: the backward recomputes a block's probabilities from the same product and them.
//
// Causal (SDPA's mask="causal", aligned bottom-right): query row i reads keys j <= i + T_kv - T_q,
// with no mask array. A block's products then span only the keys its last row reads: the keys
// above the diagonal are never multiplied, and a row's keys past its own last are zero
// probabilities (exp of SDPA's masked scores is 0 in float32), so a long causal sequence costs
// about half the products and holds no (T_q, T_kv) mask.
#include "common.h"
#include "kernels.h"
#include "mlx_math.h"

#include <atomic>
#include <limits>
#include <optional>
#include <vector>

namespace mlxlab {

using namespace detail;

namespace {

constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
// MKL's mkl_set_num_threads_local (this thread's count; returns the one it replaces), null where
// the BLAS runs a batch of one on the calling thread by itself (OpenBLAS).
using LocalThreads = int (*)(int);
std::atomic<LocalThreads> g_local{nullptr};

// The BLAS on one thread, the calling one, while it lives.
class OneBlasThread {
 public:
  explicit OneBlasThread(LocalThreads local) : local_(local), previous_(local ? local(1) : 0) {}
  ~OneBlasThread() {
    if (local_) {
      local_(previous_); // 0: back to the process-wide count
    }
  }
  OneBlasThread(const OneBlasThread&) = delete;
  OneBlasThread& operator=(const OneBlasThread&) = delete;

 private:
  LocalThreads local_;
  int previous_;
};

// A row whose max lies below this had float32's lowest added to every score: kernels/ops.py's
// form of a boolean mask that is false for the whole row.
constexpr float kNoKey = -0.5f * std::numeric_limits<float>::max();

// The sizes every task reads, and where a row's mask lies.
struct Dims {
  int64_t batch, heads, kv_heads, t_q, t_kv, d;
  int64_t mask_batch, mask_rows; // the mask is (mask_batch, mask_rows, t_kv): 1 or batch, 1 or t_q
  int64_t block;                 // query rows per task
  bool causal;                   // row i reads keys j <= i + t_kv - t_q (t_q <= t_kv)
  int64_t group() const { return heads / kv_heads; }
  int64_t blocks() const { return (t_q + block - 1) / block; }
  // How many keys query row i reads: the first keys(i) (all of them unless causal).
  int64_t keys(int64_t i) const { return causal ? std::min(t_kv, i + t_kv - t_q + 1) : t_kv; }
  const float* mask_row(const float* mask, int64_t b, int64_t i) const {
    if (!mask) {
      return nullptr;
    }
    return mask + ((b % mask_batch) * mask_rows + (mask_rows > 1 ? i : 0)) * t_kv;
  }
};

Dims dims_of(const std::vector<mx::array>& inputs, bool has_mask, int block, bool causal) {
  const auto& q = inputs[0];
  const auto& k = inputs[1];
  Dims dm{q.shape(0), q.shape(1), k.shape(1), q.shape(2), k.shape(2), q.shape(3), 1, 1, block,
          causal};
  if (has_mask) {
    dm.mask_batch = inputs[3].shape(0);
    dm.mask_rows = inputs[3].shape(1);
  }
  return dm;
}

// c = alpha op(a) op(b) + beta c, row-major, on the calling thread (a batch of one).
struct Gemm {
  SgemmBatchFn fn;
  void operator()(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                  int64_t lda, const float* b, int64_t ldb, float beta, float* c,
                  int64_t ldc) const {
    // A batch of one: the strides are each matrix's extent (MKL refuses overlapping ones).
    fn(kRowMajor, ta ? kTrans : kNoTrans, tb ? kTrans : kNoTrans, int(m), int(n), int(k), alpha, a,
       int(lda), int((ta ? k : m) * lda), b, int(ldb), int((tb ? n : k) * ldb), beta, c, int(ldc),
       int(m * ldc), 1);
  }
};

// x = x * scale + mask over one row of raw scores (mask may be null); returns the row's max.
inline float scale_and_mask(float* __restrict x, const float* __restrict mask, float scale,
                            int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  if (mask) {
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < n; ++j) {
      x[j] = x[j] * scale + mask[j];
      m = x[j] > m ? x[j] : m;
    }
  } else {
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < n; ++j) {
      x[j] = x[j] * scale;
      m = x[j] > m ? x[j] : m;
    }
  }
  return m;
}

// x = exp(x * scale + mask - max) over one row of raw scores, not yet divided by their sum (the
// forward scales the block's output rows instead: D values a row, not T_kv); stats = (max,
// 1 / sum).
inline void row_exp(float* __restrict x, const float* __restrict mask, float scale, int64_t n,
                    float* __restrict stats) {
  const float m = scale_and_mask(x, mask, scale, n);
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) {
    x[j] = mlx_exp(x[j] - m);
    s += x[j];
  }
  stats[0] = m;
  stats[1] = 1.0f / s;
}

// The probabilities of one row, exp(x * scale + mask - max) / sum, from its raw scores and the
// forward's (max, 1 / sum).
inline void row_probabilities(float* __restrict x, const float* __restrict mask, float scale,
                              int64_t n, const float* __restrict stats) {
  const float m = stats[0], inv = stats[1];
  if (mask) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      x[j] = mlx_exp(x[j] * scale + mask[j] - m) * inv;
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      x[j] = mlx_exp(x[j] * scale - m) * inv;
    }
  }
}

// One task of the forward: query rows [r0, r0 + rows) of head h of batch row b, over the first
// n keys (the ones its last row reads); a row's keys past its own are zero probabilities.
void forward_block(const Gemm& gemm, const Dims& dm, const float* q, const float* k,
                   const float* v, const float* mask, float scale, float* out, float* stats,
                   float* scores, int64_t b, int64_t h, int64_t r0) {
  const int64_t rows = std::min(dm.block, dm.t_q - r0), n = dm.keys(r0 + rows - 1), d = dm.d;
  const int64_t head = b * dm.heads + h, kv = b * dm.kv_heads + h / dm.group();
  const float* qb = q + (head * dm.t_q + r0) * d;
  const int64_t kv_at = kv * dm.t_kv * d;
  gemm(false, true, rows, n, d, 1.0f, qb, d, k + kv_at, d, 0.0f, scores, n);
  float* st = stats + (head * dm.t_q + r0) * 2;
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t len = dm.keys(r0 + i);
    row_exp(scores + i * n, dm.mask_row(mask, b, r0 + i), scale, len, st + i * 2);
    std::fill(scores + i * n + len, scores + (i + 1) * n, 0.0f);
  }
  float* ob = out + (head * dm.t_q + r0) * d;
  gemm(false, false, rows, d, n, 1.0f, scores, n, v + kv_at, d, 0.0f, ob, d);
  for (int64_t i = 0; i < rows; ++i) {
    const float inv = st[i * 2 + 1];
#pragma omp simd
    for (int64_t c = 0; c < d; ++c) {
      ob[i * d + c] *= inv;
    }
  }
}

// The backward's arrays, by role.
struct GradArrays {
  const float *q, *k, *v, *mask, *out, *stats, *dout;
  float *dq, *dk, *dv;
};

// One block of the backward (query rows [r0, r0 + rows) of head h): adds its part of dK and dV
// for the key/value head and writes its rows of dQ. p and dp are (block, T_kv) buffers, of which
// it uses (rows, n): the first n keys, the ones its last row reads (as forward_block).
void backward_block(const Gemm& gemm, const Dims& dm, const GradArrays& a, float scale, float* p,
                    float* dp, int64_t b, int64_t h, int64_t r0) {
  const int64_t rows = std::min(dm.block, dm.t_q - r0), n = dm.keys(r0 + rows - 1), d = dm.d;
  const int64_t head = b * dm.heads + h, kv = b * dm.kv_heads + h / dm.group();
  const int64_t at = (head * dm.t_q + r0) * d, kv_at = kv * dm.t_kv * d;
  const float *kp = a.k + kv_at, *vp = a.v + kv_at;
  float *dk = a.dk + kv_at, *dv = a.dv + kv_at;
  gemm(false, true, rows, n, d, 1.0f, a.q + at, d, kp, d, 0.0f, p, n);
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t len = dm.keys(r0 + i);
    row_probabilities(p + i * n, dm.mask_row(a.mask, b, r0 + i), scale, len,
                      a.stats + (head * dm.t_q + r0 + i) * 2);
    std::fill(p + i * n + len, p + (i + 1) * n, 0.0f); // and so dS = 0 past the row's keys
  }
  gemm(true, false, n, d, rows, 1.0f, p, n, a.dout + at, d, 1.0f, dv, d);  // dV += P^T dO
  gemm(false, true, rows, n, d, 1.0f, a.dout + at, d, vp, d, 0.0f, dp, n); // dP = dO V^T
  for (int64_t i = 0; i < rows; ++i) {
    // dS = P (dP - rowsum(dO O)): the softmax's VJP with sum_j P dP = sum_d dO O.
    const float *go = a.dout + at + i * d, *o = a.out + at + i * d;
    float delta = 0.0f;
#pragma omp simd reduction(+ : delta)
    for (int64_t c = 0; c < d; ++c) {
      delta += go[c] * o[c];
    }
    float *pr = p + i * n, *dr = dp + i * n;
    if (a.stats[(head * dm.t_q + r0 + i) * 2] < kNoKey) {
      // Every key of the row carries float32's lowest (a boolean mask with no key left): the
      // output is the plain mean of v whatever the scores, and MLX's select passes them no
      // gradient.
      std::fill(dr, dr + n, 0.0f);
      continue;
    }
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      dr[j] = pr[j] * (dr[j] - delta);
    }
  }
  gemm(false, false, rows, d, n, scale, dp, n, kp, d, 0.0f, a.dq + at, d); // dQ = dS K scale
  gemm(true, false, n, d, rows, scale, dp, n, a.q + at, d, 1.0f, dk, d);   // dK += dS^T Q scale
}

void check_attention_inputs(const mx::array& q, const mx::array& k, const mx::array& v,
                            const std::optional<mx::array>& mask, bool causal) {
  check_cpu_float32(q, "blocked_attention q");
  check_cpu_float32(k, "blocked_attention k");
  check_cpu_float32(v, "blocked_attention v");
  if (q.ndim() != 4 || k.ndim() != 4 || k.shape() != v.shape() || k.shape(0) != q.shape(0) ||
      k.shape(3) != q.shape(3) || k.shape(1) < 1 || q.shape(1) % k.shape(1) != 0) {
    throw std::invalid_argument(
        "blocked_attention: expected q (B, H, T_q, D), k and v (B, H_kv, T_kv, D), H_kv | H");
  }
  if (causal && (mask || q.shape(2) > k.shape(2))) {
    // (a query row before the first key would read none; a mask with causal has no gradient rule)
    throw std::invalid_argument(
        "blocked_attention: causal takes no mask and T_q <= T_kv (pass an additive mask instead)");
  }
  if (mask) {
    check_cpu_float32(*mask, "blocked_attention mask");
    const auto& m = *mask;
    if (m.ndim() != 3 || (m.shape(0) != 1 && m.shape(0) != q.shape(0)) ||
        (m.shape(1) != 1 && m.shape(1) != q.shape(2)) || m.shape(2) != k.shape(2)) {
      throw std::invalid_argument(
          "blocked_attention: the mask must be (1 or B, 1 or T_q, T_kv), additive");
    }
  }
}

// Runs worker(next) on the pool's threads (as many as plan_threads gives `tasks` of `cost`); each
// worker takes tasks by next() until it returns tasks or more. A thread on a busy core then runs
// fewer tasks instead of holding the others up at the end; which thread runs a task changes no
// result (each task writes its own part of the outputs).
template <typename Worker>
void run_tasks(int64_t tasks, int64_t cost, const Worker& worker) {
  std::atomic<int64_t> counter{0};
  auto next = [&counter]() { return counter.fetch_add(1, std::memory_order_relaxed); };
  const int64_t threads = plan_threads(tasks, cost);
  if (threads <= 1) {
    worker(next);
  } else {
    parallel_parts(threads, [&](int) { worker(next); });
  }
}

} // namespace

void set_blas_local_threads(uintptr_t address) {
  g_local = reinterpret_cast<LocalThreads>(address);
}

mx::array blocked_attention(const mx::array& q, const mx::array& k, const mx::array& v,
                            const std::optional<mx::array>& mask, float scale, int block,
                            bool causal) {
  check_attention_inputs(q, k, v, mask, causal);
  if (block < 1) {
    throw std::invalid_argument("blocked_attention: block must be >= 1 query rows");
  }
  if (!sgemm_batch_fn()) {
    throw std::runtime_error("blocked_attention: no batched sgemm set (set_sgemm_batch)");
  }
  auto s = mx::to_stream(mx::Device::cpu);
  std::vector<mx::array> inputs{mx::contiguous(q, false, s), mx::contiguous(k, false, s),
                                mx::contiguous(v, false, s)};
  if (mask) {
    inputs.push_back(mx::contiguous(*mask, false, s));
  }
  mx::Shape stats{q.shape(0), q.shape(1), q.shape(2), 2};
  auto outs = mx::array::make_arrays({q.shape(), stats}, {mx::float32, mx::float32},
                                     std::make_shared<BlockedAttention>(s, scale, block, causal),
                                     std::move(inputs));
  return outs[0];
}

void BlockedAttention::eval_cpu(const std::vector<mx::array>& inputs,
                                std::vector<mx::array>& outputs) {
  auto& encoder = mx::cpu::get_command_encoder(stream());
  set_arrays(encoder, inputs, outputs);
  const Dims dm = dims_of(inputs, inputs.size() > 3, block_, causal_);
  const float* mask = inputs.size() > 3 ? inputs[3].data<float>() : nullptr;
  encoder.dispatch([dm, mask, scale = scale_, gemm = Gemm{sgemm_batch_fn()}, local = g_local.load(),
                    q = inputs[0].data<float>(), k = inputs[1].data<float>(),
                    v = inputs[2].data<float>(), out = outputs[0].data<float>(),
                    stats = outputs[1].data<float>()]() {
    const int64_t blocks = dm.blocks(), tasks = dm.batch * dm.heads * blocks;
    // (causal: a task's products span half the keys on average)
    run_tasks(tasks, dm.block * dm.t_kv * dm.d / (dm.causal ? 2 : 1), [&](const auto& next) {
      OneBlasThread alone(local);
      std::vector<float> scores(dm.block * dm.t_kv);
      for (int64_t t = next(); t < tasks; t = next()) {
        const int64_t head = t / blocks;
        forward_block(gemm, dm, q, k, v, mask, scale, out, stats, scores.data(),
                      head / dm.heads, head % dm.heads, (t % blocks) * dm.block);
      }
    });
  });
}

namespace {

// d loss / d mask for an additive mask that is itself differentiated (a learned bias): dS summed
// over what the mask is broadcast over, with MLX's ops (the scores whole: the rare case).
mx::array mask_gradient(const std::vector<mx::array>& primals, const mx::array& dout, float scale,
                        mx::Stream s) {
  const auto &q = primals[0], &k = primals[1], &v = primals[2], &mask = primals[3];
  const int b = q.shape(0), h = q.shape(1), hk = k.shape(1), tq = q.shape(2), d = q.shape(3);
  const int tk = k.shape(2);
  // (B, H_kv, group, T_q, D) against (B, H_kv, 1, T_kv, D): query head h reads kv head h / group.
  auto qg = mx::reshape(mx::multiply(q, mx::array(scale), s), {b, hk, h / hk, tq, d}, s);
  auto kg = mx::expand_dims(k, 2, s), vg = mx::expand_dims(v, 2, s);
  auto dog = mx::reshape(dout, {b, hk, h / hk, tq, d}, s);
  auto masked = mx::add(mx::matmul(qg, mx::swapaxes(kg, -1, -2, s), s),
                        mx::reshape(mask, {mask.shape(0), 1, 1, mask.shape(1), tk}, s), s);
  auto p = mx::softmax(masked, -1, false, s);
  auto dp = mx::matmul(dog, mx::swapaxes(vg, -1, -2, s), s);
  auto ds = mx::multiply(p, mx::subtract(dp, mx::sum(mx::multiply(p, dp, s), -1, true, s), s), s);
  ds = mx::sum(ds, std::vector<int>{1, 2}, false, s); // (B, T_q, T_kv)
  if (mask.shape(0) == 1) {
    ds = mx::sum(ds, 0, true, s);
  }
  if (mask.shape(1) == 1) {
    ds = mx::sum(ds, 1, true, s);
  }
  return ds;
}

} // namespace

std::vector<mx::array> BlockedAttention::vjp(const std::vector<mx::array>& primals,
                                             const std::vector<mx::array>& cotangents,
                                             const std::vector<int>& argnums,
                                             const std::vector<mx::array>& outputs) {
  auto s = stream();
  auto dout = mx::contiguous(cotangents[0], false, s);
  std::vector<mx::array> inputs{primals[0], primals[1], primals[2]};
  if (primals.size() > 3) {
    inputs.push_back(primals[3]);
  }
  inputs.insert(inputs.end(), {outputs[0], outputs[1], dout});
  auto grads = mx::array::make_arrays(
      {primals[0].shape(), primals[1].shape(), primals[2].shape()},
      {mx::float32, mx::float32, mx::float32},
      std::make_shared<BlockedAttentionGrad>(s, scale_, block_, causal_), std::move(inputs));
  std::vector<mx::array> out;
  for (int arg : argnums) {
    out.push_back(arg < 3 ? grads[arg] : mask_gradient(primals, dout, scale_, s));
  }
  return out;
}

void BlockedAttentionGrad::eval_cpu(const std::vector<mx::array>& inputs,
                                    std::vector<mx::array>& outputs) {
  auto& encoder = mx::cpu::get_command_encoder(stream());
  set_arrays(encoder, inputs, outputs);
  const bool has_mask = inputs.size() > 6;
  const Dims dm = dims_of(inputs, has_mask, block_, causal_);
  const int at = has_mask ? 4 : 3; // out, stats, dout follow q, k, v (and the mask)
  GradArrays a{inputs[0].data<float>(), inputs[1].data<float>(), inputs[2].data<float>(),
               has_mask ? inputs[3].data<float>() : nullptr, inputs[at].data<float>(),
               inputs[at + 1].data<float>(), inputs[at + 2].data<float>(),
               outputs[0].data<float>(), outputs[1].data<float>(), outputs[2].data<float>()};
  encoder.dispatch([dm, a, scale = scale_, gemm = Gemm{sgemm_batch_fn()},
                    local = g_local.load()]() {
    // One task per (batch row, key/value head): it alone adds into that head's dK and dV (no
    // atomics) and writes the dQ rows of the group's query heads.
    const int64_t tasks = dm.batch * dm.kv_heads, group = dm.group(), blocks = dm.blocks();
    const int64_t cost = group * dm.t_q * dm.t_kv * dm.d / (dm.causal ? 2 : 1);
    run_tasks(tasks, cost, [&](const auto& next) {
      OneBlasThread alone(local);
      std::vector<float> p(dm.block * dm.t_kv), dp(dm.block * dm.t_kv);
      for (int64_t t = next(); t < tasks; t = next()) {
        const int64_t b = t / dm.kv_heads, kvh = t % dm.kv_heads, size = dm.t_kv * dm.d;
        std::fill(a.dk + t * size, a.dk + (t + 1) * size, 0.0f);
        std::fill(a.dv + t * size, a.dv + (t + 1) * size, 0.0f);
        for (int64_t h = kvh * group; h < (kvh + 1) * group; ++h) {
          for (int64_t blk = 0; blk < blocks; ++blk) {
            backward_block(gemm, dm, a, scale, p.data(), dp.data(), b, h, blk * dm.block);
          }
        }
      }
    });
  });
}

} // namespace mlxlab
