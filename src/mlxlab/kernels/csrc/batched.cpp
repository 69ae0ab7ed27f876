// Batched products through one BLAS call: attention's (B*H) small products q k^T and p v.
// MLX 0.32's CPU matmul calls cblas_sgemm once per matrix of a batch, and OpenBLAS wakes its
// threads for each of them: a nano step's 64 products of (128 x 64) x (64 x 128) ran at 74-80
// GFLOP/s against PyTorch's 180-191 (docs/benchmarks.md, "Small decoders on an AMD Zen 5").
// OpenBLAS (>= 0.3.27) has cblas_sgemm_batch_strided, which hands whole matrices to its threads,
// each product on one thread with the same kernel a single call runs: the bits of MLX's loop at
// one BLAS thread (with more, OpenBLAS's AVX2 kernels split a single product and round otherwise).
// The function is the one in the library that serves MLX's own cblas_sgemm (set_sgemm_batch,
// from runtime/compute/blas.py); where that BLAS has none (MLX's bundled one), the Python side keeps
// MLX's matmul.
#include "common.h"
#include "kernels.h"

#include <atomic>
#include <stdexcept>

namespace mlxlab {

using namespace detail;

namespace {

using SgemmBatch = SgemmBatchFn; // common.h
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
std::atomic<SgemmBatch> g_batch{nullptr};

} // namespace

void set_sgemm_batch(uintptr_t address) {
  g_batch = reinterpret_cast<SgemmBatch>(address);
}

namespace detail {

SgemmBatchFn sgemm_batch_fn() {
  return g_batch.load();
}

} // namespace detail

bool has_sgemm_batch() {
  return g_batch.load() != nullptr;
}

mx::array batched_matmul(const mx::array& a, const mx::array& b, bool ta, bool tb) {
  if (!has_sgemm_batch()) {
    throw std::runtime_error("batched_matmul: no batched sgemm set (set_sgemm_batch)");
  }
  check_cpu_float32(a, "batched_matmul");
  check_cpu_float32(b, "batched_matmul");
  if (a.ndim() < 3 || a.ndim() != b.ndim()) {
    throw std::invalid_argument("batched_matmul: a and b must be (..., rows, cols) of one rank >= 3");
  }
  for (int i = 0; i < a.ndim() - 2; ++i) {
    if (a.shape(i) != b.shape(i)) {
      throw std::invalid_argument("batched_matmul: a and b must have the same batch axes");
    }
  }
  const int m = ta ? a.shape(-1) : a.shape(-2), k = ta ? a.shape(-2) : a.shape(-1);
  const int kb = tb ? b.shape(-1) : b.shape(-2), n = tb ? b.shape(-2) : b.shape(-1);
  if (k != kb) {
    throw std::invalid_argument("batched_matmul: the inner dimensions do not match");
  }
  auto s = mx::to_stream(mx::Device::cpu);
  auto shape = a.shape();
  shape[a.ndim() - 2] = m;
  shape[a.ndim() - 1] = n;
  return mx::array(shape, mx::float32, std::make_shared<BatchedMatmul>(s, ta, tb),
                   {a, b});
}

void BatchedMatmul::eval_cpu(const std::vector<mx::array>& given,
                             std::vector<mx::array>& outputs) {
  auto& encoder = mx::cpu::get_command_encoder(stream());
  const auto inputs = row_contiguous_all(given, encoder);
  set_arrays(encoder, inputs, outputs);
  const auto& a = inputs[0];
  const auto& b = inputs[1];
  const int nd = a.ndim();
  const int m = outputs[0].shape(nd - 2), n = outputs[0].shape(nd - 1);
  const int k = ta_ ? a.shape(nd - 2) : a.shape(nd - 1);
  const int batch = int(outputs[0].size() / (int64_t(m) * n));
  encoder.dispatch([=, pa = a.data<float>(), pb = b.data<float>(),
                    out = outputs[0].data<float>(), ta = ta_, tb = tb_,
                    gemm = g_batch.load()]() {
    // row-major op(A) (m, k): A is (m, k) with ld k, or (k, m) with ld m when transposed
    gemm(kRowMajor, ta ? kTrans : kNoTrans, tb ? kTrans : kNoTrans, m, n, k, 1.0f, pa,
         ta ? m : k, m * k, pb, tb ? k : n, k * n, 0.0f, out, n, m * n, batch);
  });
}

std::vector<mx::array> BatchedMatmul::vjp(const std::vector<mx::array>& primals,
                                          const std::vector<mx::array>& cotangents,
                                          const std::vector<int>& argnums,
                                          const std::vector<mx::array>&) {
  // C = op(A) op(B): the cotangents of op(A) and op(B) as MLX's matmul computes them,
  // G op(B)^T and op(A)^T G, transposes passed as flags (no copies of swapped axes); an operand
  // stored transposed gets its cotangent's transpose, as swapaxes' VJP gives it. (G^T op(A)
  // directly would be the same sum in another operand order: other bits in some BLAS kernels.)
  const auto& a = primals[0];
  const auto& b = primals[1];
  const auto& g = cotangents[0];
  const int nd = a.ndim();
  std::vector<mx::array> grads;
  for (int arg : argnums) {
    auto d = arg == 0 ? batched_matmul(g, b, false, !tb_) : batched_matmul(a, g, !ta_, false);
    grads.push_back((arg == 0 ? ta_ : tb_) ? mx::swapaxes(d, nd - 1, nd - 2, stream()) : d);
  }
  return grads;
}

} // namespace mlxlab
