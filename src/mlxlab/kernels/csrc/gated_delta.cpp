// The gated delta rule token by token (mlx-lm's gated_delta_ops), forward and backward, on the
// CPU: what a gated-delta layer (Qwen3.5 / Qwen3-Next, Kimi-Linear's KDA, OLMo-Hybrid) trains
// through there. Per head, on a (Dv, Dk) state S, each token t:
//
//     A = S * g_t            (g_t a scalar, or one per key channel: KDA)
//     u = A k_t,   d = beta_t (v_t - u),   S' = A + d k_t^T,   y_t = S' q_t
//     S <- S' (a masked step keeps S)
//
// Every row of S is a recurrence of its own: row i reads v_t[i] and the token's shared q, k, g,
// beta, and nothing of the other rows. So a head's rows are walked in blocks of kRowBlock, four
// rows at a time, each token one pass over the rows: the update, and in it the rows' dot
// products with the next token's gated k and q. The chunked form (models/layers/gated_delta.py)
// does the same work as batched matrix products, whose CPU dispatches and C x C triangular solves
// cost more than these passes at the heads' sizes (Dk = Dv = 128).
//
// The backward, by row block too (each row's cotangent dS_i is again a recurrence of its own,
// backwards): for each span of tokens from the last, the span's states are recomputed from the
// one the forward kept at its start (each row's u, the state's dot product with the gated key,
// kept as it goes), and the tokens walked backwards. Per token and row, with G = dS' (dS_i +
// dy_i q, or dy_i q where the step is masked and dS_i passes through):
//
//     dq += dy_i S'_i,   dd_i = G . k,   dk += d_i G,   dv_i = beta dd_i,
//     dbeta += (v_i - u_i) dd_i,   du_i = -beta dd_i,   dA = G + du_i k,   dk += du_i A_i,
//     dg += dA * S_i (per channel),   dS_i <- dA * g (+ dS_i where masked)
//
// The gate arrives as its logarithm (what the layers compute); its gradient is dg * g. The
// memory the rule keeps for its backward beyond its inputs: a state every kSpan tokens (T / 64
// of them, a 64th of the token loop's); the backward's own, one span's states a thread. q and k
// are read at their own heads (value head h reads key head h / (Hv / Hk)); their gradients come
// per value head and the VJP sums each group.
#include "common.h"
#include "kernels.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "mlx/backend/cpu/encoder.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace mlxlab {

using namespace detail;

namespace {

// Rows of a head's state the forward walks together over the tokens: 32 rows of 128 (16 KB) stay
// in L1 while every token updates them. A whole 128 x 128 head (64 KB, in L2) took ~15 % longer
// for the forward (Xeon 6 model 207, 2,048 tokens): each token's update went out to L2.
constexpr int64_t kRowBlock = 32;
// The forward keeps the state entering every span of kSpan tokens (a third output, the
// backward's input: T / kSpan states a head), and the backward recomputes one span's states
// from it, kGradRowBlock rows at a time (64 states of 32 x 128 rows are 1 MB, in L2), while it
// walks the span backwards. Keeping every state instead took twice as long at 2,048 tokens: the
// states went to memory and back.
constexpr int64_t kSpan = 64;
constexpr int64_t kGradRowBlock = 32;

struct RuleDims {
  int64_t b, t, hk, hv, dk, dv;
  bool vec;    // the gate per key channel (B, T, Hv, Dk), else (B, T, Hv)
  bool masked; // a keep (B, T) input
  bool delta;  // the delta rule's d = beta (v - S k); else gated linear attention's d = beta v
};

RuleDims rule_dims(const std::vector<mx::array>& in, bool delta) {
  const auto &q = in[0], &v = in[2], &lg = in[3];
  return {q.shape(0), q.shape(1), q.shape(2), v.shape(2), q.shape(3), v.shape(3),
          lg.ndim() == 4, in.size() > 6 && in[6].ndim() == 2, delta};
}

struct RuleInputs {
  const float *q, *k, *v, *lg, *beta, *s0, *keep;
};

RuleInputs rule_inputs(const std::vector<mx::array>& in, const RuleDims& d) {
  return {in[0].data<float>(), in[1].data<float>(), in[2].data<float>(), in[3].data<float>(),
          in[4].data<float>(), in[5].data<float>(), d.masked ? in[6].data<float>() : nullptr};
}

// Where token t's row of value head h starts in q and k (the key head h reads), and in v, y and
// dy (B, T, Hv, Dv).
inline int64_t key_row(const RuleDims& d, int64_t b, int64_t h, int64_t t) {
  return ((b * d.t + t) * d.hk + h / (d.hv / d.hk)) * d.dk;
}

inline int64_t value_row(const RuleDims& d, int64_t b, int64_t h, int64_t t) {
  return ((b * d.t + t) * d.hv + h) * d.dv;
}

// Asks for the row at p (n floats) ahead of its use, a 64-byte line a request.
inline void prefetch_row(const float* p, int64_t n) {
  for (int64_t at = 0; at < n; at += 16) {
    __builtin_prefetch(p + at);
  }
}

// One token of one head, as its rows read it: g holds the gate per key channel (a scalar gate
// copied to all), v the head's value row.
struct Token {
  const float *q, *k, *v;
  float beta, qk; // qk = q . k
  bool keep;
  std::vector<float> g, gk, gq; // gk = g * k, gq = g * q
  // the head's values of the rows walked, [first, first + count), copied: read in place, a row
  // of v sits 4 KB times the token away from the last, where its 4 KB offset can match a state
  // row's just stored, and the load waits on the store (4K aliasing)
  std::vector<float> vrow;
  int64_t first = 0, count = 0;

  explicit Token(int64_t dk, int64_t dv) : g(dk), gk(dk), gq(dk), vrow(dv), count(dv) {}

  // The rows the loads that follow copy values for: a row block's.
  void rows(int64_t from, int64_t n) {
    first = from;
    count = n;
  }

  // Asks for token t's rows of q, k and v ahead of its step: a head's rows are a token's whole
  // row of heads apart (4 KB and more), so each token's is on a page of its own, where the
  // hardware prefetcher does not follow.
  static void prefetch(const RuleDims& d, const RuleInputs& a, int64_t b, int64_t h, int64_t t) {
    prefetch_row(a.k + key_row(d, b, h, t), d.dk);
    prefetch_row(a.q + key_row(d, b, h, t), d.dk);
    prefetch_row(a.v + value_row(d, b, h, t), d.dv);
  }

  void load(const RuleDims& d, const RuleInputs& a, int64_t b, int64_t h, int64_t t) {
    const int64_t bt = b * d.t + t;
    q = a.q + key_row(d, b, h, t);
    k = a.k + key_row(d, b, h, t);
    const float* values = a.v + value_row(d, b, h, t) + first;
    std::copy(values, values + count, vrow.begin() + first);
    v = vrow.data();
    beta = a.beta[bt * d.hv + h];
    keep = !a.keep || a.keep[bt] != 0.0f;
    if (d.vec) {
      const float* lg = a.lg + (bt * d.hv + h) * d.dk;
      for (int64_t j = 0; j < d.dk; ++j) {
        g[j] = std::exp(lg[j]);
      }
    } else {
      std::fill(g.begin(), g.end(), std::exp(a.lg[bt * d.hv + h]));
    }
    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
    for (int64_t j = 0; j < d.dk; ++j) {
      gk[j] = g[j] * k[j];
      gq[j] = g[j] * q[j];
      dot = std::fma(q[j], k[j], dot);
    }
    qk = dot;
  }
};

#if defined(__AVX2__) && defined(__FMA__)
// The four sums of four 8-lane vectors' lanes, in that order: three horizontal adds and one
// across the halves.
inline __m128 sum_lanes(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 abcd = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}
#endif

// Rows are stepped four at a time: a row's dot products are chains of dependent adds, and four
// rows give the core four independent chains (and read q, k, g once for all of them). Four
// scalar accumulators, not an array (GCC vectorizes an omp simd reduction over an array section
// element by element), written out through MLXLAB_ROWS4. Fewer than four rows are padded with
// zero rows, which add exactly zero to every sum. Products and sums are explicit fused
// multiply-adds (the build turns contraction off): every x86-64-v3 and arm64 CPU has them.
#define MLXLAB_ROWS4(X) X(0) X(1) X(2) X(3)

// Four rows' dot products with a (into ua) and, where b is not null, with b (into ub). On x86-64
// (AVX2 and FMA at the build's level) with Dk a multiple of 8, eight-lane sums whose lanes are
// added by a tree of horizontal adds: GCC reduces an omp simd reduction's lanes one at a time, in
// a serial chain of scalar adds through the stack (64 loads and 8 chains of 8 adds for the
// forward's eight sums), which cost more than the loop. Elsewhere the loop GCC vectorizes.
inline __attribute__((always_inline)) void dots_four(const float* const* s, const float* a,
                                                     const float* b, int64_t dk, float* ua,
                                                     float* ub) {
#if defined(__AVX2__) && defined(__FMA__)
  if (dk % 8 == 0) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    __m256 b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    for (int64_t j = 0; j < dk; j += 8) {
      const __m256 x = _mm256_loadu_ps(a + j);
      const __m256 s0 = _mm256_loadu_ps(s[0] + j), s1 = _mm256_loadu_ps(s[1] + j);
      const __m256 s2 = _mm256_loadu_ps(s[2] + j), s3 = _mm256_loadu_ps(s[3] + j);
      a0 = _mm256_fmadd_ps(s0, x, a0);
      a1 = _mm256_fmadd_ps(s1, x, a1);
      a2 = _mm256_fmadd_ps(s2, x, a2);
      a3 = _mm256_fmadd_ps(s3, x, a3);
      if (b) {
        const __m256 y = _mm256_loadu_ps(b + j);
        b0 = _mm256_fmadd_ps(s0, y, b0);
        b1 = _mm256_fmadd_ps(s1, y, b1);
        b2 = _mm256_fmadd_ps(s2, y, b2);
        b3 = _mm256_fmadd_ps(s3, y, b3);
      }
    }
    _mm_storeu_ps(ua, sum_lanes(a0, a1, a2, a3));
    if (b) {
      _mm_storeu_ps(ub, sum_lanes(b0, b1, b2, b3));
    }
    return;
  }
#endif
  const float* s0 = s[0];
  const float* s1 = s[1];
  const float* s2 = s[2];
  const float* s3 = s[3];
  float x0 = 0.0f, x1 = 0.0f, x2 = 0.0f, x3 = 0.0f, y0 = 0.0f, y1 = 0.0f, y2 = 0.0f, y3 = 0.0f;
#pragma omp simd reduction(+ : x0, x1, x2, x3, y0, y1, y2, y3)
  for (int64_t j = 0; j < dk; ++j) {
    const float aj = a[j], bj = b ? b[j] : 0.0f;
#define MLXLAB_DOTS(r)                    \
  x##r = std::fma(s##r[j], aj, x##r);     \
  y##r = std::fma(s##r[j], bj, y##r);
    MLXLAB_ROWS4(MLXLAB_DOTS)
#undef MLXLAB_DOTS
  }
  ua[0] = x0, ua[1] = x1, ua[2] = x2, ua[3] = x3;
  if (b) {
    ub[0] = y0, ub[1] = y1, ub[2] = y2, ub[3] = y3;
  }
}

// Four rows of a head's state as one step reads them: s[r] the row (Dk floats), o[r] where its
// update goes (s[r] itself, or the next state's row), v[r] its value (0 for a padding row), e[r]
// its cotangent and dy[r] its output's (the backward).
struct Four {
  float* s[4];
  float* o[4];
  float* e[4];
  float v[4], dy[4];
  float u[4]; // s . (g * k), the token's (the step's in, the next token's out; the backward's in)
  float w[4]; // s . (g * q), the token's (in) and the next token's (out)
  float c[4]; // the backward's e . k
};

// The token's step over four rows without the delta term (gated linear attention: d = beta v,
// Mamba-2's scan): the update, then the next token's dot products with its gated q alone (READ),
// a second pass over the rows, which are in L1.
template <bool KEEP, bool READ>
inline void linear_step_four(const Token& tok, const Token* next, Four& f, float* y, int64_t dk) {
  const float* __restrict k = tok.k;
  const float* __restrict g = tok.g.data();
  float d[4];
  for (int r = 0; r < 4; ++r) {
    d[r] = f.v[r] * tok.beta;
    if (READ) {
      y[r] = std::fma(d[r], tok.qk, f.w[r]);
    }
  }
  for (int r = 0; r < 4; ++r) {
    const float* s = f.s[r];
    float* o = f.o[r];
    if (!KEEP) {
      if (s != o) {
        std::copy(s, s + dk, o);
      }
      continue;
    }
    const float dr = d[r];
#pragma omp simd
    for (int64_t j = 0; j < dk; ++j) {
      o[j] = std::fma(k[j], dr, s[j] * g[j]);
    }
  }
  if (next && READ) {
    dots_four(f.o, next->gq.data(), nullptr, dk, f.w, nullptr);
  }
}

// The token's step over four rows (updated in place unless the step is masked): f.u and f.w hold
// the rows' dot products with the token's gated k and q (taken by the token before, or by
// dots_four where a walk starts), y[r] gets their outputs (READ): y_r = S'_r . q = (g * s_r) . q
// + d_r (k . q). Where next is not null, the updated rows' dot products with the next token's
// gated k (and q, READ) are taken in the same pass as the update and left in f.u (f.w): one pass
// over the rows a token, and the sums of a group's next token are far from where they are read.
template <bool KEEP, bool READ, bool DELTA>
inline __attribute__((always_inline)) void step_four(const Token& tok, const Token* next, Four& f,
                                                     float* y, int64_t dk) {
  if constexpr (!DELTA) {
    linear_step_four<KEEP, READ>(tok, next, f, y, dk);
    return;
  }
  const float* __restrict k = tok.k;
  const float* __restrict g = tok.g.data();
  // o[r] may be s[r]: each j reads s[r][j] before it writes o[r][j], which omp simd allows
  const float* s0 = f.s[0];
  const float* s1 = f.s[1];
  const float* s2 = f.s[2];
  const float* s3 = f.s[3];
  float* o0 = f.o[0];
  float* o1 = f.o[1];
  float* o2 = f.o[2];
  float* o3 = f.o[3];
#define MLXLAB_DELTA(r)                                  \
  const float d##r = (f.v[r] - f.u[r]) * tok.beta;       \
  if (READ) {                                            \
    y[r] = std::fma(d##r, tok.qk, f.w[r]);               \
  }
  MLXLAB_ROWS4(MLXLAB_DELTA)
#undef MLXLAB_DELTA
  const float* nk = next ? next->gk.data() : nullptr;
  const float* nq = next && READ ? next->gq.data() : nullptr;
  if (!KEEP) {
    if (s0 != o0) {
#define MLXLAB_KEEP(r) std::copy(s##r, s##r + dk, o##r);
      MLXLAB_ROWS4(MLXLAB_KEEP)
#undef MLXLAB_KEEP
    }
    if (next) {
      dots_four(f.o, nk, nq, dk, f.u, f.w);
    }
    return;
  }
#if defined(__AVX2__) && defined(__FMA__)
  if (next && dk % 8 == 0) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    __m256 b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    const __m256 e0 = _mm256_set1_ps(d0), e1 = _mm256_set1_ps(d1);
    const __m256 e2 = _mm256_set1_ps(d2), e3 = _mm256_set1_ps(d3);
    for (int64_t j = 0; j < dk; j += 8) {
      const __m256 gj = _mm256_loadu_ps(g + j), kj = _mm256_loadu_ps(k + j);
      const __m256 x = _mm256_loadu_ps(nk + j);
      const __m256 z = READ ? _mm256_loadu_ps(nq + j) : x;
#define MLXLAB_FUSED(r)                                                                    \
  {                                                                                        \
    const __m256 n = _mm256_fmadd_ps(kj, e##r, _mm256_mul_ps(_mm256_loadu_ps(s##r + j), gj)); \
    _mm256_storeu_ps(o##r + j, n);                                                         \
    a##r = _mm256_fmadd_ps(n, x, a##r);                                                    \
    if (READ) {                                                                            \
      b##r = _mm256_fmadd_ps(n, z, b##r);                                                  \
    }                                                                                      \
  }
      MLXLAB_ROWS4(MLXLAB_FUSED)
#undef MLXLAB_FUSED
    }
    _mm_storeu_ps(f.u, sum_lanes(a0, a1, a2, a3));
    if (READ) {
      _mm_storeu_ps(f.w, sum_lanes(b0, b1, b2, b3));
    }
    return;
  }
#endif
#pragma omp simd
  for (int64_t j = 0; j < dk; ++j) {
    const float gj = g[j], kj = k[j];
#define MLXLAB_NEXT(r) o##r[j] = std::fma(kj, d##r, s##r[j] * gj);
    MLXLAB_ROWS4(MLXLAB_NEXT)
#undef MLXLAB_NEXT
  }
  if (next) {
    dots_four(f.o, nk, nq, dk, f.u, f.w);
  }
}

// Where one token's gradients go: the head's rows of dq, dk (Dk, summed into), dv (Dv), the log
// gate's (Dk or 1, summed into) and beta's (summed into).
struct TokenGrads {
  float *dq, *dk, *dv, *dlg, *dbeta;
};

// The token's backward over four rows: f.s the rows' state entering the token, f.e their
// cotangent of the state after it (replaced by the one before it), f.dy their outputs', f.u
// their s . (g * k) (the recompute's); dv[r] gets their values' gradients, dq, dk and gsum
// (sum_i dA_i * S_i per channel) are summed into, and the return is their part of beta's
// gradient. With G = dS' (e + dy q; dy q where the step is masked and e passes through),
// G . k = e . k + dy (q . k): a first pass takes e . k (the state's dot products are the
// recompute's), the second everything else.
template <bool KEEP, bool DELTA>
inline __attribute__((always_inline)) float grad_four(const Token& tok, Four& f, float* dv,
                                                      const TokenGrads& out,
                                                      float* __restrict gsum, int64_t dk) {
  const float* __restrict k = tok.k;
  const float* __restrict q = tok.q;
  const float* __restrict g = tok.g.data();
  float* __restrict dq = out.dq;
  float* __restrict dkv = out.dk;
  const float* __restrict s0 = f.s[0];
  const float* __restrict s1 = f.s[1];
  const float* __restrict s2 = f.s[2];
  const float* __restrict s3 = f.s[3];
  float* __restrict e0 = f.e[0];
  float* __restrict e1 = f.e[1];
  float* __restrict e2 = f.e[2];
  float* __restrict e3 = f.e[3];
  const float beta = tok.beta;
  float dbeta = 0.0f;
  if (KEEP) {
    dots_four(f.e, k, nullptr, dk, f.c, nullptr);
  }
#define MLXLAB_ROW(r)                                          \
  const float res##r = DELTA ? f.v[r] - f.u[r] : f.v[r], d##r = res##r * beta; \
  const float y##r = f.dy[r];                                  \
  const float dd##r = std::fma(y##r, tok.qk, KEEP ? f.c[r] : 0.0f); \
  const float du##r = DELTA ? -beta * dd##r : 0.0f;            \
  dv[r] = beta * dd##r;                                        \
  dbeta = std::fma(res##r, dd##r, dbeta);
  MLXLAB_ROWS4(MLXLAB_ROW)
#undef MLXLAB_ROW
  // dq = sum_r dy_r S'_r = g * (sum_r dy_r s_r) + (sum_r dy_r d_r) k, and the key's part through
  // A, sum_r du_r (g * s_r) = g * (sum_r du_r s_r): per row and channel two multiply-adds
  // into sums, not S'_r and g * s_r each
  const float yd = y0 * d0 + y1 * d1 + y2 * d2 + y3 * d3;
#pragma omp simd
  for (int64_t j = 0; j < dk; ++j) {
    const float gj = g[j], kj = k[j], qj = q[j];
    float dkj = 0.0f, gs = 0.0f, ys = 0.0f, us = 0.0f;
#define MLXLAB_GRAD(r)                                                \
  {                                                                   \
    const float sj = s##r[j], ej = e##r[j];                           \
    const float grad = KEEP ? std::fma(y##r, qj, ej) : y##r * qj;     \
    dkj = std::fma(d##r, grad, dkj);                                  \
    const float da = std::fma(du##r, kj, grad);                       \
    gs = std::fma(da, sj, gs);                                        \
    ys = std::fma(y##r, sj, ys);                                      \
    us = std::fma(du##r, sj, us);                                     \
    e##r[j] = KEEP ? da * gj : std::fma(da, gj, ej);                  \
  }
    MLXLAB_ROWS4(MLXLAB_GRAD)
#undef MLXLAB_GRAD
    dq[j] = std::fma(gj, ys, std::fma(yd, kj, dq[j]));
    dkv[j] = std::fma(gj, us, dkv[j] + dkj);
    gsum[j] += gs;
  }
  return dbeta;
}

// Four rows' values into x (zeros past n, or all where from is null). A whole four is one 16-byte
// copy: the steps read these four floats back as one vector, and a vector load of four separate
// scalar stores waits for all of them to reach the cache (the store buffer forwards only a load
// that one store covers; a sixth of the backward's samples in a profile sat on that load). No
// loop where from is null: GCC vectorized one into a masked load at the null address, which the
// CPU serves by a microcode assist, at every group of rows and token.
inline void load_four(float* x, const float* from, int64_t n) {
  if (!from) {
    std::memset(x, 0, 4 * sizeof(float));
    return;
  }
  if (n == 4) {
    std::memcpy(x, from, 4 * sizeof(float));
    return;
  }
  std::memset(x, 0, 4 * sizeof(float));
  std::memcpy(x, from, n * sizeof(float));
}

// The first n of four rows' values from x into to: a whole four is one 16-byte copy, not a call
// to memmove (std::copy of a length known only at run time; 4 calls a group of rows and token
// put memmove at 9 % of the rule's samples).
inline void store_four(float* to, const float* x, int64_t n) {
  if (n == 4) {
    std::memcpy(to, x, 4 * sizeof(float));
    return;
  }
  for (int64_t r = 0; r < n; ++r) {
    to[r] = x[r];
  }
}

// Rows [r0, r0 + rows) of a head's state, walked four at a time: s the first (rows Dk apart), o
// where their update goes (s itself, or the next state's rows), e their cotangents (the
// backward), pad four zero rows' room (8 x Dk floats) for a last group of fewer than four.
struct RowBlock {
  float* s;
  float* o;
  float* e;
  int64_t r0, rows, dk;
  float* pad;

  // Calls fn(four, count) for each group of four rows; a short group's rows are copied into
  // pad (zeros past them) and back afterwards.
  template <typename F>
  void each_four(const Token& tok, const float* dy, F&& fn) const {
    for (int64_t i = 0; i < rows; i += 4) {
      const int64_t n = std::min<int64_t>(4, rows - i);
      Four f; // each field the step reads is set: value-initializing it was a `rep stos` a group
      float* ps = pad;
      float* pe = pad + 4 * dk;
      if (n < 4) {
        std::fill(pad, pad + 8 * dk, 0.0f);
        std::copy(s + i * dk, s + (i + n) * dk, ps);
        if (e) {
          std::copy(e + i * dk, e + (i + n) * dk, pe);
        }
      }
      for (int64_t r = 0; r < 4; ++r) {
        f.s[r] = n < 4 ? ps + r * dk : s + (i + r) * dk;
        f.o[r] = n < 4 ? ps + r * dk : o + (i + r) * dk;
        f.e[r] = e ? (n < 4 ? pe + r * dk : e + (i + r) * dk) : nullptr;
      }
      load_four(f.v, tok.v + r0 + i, n);
      load_four(f.dy, dy ? dy + r0 + i : nullptr, n);
      fn(f, i, n);
      if (n < 4) {
        std::copy(ps, ps + n * dk, o + i * dk);
        if (e) {
          std::copy(pe, pe + n * dk, e + i * dk);
        }
      }
    }
  }
};

// The dot products of a row block's rows with the token's gated k (into u) and, where w is not
// null, q (into w): a walk's first token's, which step_rows then carries from token to token.
void first_dots(const Token& tok, const RowBlock& rb, float* u, float* w) {
  rb.each_four(tok, nullptr, [&](Four& f, int64_t i, int64_t n) {
    dots_four(f.s, tok.gk.data(), w ? tok.gq.data() : nullptr, rb.dk, f.u, f.w);
    store_four(u + i, f.u, n);
    if (w) {
      store_four(w + i, f.w, n);
    }
  });
}

// The token's step over a row block (updated in place unless masked): u and w (the block's rows)
// hold the rows' dot products with its gated k and q, replaced by next's where next is not null;
// y (the head's output row) gets the rows' outputs when not null (w is then read, else unused).
template <bool DELTA>
void step_rows(const Token& tok, const Token* next, const RowBlock& rb, float* y, float* u,
               float* w) {
  rb.each_four(tok, nullptr, [&](Four& f, int64_t i, int64_t n) {
    load_four(f.u, u + i, n);
    load_four(f.w, y ? w + i : nullptr, n);
    float out[4];
    if (y) {
      tok.keep ? step_four<true, true, DELTA>(tok, next, f, out, rb.dk)
               : step_four<false, true, DELTA>(tok, next, f, out, rb.dk);
      store_four(y + rb.r0 + i, out, n);
    } else {
      tok.keep ? step_four<true, false, DELTA>(tok, next, f, out, rb.dk)
               : step_four<false, false, DELTA>(tok, next, f, out, rb.dk);
    }
    if (next) {
      store_four(u + i, f.u, n);
      if (y) {
        store_four(w + i, f.w, n);
      }
    }
  });
}

// The token's backward over a row block: rb.s the state entering the token (read only), rb.e
// the cotangent of the state after it (replaced by the one before it), dy the head's output
// cotangent row, u the block's rows' s . (g * k) (the recompute's); gsum (Dk) collects
// sum_i dA_i * S_i per channel.
template <bool DELTA>
void step_rows_grad(const Token& tok, const RowBlock& rb, const float* dy, const float* u,
                    const TokenGrads& out, float* gsum) {
  float dbeta = 0.0f;
  rb.each_four(tok, dy, [&](Four& f, int64_t i, int64_t n) {
    float dv[4];
    load_four(f.u, u + i, n);
    dbeta += tok.keep ? grad_four<true, DELTA>(tok, f, dv, out, gsum, rb.dk)
                      : grad_four<false, DELTA>(tok, f, dv, out, gsum, rb.dk);
    store_four(out.dv + rb.r0 + i, dv, n);
  });
  *out.dbeta += dbeta;
}

// The pointers of one (batch row, head)'s token t in the gradient outputs.
struct GradOutputs {
  float *dq, *dk, *dv, *dlg, *dbeta, *ds0;

  TokenGrads at(const RuleDims& d, int64_t b, int64_t h, int64_t t) const {
    const int64_t bth = (b * d.t + t) * d.hv + h;
    return {dq + bth * d.dk, dk + bth * d.dk, dv + bth * d.dv,
            dlg + bth * (d.vec ? d.dk : 1), dbeta + bth};
  }
};

// The forward of one (batch row, head): its rows a block at a time over all tokens; kept (B,
// Hv, N, Dv, Dk) gets the state entering every span of `span` tokens.
template <bool DELTA>
void forward_head(const RuleDims& d, const RuleInputs& a, int64_t b, int64_t h, float* y,
                  float* s_out, float* kept, int64_t span) {
  const int64_t spans = (d.t + span - 1) / span;
  Token tok(d.dk, d.dv), next(d.dk, d.dv);
  std::vector<float> pad(8 * d.dk), u(kRowBlock), w(kRowBlock);
  const int64_t state = (b * d.hv + h) * d.dv * d.dk;
  std::copy(a.s0 + state, a.s0 + state + d.dv * d.dk, s_out + state);
  for (int64_t r0 = 0; r0 < d.dv; r0 += kRowBlock) {
    float* s = s_out + state + r0 * d.dk;
    const RowBlock rb{s, s, nullptr, r0, std::min(kRowBlock, d.dv - r0), d.dk, pad.data()};
    tok.rows(r0, rb.rows);
    next.rows(r0, rb.rows);
    tok.load(d, a, b, h, 0);
    first_dots(tok, rb, u.data(), w.data());
    for (int64_t t = 0; t < d.t; ++t) {
      if (t % span == 0) {
        float* to = kept + (((b * d.hv + h) * spans + t / span) * d.dv + r0) * d.dk;
        std::copy(s, s + rb.rows * d.dk, to);
      }
      const bool more = t + 1 < d.t;
      if (more) {
        next.load(d, a, b, h, t + 1);
        if (t + 2 < d.t) {
          Token::prefetch(d, a, b, h, t + 2);
        }
      }
      step_rows<DELTA>(tok, more ? &next : nullptr, rb, y + value_row(d, b, h, t),
                u.data(), w.data());
      if (more) {
        std::swap(tok, next);
      }
    }
  }
}

// Adds the token's gate sums (sum_i dA_i * S_i per channel) into the log gate's gradient:
// d log g = dg * g, a scalar gate's dg the channels' total.
void add_gate_grad(const Token& tok, const float* gsum, float* dlg, bool vec, int64_t dk) {
  if (vec) {
    for (int64_t j = 0; j < dk; ++j) {
      dlg[j] += gsum[j] * tok.g[j];
    }
    return;
  }
  float total = 0.0f; // in lanes: one chain of Dk dependent adds cost ~Dk x 4 cycles a token
#pragma omp simd reduction(+ : total)
  for (int64_t j = 0; j < dk; ++j) {
    total += gsum[j];
  }
  *dlg += total * tok.g[0];
}

// The backward of one (batch row, head): kept the forward's states a span apart (B, Hv, N, Dv,
// Dk), ds_in its final state's cotangent (B, Hv, Dv, Dk), dy the outputs' (B, T, Hv, Dv).
template <bool DELTA>
void backward_head(const RuleDims& d, const RuleInputs& a, const float* kept, const float* dy,
                   const float* ds_in, const GradOutputs& o, int64_t b, int64_t h, int64_t span) {
  const int64_t state = (b * d.hv + h) * d.dv * d.dk, lg_width = d.vec ? d.dk : 1;
  for (int64_t t = 0; t < d.t; ++t) { // the head's rows of the summed-into outputs
    const TokenGrads g = o.at(d, b, h, t);
    std::fill(g.dq, g.dq + d.dk, 0.0f);
    std::fill(g.dk, g.dk + d.dk, 0.0f);
    std::fill(g.dlg, g.dlg + lg_width, 0.0f);
    *g.dbeta = 0.0f;
  }
  Token tok(d.dk, d.dv), next(d.dk, d.dv);
  const int64_t spans = (d.t + span - 1) / span, width = std::min(span, d.t);
  // one span's states, and each row's u, s . (g * k), token by token (the recompute carries it
  // from one token to the next; the token's backward reads it)
  std::vector<float> span_states(width * kGradRowBlock * d.dk), ds;
  std::vector<float> us(width * kGradRowBlock), u(kGradRowBlock), gsum(d.dk), pad(8 * d.dk),
      dy_row(d.dv);
  for (int64_t r0 = 0; r0 < d.dv; r0 += kGradRowBlock) {
    const int64_t rows = std::min(kGradRowBlock, d.dv - r0), size = rows * d.dk;
    auto block = [&](float* s, float* o, float* e) {
      return RowBlock{s, o, e, r0, rows, d.dk, pad.data()};
    };
    tok.rows(r0, rows);
    next.rows(r0, rows);
    ds.assign(ds_in + state + r0 * d.dk, ds_in + state + r0 * d.dk + size);
    for (int64_t n = spans - 1; n >= 0; --n) {
      const int64_t t0 = n * span, t1 = std::min(d.t, t0 + span);
      const float* start = kept + (((b * d.hv + h) * spans + n) * d.dv + r0) * d.dk;
      std::copy(start, start + size, span_states.begin());
      tok.load(d, a, b, h, t0);
      first_dots(tok, block(span_states.data(), span_states.data(), nullptr), u.data(), nullptr);
      for (int64_t t = t0; t < t1; ++t) { // span_states[t - t0]: the state entering t
        std::copy(u.begin(), u.begin() + rows, us.begin() + (t - t0) * rows);
        if (t + 1 == t1) {
          break; // the state after the span's last token is not read
        }
        float* next_state = span_states.data() + (t - t0 + 1) * size;
        next.load(d, a, b, h, t + 1);
        if (t + 2 < t1) {
          Token::prefetch(d, a, b, h, t + 2);
        }
        step_rows<DELTA>(tok, &next, block(next_state - size, next_state, nullptr), nullptr,
                         u.data(), nullptr);
        std::swap(tok, next);
      }
      for (int64_t t = t1 - 1; t >= t0; --t) {
        tok.load(d, a, b, h, t);
        if (t > 0) {
          Token::prefetch(d, a, b, h, t - 1);
          prefetch_row(dy + value_row(d, b, h, t - 1), d.dv);
        }
        const TokenGrads g = o.at(d, b, h, t);
        std::fill(gsum.begin(), gsum.end(), 0.0f);
        float* entering = span_states.data() + (t - t0) * size;
        const float* dy_t = dy + value_row(d, b, h, t);
        std::copy(dy_t + r0, dy_t + r0 + rows, dy_row.begin() + r0); // as Token copies v's
        step_rows_grad<DELTA>(tok, block(entering, entering, ds.data()), dy_row.data(),
                       us.data() + (t - t0) * rows, g, gsum.data());
        add_gate_grad(tok, gsum.data(), g.dlg, d.vec, d.dk);
      }
    }
    std::copy(ds.begin(), ds.end(), o.ds0 + state + r0 * d.dk);
  }
}

void check_rule_inputs(const std::vector<mx::array>& in) {
  for (const auto& a : in) {
    check_cpu_float32(a, "gated_delta");
  }
  const auto &q = in[0], &k = in[1], &v = in[2], &lg = in[3], &beta = in[4], &s0 = in[5];
  const bool shaped =
      q.ndim() == 4 && k.shape() == q.shape() && v.ndim() == 4 && v.shape(0) == q.shape(0) &&
      v.shape(1) == q.shape(1) && v.shape(2) % q.shape(2) == 0 &&
      beta.shape() == mx::Shape{v.shape(0), v.shape(1), v.shape(2)} &&
      (lg.shape() == beta.shape() ||
       lg.shape() == mx::Shape{v.shape(0), v.shape(1), v.shape(2), q.shape(3)}) &&
      s0.shape() == mx::Shape{v.shape(0), v.shape(2), v.shape(3), q.shape(3)} &&
      (in.size() == 6 || in[6].shape() == mx::Shape{q.shape(0), q.shape(1)});
  if (!shaped) {
    throw std::invalid_argument(
        "gated_delta: expected q, k (B, T, Hk, Dk), v (B, T, Hv, Dv) with Hk dividing Hv, "
        "log_g (B, T, Hv) or (B, T, Hv, Dk), beta (B, T, Hv), state (B, Hv, Dv, Dk), "
        "keep (B, T)");
  }
}

#undef MLXLAB_ROWS4

} // namespace

std::vector<mx::array> gated_delta(const mx::array& q, const mx::array& k, const mx::array& v,
                                   const mx::array& log_g, const mx::array& beta,
                                   const mx::array& state, const std::optional<mx::array>& keep,
                                   int span, bool delta) {
  auto s = mx::to_stream(mx::Device::cpu);
  std::vector<mx::array> inputs;
  for (const auto* a : {&q, &k, &v, &log_g, &beta, &state}) {
    inputs.push_back(mx::contiguous(*a, false, s));
  }
  if (keep) {
    inputs.push_back(mx::contiguous(*keep, false, s));
  }
  check_rule_inputs(inputs);
  const int every = span > 0 ? span : kSpan, spans = (q.shape(1) + every - 1) / every;
  return mx::array::make_arrays(
      {v.shape(), state.shape(), {v.shape(0), v.shape(2), spans, v.shape(3), q.shape(3)}},
      {mx::float32, mx::float32, mx::float32}, std::make_shared<GatedDelta>(s, every, delta),
      std::move(inputs));
}

void GatedDelta::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& encoder = mx::cpu::get_command_encoder(stream());
  set_arrays(encoder, inputs, outputs);
  const RuleDims d = rule_dims(inputs, delta_);
  encoder.dispatch([d, a = rule_inputs(inputs, d), y = outputs[0].data<float>(),
                    s1 = outputs[1].data<float>(), kept = outputs[2].data<float>(),
                    span = span_]() {
    parallel_for(d.b * d.hv, d.t * d.dv * d.dk, [&](int64_t begin, int64_t end) {
      for (int64_t job = begin; job < end; ++job) {
        if (d.delta) {
          forward_head<true>(d, a, job / d.hv, job % d.hv, y, s1, kept, span);
        } else {
          forward_head<false>(d, a, job / d.hv, job % d.hv, y, s1, kept, span);
        }
      }
    });
  });
}

std::vector<mx::array> gated_delta_grad(const std::vector<mx::array>& primals,
                                        const mx::array& kept, const mx::array& dy,
                                        const mx::array& ds, int span, bool delta) {
  auto s = mx::to_stream(mx::Device::cpu);
  std::vector<mx::array> inputs;
  for (const auto& a : primals) {
    inputs.push_back(mx::contiguous(a, false, s));
  }
  check_rule_inputs(inputs);
  const int every = span > 0 ? span : kSpan;
  const auto &q = inputs[0], &v = inputs[2];
  const mx::Shape kept_shape{v.shape(0), v.shape(2), (q.shape(1) + every - 1) / every,
                             v.shape(3), q.shape(3)};
  if (kept.shape() != kept_shape || dy.shape() != v.shape() ||
      ds.shape() != inputs[5].shape()) {
    throw std::invalid_argument(
        "gated_delta_grad: expected kept (B, Hv, ceil(T / span), Dv, Dk) as gated_delta "
        "returned it, dy as y and ds as the state");
  }
  const mx::Shape per_value_head{q.shape(0), q.shape(1), v.shape(2), q.shape(3)};
  const mx::Shape q_shape = q.shape();
  const int group = v.shape(2) / q.shape(2);
  std::vector<mx::Shape> shapes{per_value_head, per_value_head, v.shape(), inputs[3].shape(),
                                inputs[4].shape(), inputs[5].shape()};
  inputs.push_back(mx::contiguous(kept, false, s));
  inputs.push_back(mx::contiguous(dy, false, s));
  inputs.push_back(mx::contiguous(ds, false, s));
  auto grads = mx::array::make_arrays(std::move(shapes), std::vector<mx::Dtype>(6, mx::float32),
                                      std::make_shared<GatedDeltaGrad>(s, every, delta),
                                      std::move(inputs));
  for (int i : {0, 1}) { // the value heads reading one key head: their gradients summed
    if (group > 1) {
      grads[i] = mx::sum(
          mx::reshape(grads[i], {q_shape[0], q_shape[1], q_shape[2], group, q_shape[3]}, s), 3,
          false, s);
    }
  }
  return grads;
}

std::vector<mx::array> GatedDelta::vjp(const std::vector<mx::array>& primals,
                                       const std::vector<mx::array>& cotangents,
                                       const std::vector<int>& argnums,
                                       const std::vector<mx::array>& outputs) {
  auto grads = gated_delta_grad(primals, outputs[2], cotangents[0], cotangents[1], span_, delta_);
  std::vector<mx::array> out;
  for (int arg : argnums) {
    out.push_back(arg < 6 ? grads[arg] : mx::zeros_like(primals[arg], stream()));
  }
  return out;
}

void GatedDeltaGrad::eval_cpu(const std::vector<mx::array>& inputs,
                              std::vector<mx::array>& outputs) {
  auto& encoder = mx::cpu::get_command_encoder(stream());
  set_arrays(encoder, inputs, outputs);
  const size_t n = inputs.size();
  const std::vector<mx::array> primals(inputs.begin(), inputs.end() - 3);
  const RuleDims d = rule_dims(primals, delta_);
  GradOutputs o{outputs[0].data<float>(), outputs[1].data<float>(), outputs[2].data<float>(),
                outputs[3].data<float>(), outputs[4].data<float>(), outputs[5].data<float>()};
  encoder.dispatch([d, a = rule_inputs(primals, d), kept = inputs[n - 3].data<float>(),
                    dy = inputs[n - 2].data<float>(), ds = inputs[n - 1].data<float>(), o,
                    span = span_]() {
    parallel_for(d.b * d.hv, 4 * d.t * d.dv * d.dk, [&](int64_t begin, int64_t end) {
      for (int64_t job = begin; job < end; ++job) {
        if (d.delta) {
          backward_head<true>(d, a, kept, dy, ds, o, job / d.hv, job % d.hv, span);
        } else {
          backward_head<false>(d, a, kept, dy, ds, o, job / d.hv, job % d.hv, span);
        }
      }
    });
  });
}

} // namespace mlxlab
