// Products with MLX's affine quantized weights through the float GEMM.
// MLX 0.32's CPU quantized matmul runs ~3 GFLOP/s on x86 against ~240 for the float GEMM on
// OpenBLAS (a 1536x4096 layer, 128 rows), and its own dequantize ~10 ms for that layer. Training
// on a 4- or 8-bit base (QLoRA) therefore dequantizes the weight here (vectorized, on the pool:
// ~1 ms for that layer) and runs the float GEMM on it: QuantizedMatmul does both inside one task,
// a block of the weight's rows at a time into a scratch buffer taken from MLX's allocator (counted
// in MLX's memory figures) and given back before the task ends. A separate dequantize node would
// not do: MLX's CPU backend allocates each node's output when it queues the node, ahead of the
// worker, so a layer stack's float weights were allocated together (measured: the whole float
// size). The BLAS is the one MLX's own matmul calls (set_sgemm, from libmlx's symbol table).
// Scales and biases are read in the dtype the folder stores them (float32, bfloat16 or float16:
// `mlx_lm.convert -q` keeps the model's, bf16 for most checkpoints) and widened per group, exactly
// as a float32 cast would: casting them in the graph instead made float32 copies that the product
// held from the forward to its backward, 8 bytes per group of every layer at the step's peak
// (up to 38 MB of a 302M model at group 64; 4 MB of tests/test_quantized_cpu.py's stack).
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
// scale[g] * q + bias[g], as MLX's dequantize computes it (a rounded multiply, a rounded add),
// in float32 whatever the scales' type S (widened exactly).
template <int BITS, typename S>
inline void dequantize_row(const uint32_t* __restrict w, const S* __restrict scales,
                           const S* __restrict biases, float* __restrict out, int64_t cols,
                           int64_t group) {
  constexpr int kPer = 32 / BITS;
  constexpr uint32_t kMask = (1u << BITS) - 1u;
  const int64_t words = group / kPer;
  for (int64_t g = 0; g < cols / group; ++g) {
    const float s = static_cast<float>(scales[g]), b = static_cast<float>(biases[g]);
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

template <int BITS, typename S>
void dequantize_rows(const uint32_t* w, const S* scales, const S* biases, float* out,
                     int64_t rows, int64_t cols, int64_t group) {
  const int64_t words = cols * BITS / 32, groups = cols / group;
  parallel_for(rows, cols, [=](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      dequantize_row<BITS, S>(w + r * words, scales + r * groups, biases + r * groups,
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

// dequantize_rows<BITS, S> for the layer's bits (2, 4 or 8).
template <typename S>
auto dequantizer(int bits) {
  return bits == 2 ? &dequantize_rows<2, S> : bits == 4 ? &dequantize_rows<4, S>
                                                        : &dequantize_rows<8, S>;
}

// launch(S{}) with S the C++ type of the scales' dtype (one of the three packed_inputs allows).
template <typename F>
void with_scale_type(mx::Dtype dtype, F&& launch) {
  if (dtype == mx::bfloat16) {
    launch(mx::bfloat16_t{});
  } else if (dtype == mx::float16) {
    launch(mx::float16_t{});
  } else {
    launch(float{});
  }
}

// QuantizedMatmul's task: x (m, K) @ W^T (transpose; W is (rows, cols) = (N, K)) or x (m, rows)
// @ W, W dequantized a block of rows at a time into one scratch buffer from MLX's allocator,
// given back when the task ends.
template <typename S>
void product_by_blocks(const float* x, const uint32_t* w, const S* sc, const S* bi, float* out,
                       int64_t m, int64_t rows, int64_t cols, int64_t group, int bits,
                       bool transpose, Sgemm sgemm) {
  const int64_t groups = cols / group, words = cols * bits / 32;
  const auto dequant = dequantizer<S>(bits);
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
      sgemm(kRowMajor, kNoTrans, kNoTrans, int(m), int(cols), int(nb), 1.0f, x + r0, int(rows),
            tile, int(cols), r0 == 0 ? 0.0f : 1.0f, out, int(cols));
    }
  }
}  // the scratch (an allocator::Data) goes back to MLX's allocator here

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
  const auto sd = scales.dtype();
  if ((sd != mx::float32 && sd != mx::bfloat16 && sd != mx::float16) || biases.dtype() != sd) {
    throw std::invalid_argument(
        "dequantize: scales and biases must share one dtype: float32, bfloat16 or float16");
  }
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
  with_scale_type(inputs[1].dtype(), [&](auto tag) {
    using S = decltype(tag);
    encoder.dispatch([kernel = dequantizer<S>(bits_), w = inputs[0].data<uint32_t>(),
                      sc = inputs[1].data<S>(), bi = inputs[2].data<S>(),
                      out = outputs[0].data<float>(), rows, cols,
                      group = int64_t(group_size_)]() { kernel(w, sc, bi, out, rows, cols, group); });
  });
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
  const int64_t m = inputs[0].shape(0);
  with_scale_type(inputs[2].dtype(), [&](auto tag) {
    using S = decltype(tag);
    encoder.dispatch([=, x = inputs[0].data<float>(), w = inputs[1].data<uint32_t>(),
                      sc = inputs[2].data<S>(), bi = inputs[3].data<S>(),
                      out = outputs[0].data<float>(), group = int64_t(group_size_), bits = bits_,
                      transpose = transpose_, sgemm = g_sgemm.load()]() {
      product_by_blocks<S>(x, w, sc, bi, out, m, rows, cols, group, bits, transpose, sgemm);
    });
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
