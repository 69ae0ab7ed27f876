// MLX's large float32 products split by rows over the kernels' thread pool, each part a
// single-threaded call of the BLAS (runtime/compute/small_gemm.py hands them here).
//
// Why: MKL's OpenMP workers sleep between products (mkl.py: a passive wait, so that a busy
// neighbour keeps its cores), and on a VM waking one costs ~100 us: a 1024 x 128 x 128 product
// of a small model took 243 us on two such threads, 116 us on two that stay awake. The pool's
// worker stays awake for a short while after each job (kernels.cpp), so a step's products and
// fused ops keep one warm worker between them instead of two sleeping ones.
#include "common.h"

namespace {

using Sgemm = void (*)(int, int, int, int, int, int, float, const float*, int, const float*, int,
                       float, float*, int);
using SetLocal = int (*)(int);

constexpr int kNoTrans = 111;
constexpr int kMinRows = 32;  // a part's fewest rows (or columns): below, one call does it all

}  // namespace

// Row-major C (m x n) = alpha op(A) op(B) + beta C, split along m (or n when m is short).
extern "C" void mlxlab_split_sgemm(void* gemm_fn, void* local_fn, int ta, int tb, int m, int n,
                                   int k, int threads, float alpha, const float* a, int lda,
                                   const float* b, int ldb, float beta, float* c, int ldc) {
  auto gemm = reinterpret_cast<Sgemm>(gemm_fn);
  auto set_local = reinterpret_cast<SetLocal>(local_fn);
  bool by_rows = m >= n || n < 2 * kMinRows;
  int extent = by_rows ? m : n;
  // At most the BLAS's threads and the pool's (plan_threads), a part at least kMinRows long.
  int parts = std::min<int64_t>(threads, mlxlab::detail::plan_threads(extent / kMinRows,
                                                                      int64_t{1} << 15));
  if (parts <= 1) {
    int previous = set_local(1);
    gemm(101, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    set_local(previous);
    return;
  }
  int block = (extent + parts - 1) / parts;
  mlxlab::detail::parallel_parts(parts, [&](int t) {
    int lo = t * block, hi = std::min(extent, lo + block);
    if (lo >= hi) {
      return;
    }
    int previous = set_local(1);
    if (by_rows) {
      const float* sa = ta == kNoTrans ? a + int64_t(lo) * lda : a + lo;
      gemm(101, ta, tb, hi - lo, n, k, alpha, sa, lda, b, ldb, beta, c + int64_t(lo) * ldc, ldc);
    } else {
      const float* sb = tb == kNoTrans ? b + lo : b + int64_t(lo) * ldb;
      gemm(101, ta, tb, m, hi - lo, k, alpha, a, lda, sb, ldb, beta, c + lo, ldc);
    }
    set_local(previous);
  });
}
