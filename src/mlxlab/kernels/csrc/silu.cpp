// The SiLU, x * sigmoid(x): nn.silu, the activation mlx-lm's hybrids apply after their short
// convolution (and some MLPs). On x86 MLX's CPU sigmoid is a scalar exp on one thread: at 4M
// floats nn.silu took ~0.1 s forward and more backward. This runs MLX's own formulas op for op
// (mlx_math.h), vectorized and over the pool: nn.silu's values to the bit, and its gradient
// (see silu_grad_span).
#include "common.h"
#include "kernels.h"
#include "mlx_math.h"

#include "mlx/backend/cpu/encoder.h"

namespace mlxlab {

using namespace detail;

namespace {

inline void silu_span(const float* __restrict x, float* __restrict y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    y[i] = x[i] * mlx_sigmoid(x[i]);
  }
}

// The gradient MLX's autodiff builds from nn.silu's graph, x * s with s = sigmoid(x): through
// the product, g s; through the sigmoid (its VJP: (g x) (s (1 - s)), s the forward's output);
// the two added here, in one output. Where nothing else reaches x's gradient (a convolution's
// or a projection's output fed to the SiLU alone) that is MLX's sum, to the bit; where x has
// other uses MLX adds the two parts to its gradient one at a time, and the sums differ by
// float32 rounding (gelu keeps the parts apart for that, at the cost of a second output and
// MLX's single-threaded add).
inline void silu_grad_span(
    const float* __restrict x, const float* __restrict g, float* __restrict dx, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float xi = x[i], gi = g[i], s = mlx_sigmoid(xi);
    dx[i] = gi * s + (gi * xi) * (s * (1.0f - s));
  }
}

// cost: an exp is a dozen multiply-adds and a division; small arrays stay on one thread
constexpr int64_t kSiluCost = 8;

} // namespace

mx::array silu(const mx::array& x) {
  check_cpu_float32(x, "silu");
  auto s = mx::to_stream(mx::Device::cpu);
  return mx::array(x.shape(), mx::float32, std::make_shared<Silu>(s), {x});
}

void Silu::eval_cpu(const std::vector<mx::array>& given, std::vector<mx::array>& outputs) {
  auto& encoder = mx::cpu::get_command_encoder(stream());
  const auto inputs = row_contiguous_all(given, encoder);
  set_arrays(encoder, inputs, outputs);
  encoder.dispatch([px = inputs[0].data<float>(), py = outputs[0].data<float>(),
                    n = int64_t(inputs[0].size())]() {
    parallel_for(n, kSiluCost, [=](int64_t begin, int64_t end) {
      silu_span(px + begin, py + begin, end - begin);
    });
  });
}

// The backward reads x alone (the sigmoid recomputed): nothing of the forward's is kept for it.
std::vector<mx::array> Silu::vjp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>&,
    const std::vector<mx::array>&) {
  return {mx::array(primals[0].shape(), mx::float32, std::make_shared<SiluGrad>(stream()),
                    {primals[0], cotangents[0]})};
}

void SiluGrad::eval_cpu(const std::vector<mx::array>& given, std::vector<mx::array>& outputs) {
  auto& encoder = mx::cpu::get_command_encoder(stream());
  const auto inputs = row_contiguous_all(given, encoder);
  set_arrays(encoder, inputs, outputs);
  encoder.dispatch([px = inputs[0].data<float>(), pg = inputs[1].data<float>(),
                    pd = outputs[0].data<float>(), n = int64_t(inputs[0].size())]() {
    parallel_for(n, kSiluCost + 4, [=](int64_t begin, int64_t end) {
      silu_grad_span(px + begin, pg + begin, pd + begin, end - begin);
    });
  });
}

} // namespace mlxlab
