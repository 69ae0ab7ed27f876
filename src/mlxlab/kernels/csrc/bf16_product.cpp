// Products with bfloat16 inputs and float32 accumulation on CPUs with bf16 units (AMX,
// AVX512-BF16), through MKL's cblas_gemm_bf16bf16f32 (set_gemm_bf16, from
// runtime/compute/bf16.py). MLX 0.32's CPU matmul multiplies bfloat16 in its own scalar loop
// (gemms/simd_bf16.cpp: ~4 GFLOP/s) and calls no BLAS symbol for it, so there is no slot of
// libmlx to rebind: this primitive is the product trainer.precision=bf16 runs on such a CPU.
// Its inputs and output are float32 (the master weights and activations stay float32, so the
// fused float32 kernels around it keep running); both operands are rounded to bfloat16 (to
// nearest, ties to even: what MLX's astype(bfloat16) gives) into scratch buffers, and MKL sums
// their products in float32. The VJP is the same product of the cotangent with the other
// operand: forward and backward products both take bf16 inputs, as PyTorch's CPU autocast does.
#include "common.h"
#include "kernels.h"

#include "mlx/allocator.h"

#include <atomic>
#include <cstring>
#include <stdexcept>

namespace mlxlab {

using namespace detail;

namespace {

// cblas_gemm_bf16bf16f32's signature (MKL's LP64 interface: 32-bit ints; MKL_BF16 is the
// bfloat16's 16 bits; row-major 101, no transpose 111, transpose 112).
using GemmBf16 = void (*)(int, int, int, int, int, int, float, const uint16_t*, int,
                          const uint16_t*, int, float, float*, int);
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
std::atomic<GemmBf16> g_gemm{nullptr};
// MKL's mkl_set_num_threads_local (this thread's count; returns the one it replaces) and the
// M*N*K below which a product runs on the calling thread alone: MKL's OpenMP threads sleep
// between products and waking them costs more than a small product (runtime/compute/small_gemm.py
// says the same of MLX's sgemm; with a busy core a 64^3 bf16 product took ~8 ms on two threads
// against ~30 us on one).
using LocalThreads = int (*)(int);
std::atomic<LocalThreads> g_local{nullptr};
std::atomic<int64_t> g_below{0};

// float32 -> bfloat16 bits, to nearest with ties to even; a NaN stays a (quiet) NaN.
inline uint16_t to_bf16(float x) {
  const uint32_t u = std::bit_cast<uint32_t>(x);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return (u & 0x7FFFFFFFu) > 0x7F800000u ? uint16_t((u >> 16) | 0x40u) : uint16_t(rounded);
}

void round_into(const float* in, uint16_t* out, int64_t n) {
  parallel_for(n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      out[i] = to_bf16(in[i]);
    }
  });
}

} // namespace

void set_gemm_bf16(uintptr_t address, uintptr_t local_threads, int64_t below) {
  g_gemm = reinterpret_cast<GemmBf16>(address);
  g_local = reinterpret_cast<LocalThreads>(local_threads);
  g_below = below;
}

bool has_gemm_bf16() {
  return g_gemm.load() != nullptr;
}

mx::array bf16_matmul(const mx::array& a, const mx::array& b, bool ta, bool tb) {
  if (!has_gemm_bf16()) {
    throw std::runtime_error("bf16_matmul: no bf16 gemm set (set_gemm_bf16)");
  }
  check_cpu_float32(a, "bf16_matmul");
  check_cpu_float32(b, "bf16_matmul");
  if (a.ndim() != 2 || b.ndim() != 2) {
    throw std::invalid_argument("bf16_matmul: a and b must be matrices (2-D)");
  }
  const int m = ta ? a.shape(1) : a.shape(0), k = ta ? a.shape(0) : a.shape(1);
  const int kb = tb ? b.shape(1) : b.shape(0), n = tb ? b.shape(0) : b.shape(1);
  if (k != kb) {
    throw std::invalid_argument("bf16_matmul: the inner dimensions do not match");
  }
  auto s = mx::to_stream(mx::Device::cpu);
  return mx::array({m, n}, mx::float32, std::make_shared<Bf16Matmul>(s, ta, tb),
                   {mx::contiguous(a, false, s), mx::contiguous(b, false, s)});
}

void Bf16Matmul::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& encoder = mx::cpu::get_command_encoder(stream());
  set_arrays(encoder, inputs, outputs);
  const auto& a = inputs[0];
  const auto& b = inputs[1];
  const int m = outputs[0].shape(0), n = outputs[0].shape(1);
  const int k = ta_ ? a.shape(0) : a.shape(1);
  encoder.dispatch([=, pa = a.data<float>(), pb = b.data<float>(), size_a = int64_t(a.size()),
                    size_b = int64_t(b.size()), out = outputs[0].data<float>(), ta = ta_,
                    tb = tb_, gemm = g_gemm.load(), local = g_local.load(),
                    alone = int64_t(m) * n * k < g_below.load()]() {
    if (int64_t(m) * n == 0) {
      return;
    }
    if (k == 0) {  // an empty sum: MKL is not asked (some BLAS leave C untouched at k = 0)
      std::memset(out, 0, sizeof(float) * size_t(m) * n);
      return;
    }
    // The rounded operands in one scratch buffer from MLX's allocator (reused from its cache,
    // counted in MLX's memory figures, given back when the task ends), b's at a 64-byte line.
    const int64_t b_at = (size_a + 31) / 32 * 32;
    auto scratch = mx::allocator::malloc((b_at + size_b) * sizeof(uint16_t));
    uint16_t* ra = static_cast<uint16_t*>(scratch.buffer().raw_ptr());
    uint16_t* rb = ra + b_at;
    round_into(pa, ra, size_a);
    round_into(pb, rb, size_b);
    // row-major op(A) (m, k): A is (m, k) with ld k, or (k, m) with ld m when transposed
    const int previous = alone && local ? local(1) : 0;
    gemm(kRowMajor, ta ? kTrans : kNoTrans, tb ? kTrans : kNoTrans, m, n, k, 1.0f, ra,
         ta ? m : k, rb, tb ? k : n, 0.0f, out, n);
    if (alone && local) {
      local(previous);  // 0: back to MKL's process-wide count
    }
  });
}

std::vector<mx::array> Bf16Matmul::vjp(const std::vector<mx::array>& primals,
                                       const std::vector<mx::array>& cotangents,
                                       const std::vector<int>& argnums,
                                       const std::vector<mx::array>&) {
  // C = op(A) op(B), G its cotangent: dop(A) = G op(B)^T, dop(B) = op(A)^T G. An operand stored
  // transposed takes the transposed product, computed as such (no transposed copy):
  // dA = op(B) G^T when ta, dB = G^T op(A) when tb. Each is a bf16 product again (G rounded).
  const auto& a = primals[0];
  const auto& b = primals[1];
  const auto& g = cotangents[0];
  std::vector<mx::array> grads;
  for (int arg : argnums) {
    if (arg == 0) {
      grads.push_back(ta_ ? bf16_matmul(b, g, tb_, true) : bf16_matmul(g, b, false, !tb_));
    } else {
      grads.push_back(tb_ ? bf16_matmul(g, a, true, ta_) : bf16_matmul(a, g, !ta_, false));
    }
  }
  return grads;
}

} // namespace mlxlab
