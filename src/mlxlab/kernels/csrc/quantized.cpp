// Products with MLX's affine quantized weights through the float GEMM (issue 54).
// MLX 0.32's CPU quantized matmul runs ~3 GFLOP/s on x86 against ~240 for the float GEMM on
// OpenBLAS (a 1536x4096 layer, 128 rows), and its own dequantize ~10 ms for that layer. Training
// on a 4- or 8-bit base (QLoRA) therefore dequantizes the weight here (vectorized, on the pool:
// ~1 ms for that layer) and runs the float GEMM on it: QuantizedMatmul does both inside one task,
// a block of the weight's rows at a time into a scratch buffer taken from MLX's allocator (counted
// in MLX's memory figures) and given back before the task ends. A separate dequantize node would
// not do: MLX's CPU backend allocates each node's output when it queues the node, ahead of the
// worker, so a layer stack's float weights were allocated together (measured: the whole float
// size). The BLAS is the one MLX's own matmul calls (set_sgemm, from libmlx's symbol table).
#include "common.h"
#include "kernels.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"

namespace mlxlab {

using namespace detail;

namespace {

// One row of a weight packed as mx.quantize packs it (affine mode, BITS in {2, 4, 8}): each
// uint32 word holds 32 / BITS values, the lowest bits first; value q of group g becomes
// scale[g] * q + bias[g], as MLX's dequantize computes it (a rounded multiply, a rounded add).
template <int BITS>
inline void dequantize_row(const uint32_t* __restrict w, const float* __restrict scales,
                           const float* __restrict biases, float* __restrict out, int64_t cols,
                           int64_t group) {
  constexpr int kPer = 32 / BITS;
  constexpr uint32_t kMask = (1u << BITS) - 1u;
  const int64_t words = group / kPer;
  for (int64_t g = 0; g < cols / group; ++g) {
    const float s = scales[g], b = biases[g];
    const uint32_t* wg = w + g * words;
    float* og = out + g * group;
    for (int64_t i = 0; i < words; ++i) {
      const uint32_t word = wg[i];
      // Unrolled over the word's values: one vector of shifts, masks and converts per word.
#pragma GCC unroll 16
      for (int j = 0; j < kPer; ++j) {
        og[i * kPer + j] = static_cast<float>((word >> (j * BITS)) & kMask) * s + b;
      }
    }
  }
}

template <int BITS>
void dequantize_rows(const uint32_t* w, const float* scales, const float* biases, float* out,
                     int64_t rows, int64_t cols, int64_t group) {
  const int64_t words = cols * BITS / 32, groups = cols / group;
  parallel_for(rows, cols, [=](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      dequantize_row<BITS>(w + r * words, scales + r * groups, biases + r * groups,
                           out + r * cols, cols, group);
    }
  });
}

// cblas_sgemm's signature (row-major 101, no transpose 111, transpose 112; 32-bit ints as
// scipy-openblas32 and MLX's bundled BLAS take them).
using Sgemm = void (*)(int, int, int, int, int, int, float, const float*, int, const float*, int,
                       float, float*, int);
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
std::atomic<Sgemm> g_sgemm{nullptr};

// Rows of the weight dequantized per GEMM call: a block of at most kScratchBytes, a multiple of
// 16 rows (64 rows of a 4096-wide layer). Small, so that a step's peak memory is the packed
// model's plus ~1 MB (a 16 MB block measured 13 MB above mlx_lm.lora's peak on a 302M model,
// docs/benchmarks.md), and the block stays in cache between its dequantize and its GEMM.
constexpr int64_t kScratchBytes = 1 << 20;

int64_t block_rows(int64_t rows, int64_t cols) {
  int64_t block = std::max<int64_t>(16, kScratchBytes / (cols * 4) / 16 * 16);
  return std::min(rows, block);
}

} // namespace

void set_sgemm(uintptr_t address) {
  g_sgemm = reinterpret_cast<Sgemm>(address);
}

bool has_sgemm() {
  return g_sgemm.load() != nullptr;
}

static std::vector<mx::array> packed_inputs(const mx::array& w, const mx::array& scales,
                                     const mx::array& biases, int group_size, int bits,
                                     mx::Stream s) {
  if (bits != 2 && bits != 4 && bits != 8) {
    throw std::invalid_argument("dequantize: bits must be 2, 4 or 8, got " + std::to_string(bits));
  }
  if (w.dtype() != mx::uint32 || w.ndim() < 1) {
    throw std::invalid_argument("dequantize: the packed weight must be uint32");
  }
  check_cpu_float32(scales, "dequantize");
  check_cpu_float32(biases, "dequantize");
  const int64_t cols = int64_t(w.shape().back()) * 32 / bits;
  if (group_size <= 0 || group_size % (32 / bits) != 0 || cols % group_size != 0 ||
      scales.shape() != biases.shape() || scales.size() * group_size != w.size() * 32 / bits) {
    throw std::invalid_argument("dequantize: weight, scales and biases do not match group_size");
  }
  return {mx::contiguous(w, false, s), mx::contiguous(scales, false, s),
          mx::contiguous(biases, false, s)};
}

mx::array dequantize(const mx::array& w, const mx::array& scales, const mx::array& biases,
                     int group_size, int bits) {
  auto s = mx::to_stream(mx::Device::cpu);
  auto inputs = packed_inputs(w, scales, biases, group_size, bits, s);
  auto shape = w.shape();
  shape.back() = static_cast<int>(int64_t(shape.back()) * 32 / bits);
  return mx::array(shape, mx::float32, std::make_shared<Dequantize>(s, group_size, bits), inputs);
}

void Dequantize::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& encoder = mx::cpu::get_command_encoder(stream());
  set_arrays(encoder, inputs, outputs);
  const int64_t cols = outputs[0].shape().back(), rows = outputs[0].size() / cols;
  auto run = [&](auto kernel) {
    encoder.dispatch([kernel, w = inputs[0].data<uint32_t>(), sc = inputs[1].data<float>(),
                      bi = inputs[2].data<float>(), out = outputs[0].data<float>(), rows, cols,
                      group = int64_t(group_size_)]() { kernel(w, sc, bi, out, rows, cols, group); });
  };
  switch (bits_) {
    case 2:
      run(&dequantize_rows<2>);
      break;
    case 4:
      run(&dequantize_rows<4>);
      break;
    default:
      run(&dequantize_rows<8>);
  }
}

mx::array quantized_matmul(const mx::array& x, const mx::array& w, const mx::array& scales,
                           const mx::array& biases, int group_size, int bits, bool transpose) {
  if (!has_sgemm()) {
    throw std::runtime_error("quantized_matmul: no sgemm set (set_sgemm)");
  }
  check_cpu_float32(x, "quantized_matmul");
  if (x.ndim() != 2 || w.ndim() != 2) {
    throw std::invalid_argument("quantized_matmul: x and the packed weight must be 2-D");
  }
  const int rows = w.shape(0), cols = int(int64_t(w.shape(1)) * 32 / bits);
  if (x.shape(1) != (transpose ? cols : rows)) {
    throw std::invalid_argument("quantized_matmul: x's last axis does not match the weight");
  }
  auto s = mx::to_stream(mx::Device::cpu);
  auto packed = packed_inputs(w, scales, biases, group_size, bits, s);
  std::vector<mx::array> inputs{mx::contiguous(x, false, s)};
  inputs.insert(inputs.end(), packed.begin(), packed.end());
  return mx::array({x.shape(0), transpose ? rows : cols}, mx::float32,
                   std::make_shared<QuantizedMatmul>(s, group_size, bits, transpose), inputs);
}

void QuantizedMatmul::eval_cpu(const std::vector<mx::array>& inputs,
                               std::vector<mx::array>& outputs) {
  auto& encoder = mx::cpu::get_command_encoder(stream());
  set_arrays(encoder, inputs, outputs);
  const int64_t rows = inputs[1].shape(0), cols = inputs[1].shape(1) * 32 / bits_;
  const int64_t m = inputs[0].shape(0), groups = cols / group_size_, words = cols * bits_ / 32;
  auto dequant = bits_ == 2 ? &dequantize_rows<2> : bits_ == 4 ? &dequantize_rows<4>
                                                                : &dequantize_rows<8>;
  encoder.dispatch([=, x = inputs[0].data<float>(), w = inputs[1].data<uint32_t>(),
                    sc = inputs[2].data<float>(), bi = inputs[3].data<float>(),
                    out = outputs[0].data<float>(), group = int64_t(group_size_),
                    transpose = transpose_, sgemm = g_sgemm.load()]() {
    const int64_t block = block_rows(rows, cols);
    auto scratch = mx::allocator::malloc(block * cols * sizeof(float));
    float* tile = static_cast<float*>(scratch.buffer().raw_ptr());
    for (int64_t r0 = 0; r0 < rows; r0 += block) {
      const int64_t nb = std::min(block, rows - r0);
      dequant(w + r0 * words, sc + r0 * groups, bi + r0 * groups, tile, nb, cols, group);
      if (transpose) {
        // out[:, r0:r0+nb] = x (m, cols) @ tile (nb, cols)^T
        sgemm(kRowMajor, kNoTrans, kTrans, int(m), int(nb), int(cols), 1.0f, x, int(cols), tile,
              int(cols), 0.0f, out + r0, int(rows));
      } else {
        // out (m, cols) += x[:, r0:r0+nb] @ tile (nb, cols)
        sgemm(kRowMajor, kNoTrans, kNoTrans, int(m), int(cols), int(nb), 1.0f, x + r0,
              int(rows), tile, int(cols), r0 == 0 ? 0.0f : 1.0f, out, int(cols));
      }
    }
  });
}

std::vector<mx::array> QuantizedMatmul::vjp(const std::vector<mx::array>& primals,
                                            const std::vector<mx::array>& cotangents,
                                            const std::vector<int>& argnums,
                                            const std::vector<mx::array>&) {
  // Only x has a gradient: the packed weight, its scales and biases are frozen (QLoRA), and get
  // zeros, as a constant would.
  std::vector<mx::array> grads;
  for (int arg : argnums) {
    if (arg == 0) {
      grads.push_back(mx::array(
          primals[0].shape(), mx::float32,
          std::make_shared<QuantizedMatmul>(stream(), group_size_, bits_, !transpose_),
          {mx::contiguous(cotangents[0], false, stream()), primals[1], primals[2], primals[3]}));
    } else {
      grads.push_back(mx::zeros_like(primals[arg], stream()));
    }
  }
  return grads;
}

// The packed weight, scales and biases checked against each other and made contiguous.
} // namespace mlxlab
