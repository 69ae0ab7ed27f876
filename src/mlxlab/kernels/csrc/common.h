// What the kernel files share: the vectorizable exp, the thread pool's entry points, and the
// float32/allocation helpers. Definitions of the pool live in kernels.cpp (one pool a process).
#pragma once

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#include "mlx/array.h"
#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"

namespace mx = mlx::core;

namespace mlxlab::detail {

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

// How many threads a job of n indices of `cost` elements each gets: jobs under kMinWork
// elements stay on one thread (waking a worker costs ~10 us).
int64_t plan_threads(int64_t n, int64_t cost);

// Runs part(t) for t in [0, parts) on the pool (the calling thread included).
void parallel_parts(int64_t parts, const std::function<void(int)>& part);

// Runs fn(begin, end) over [0, n) split into plan_threads(n, cost) contiguous blocks.
template <typename F>
void parallel_for(int64_t n, int64_t cost, F&& fn) {
  int64_t threads = plan_threads(n, cost);
  if (threads <= 1) {
    fn(int64_t{0}, n);
    return;
  }
  int64_t block = (n + threads - 1) / threads;
  parallel_parts(threads, [&](int t) {
    int64_t begin = t * block, end = std::min(n, begin + block);
    if (begin < end) {
      fn(begin, end);
    }
  });
}


// cblas_sgemm_batch_strided's signature (row-major 101, no transpose 111, transpose 112; 32-bit
// ints as scipy-openblas32 takes them; the strides are elements between the batch's matrices),
// and the one set_sgemm_batch gave (batched.cpp; null where none is set).
using SgemmBatchFn = void (*)(int, int, int, int, int, int, float, const float*, int, int,
                              const float*, int, int, float, float*, int, int, int);
SgemmBatchFn sgemm_batch_fn();

inline void check_cpu_float32(const mx::array& a, const char* what) {
  if (a.dtype() != mx::float32) {
    throw std::invalid_argument(std::string(what) + ": mlxlab fused kernels take float32 only");
  }
}

// The thread's floating-point control state (x86 MXCSR, arm64 FPCR; 0 elsewhere), read and
// set by the kernels' pool to give its workers the caller's denormal mode (fp_mode.cpp).
uint64_t fp_state();
void set_fp_state(uint64_t state);

// `a` itself when row-contiguous, else a row-contiguous copy made on the encoder (kept alive until
// the kernel has run; libmlx does not export its own CPU copy). The ops take their inputs as they
// are and their eval_cpu calls this, rather than putting an mx::contiguous before them: a
// Contiguous node is a graph node each step even when it copies nothing (~3 us each on the
// CPU, and a small model's step has hundreds), and on an input that enters a primitive twice it
// would add that input's two gradient parts before MLX adds them to the rest of its gradient, in
// another order than MLX's own graph.
mx::array row_contiguous(const mx::array& a, mx::cpu::CommandEncoder& encoder);

// Each of `inputs` through row_contiguous.
inline std::vector<mx::array> row_contiguous_all(const std::vector<mx::array>& inputs,
                                                 mx::cpu::CommandEncoder& encoder) {
  std::vector<mx::array> out;
  out.reserve(inputs.size());
  for (auto& a : inputs) {
    out.push_back(row_contiguous(a, encoder));
  }
  return out;
}

inline void alloc(mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
}

// A primitive's eval_cpu: its inputs registered with the encoder, its outputs allocated and
// registered (the encoder keeps them alive until the dispatched work ran).
inline void set_arrays(mx::cpu::CommandEncoder& encoder, const std::vector<mx::array>& inputs,
                       std::vector<mx::array>& outputs) {
  for (auto& a : inputs) {
    encoder.set_input_array(a);
  }
  for (auto& a : outputs) {
    alloc(a);
    encoder.set_output_array(a);
  }
}

} // namespace mlxlab::detail
