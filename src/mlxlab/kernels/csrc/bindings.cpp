// Python module of the fused kernels; NB_DOMAIN mlx (CMakeLists.txt) shares mx.array's type.
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "kernels.h"

extern "C" void mlxlab_split_sgemm(void*, void*, int, int, int, int, int, int, float,
                                   const float*, int, const float*, int, float, float*, int);

namespace nb = nanobind;
using namespace nb::literals;

NB_MODULE(_mlxlab_kernels, m) {
  m.doc() = "mlxlab fused CPU kernels (custom MLX primitives)";
  m.def(
      "cross_entropy",
      [](const mx::array& logits, const mx::array& targets) {
        return mlxlab::cross_entropy(logits, targets);
      },
      "logits"_a,
      "targets"_a,
      "Per-row softmax cross-entropy of (N, V) float32 logits against (N,) targets.");
  m.def(
      "swiglu",
      [](const mx::array& gate, const mx::array& up) { return mlxlab::swiglu(gate, up); },
      "gate"_a,
      "up"_a,
      "silu(gate) * up for float32 arrays of one shape.");
  m.def(
      "gelu_gate",
      [](const mx::array& gate, const mx::array& up) { return mlxlab::gelu_gate(gate, up); },
      "gate"_a,
      "up"_a,
      "gelu_approx(gate) * up for float32 arrays of one shape (its backward reads gate and up).");
  m.def(
      "softmax",
      [](const mx::array& x, const std::optional<mx::array>& mask, bool key_mask) {
        return mlxlab::softmax(x, mask, key_mask);
      },
      "x"_a,
      "mask"_a = nb::none(),
      "key_mask"_a = false,
      "softmax(x + mask) over the last axis; mask an additive (T_q, T_kv) array, with key_mask "
      "a (B, T_kv) one, or None.");
  m.def(
      "blocked_attention",
      [](const mx::array& q, const mx::array& k, const mx::array& v,
         const std::optional<mx::array>& mask, float scale, int block, bool causal) {
        return mlxlab::blocked_attention(q, k, v, mask, scale, block, causal);
      },
      "q"_a,
      "k"_a,
      "v"_a,
      "mask"_a = nb::none(),
      "scale"_a = 1.0f,
      "block"_a = 64,
      "causal"_a = false,
      "softmax(q k^T * scale + mask) v a block of query rows at a time (no scores tensor); "
      "mask additive (1 or B, 1 or T_q, T_kv) or None; causal: SDPA's mask=\"causal\" with no "
      "mask (T_q <= T_kv); needs set_sgemm_batch.");
  m.def("set_blas_local_threads", &mlxlab::set_blas_local_threads, "address"_a,
        "MKL's mkl_set_num_threads_local, which blocked_attention's threads call (0: none).");
  m.def("gelu", [](const mx::array& x) { return mlxlab::gelu(x); }, "x"_a,
        "The exact (erf) GELU of a float32 array.");
  m.def("silu", [](const mx::array& x) { return mlxlab::silu(x); }, "x"_a,
        "The SiLU, x * sigmoid(x), of a float32 array (nn.silu's values and gradient).");
  m.def(
      "dropout",
      [](const mx::array& x, const mx::array& key, float keep, float scale) {
        return mlxlab::dropout(x, key, keep, scale);
      },
      "x"_a,
      "key"_a,
      "keep"_a,
      "scale"_a,
      "(mx.random.bernoulli(keep, x.shape, key) * x) * scale for float32 x, to the bit.");
  m.def(
      "depthwise_conv1d",
      [](const mx::array& x, const mx::array& w, const std::optional<mx::array>& bias,
         bool silu, const std::optional<mx::array>& positions) {
        return mlxlab::depthwise_conv1d(x, w, bias, silu, positions);
      },
      "x"_a,
      "weight"_a,
      "bias"_a = nb::none(),
      "silu"_a = false,
      "positions"_a = nb::none(),
      "The causal depthwise convolution of float32 x (B, T + K - 1, C) by weight (C, K[, 1]) "
      "(+ bias (C,)) -> (B, T, C), then silu when asked; with positions (B, T) int32 (each "
      "token's place in its packed row) no output reads an input before its row.");
  m.def(
      "gated_delta",
      [](const mx::array& q, const mx::array& k, const mx::array& v, const mx::array& log_g,
         const mx::array& beta, const mx::array& state, const std::optional<mx::array>& keep,
         int span, bool delta, bool with_kept) {
        auto out = mlxlab::gated_delta(q, k, v, log_g, beta, state, keep, span, delta);
        return with_kept ? nb::make_tuple(out[0], out[1], out[2])
                         : nb::make_tuple(out[0], out[1]);
      },
      "q"_a,
      "k"_a,
      "v"_a,
      "log_g"_a,
      "beta"_a,
      "state"_a,
      "keep"_a = nb::none(),
      "span"_a = 0,
      "delta"_a = true,
      "with_kept"_a = false,
      "The gated delta rule token by token over float32 q, k (B, T, Hk, Dk), v (B, T, Hv, Dv), "
      "log_g (B, T, Hv[, Dk]), beta (B, T, Hv), state (B, Hv, Dv, Dk), keep (B, T) -> (y, state); "
      "the forward keeps a state every `span` tokens for the backward (0: the kernel's own), "
      "returned third with `with_kept`; delta=False: gated linear attention (S <- g S + beta v "
      "k^T, Mamba-2's scan).");
  m.def(
      "gated_delta_grad",
      [](const std::vector<mx::array>& primals, const mx::array& kept, const mx::array& dy,
         const mx::array& ds, int span, bool delta) {
        auto g = mlxlab::gated_delta_grad(primals, kept, dy, ds, span, delta);
        return nb::make_tuple(g[0], g[1], g[2], g[3], g[4], g[5]);
      },
      "primals"_a,
      "kept"_a,
      "dy"_a,
      "ds"_a,
      "span"_a = 0,
      "delta"_a = true,
      "gated_delta's backward from its inputs (q, k, v, log_g, beta, state[, keep]), the states "
      "it kept (with_kept's third output) and the cotangents of y and the state -> the gradients "
      "of q, k, v, log_g, beta and the state.");
  m.def(
      "layer_norm",
      [](const mx::array& x, const mx::array& weight, const mx::array& bias, float eps) {
        return mlxlab::layer_norm(x, weight, bias, eps);
      },
      "x"_a,
      "weight"_a,
      "bias"_a,
      "eps"_a,
      "(x - mean) / sqrt(var + eps) * weight + bias over the last axis of float32 x (..., D).");
  m.def(
      "rms_norm",
      [](const mx::array& x, const mx::array& weight, float eps) {
        return mlxlab::rms_norm(x, weight, eps);
      },
      "x"_a,
      "weight"_a,
      "eps"_a,
      "x * rsqrt(mean(x^2, -1) + eps) * weight for float32 x (..., D) and weight (D,).");
  m.def(
      "adamw",
      [](const mx::array& p,
         const mx::array& g,
         const mx::array& m,
         const mx::array& v,
         const mx::array& coef,
         double b1,
         double b2,
         float eps) { return mlxlab::adamw(p, g, m, v, coef, b1, b2, eps); },
      "p"_a,
      "g"_a,
      "m"_a,
      "v"_a,
      "coef"_a,
      "b1"_a,
      "b2"_a,
      "eps"_a,
      "One AdamW step: (p', m', v'); coef = (1 - lr wd, lr / (1 - b1^t), 1 / sqrt(1 - b2^t)).");
  m.def(
      "clip_global_norm",
      [](const std::vector<mx::array>& g, float max_norm) {
        return mlxlab::clip_global_norm(g, max_norm);
      },
      "g"_a,
      "max_norm"_a,
      "Each gradient scaled by min(max_norm / (norm + 1e-6), 1), then the global norm.");
  m.def(
      "split_sgemm_address",
      []() { return reinterpret_cast<uintptr_t>(&mlxlab_split_sgemm); },
      "The address of mlxlab_split_sgemm, for runtime/compute/small_gemm.py's wrapper.");
  m.def(
      "rope",
      [](const mx::array& x, const mx::array& cos, const mx::array& sin) {
        return mlxlab::rope(x, cos, sin);
      },
      "x"_a,
      "cos"_a,
      "sin"_a,
      "Rotate-half RoPE of x (B, T, H, D) with cos, sin (T, D/2), returned as (B, H, T, D).");
  m.def(
      "swap_heads",
      [](const mx::array& x, bool to_heads) { return mlxlab::swap_heads(x, to_heads); },
      "x"_a,
      "to_heads"_a,
      "(B, T, H, D) -> (B, H, T, D) when to_heads, else back, as one copy.");
  m.def(
      "dequantize",
      [](const mx::array& w, const mx::array& scales, const mx::array& biases, int group_size,
         int bits) { return mlxlab::dequantize(w, scales, biases, group_size, bits); },
      "w"_a,
      "scales"_a,
      "biases"_a,
      "group_size"_a,
      "bits"_a,
      "mx.dequantize of an affine 2/4/8-bit weight with float32 scales and biases, as float32.");
  m.def(
      "quantized_matmul",
      [](const mx::array& x, const mx::array& w, const mx::array& scales,
         const mx::array& biases, int group_size, int bits, bool transpose) {
        return mlxlab::quantized_matmul(x, w, scales, biases, group_size, bits, transpose);
      },
      "x"_a,
      "w"_a,
      "scales"_a,
      "biases"_a,
      "group_size"_a,
      "bits"_a,
      "transpose"_a = true,
      "x @ W.T (or x @ W) for a 2/4/8-bit affine W, through the float GEMM set by set_sgemm.");
  m.def("set_sgemm", &mlxlab::set_sgemm, "address"_a,
        "The address of the cblas_sgemm quantized_matmul calls (MLX's own; 0 unsets).");
  m.def("has_sgemm", &mlxlab::has_sgemm);
  m.def(
      "batched_matmul",
      [](const mx::array& a, const mx::array& b, bool ta, bool tb) {
        return mlxlab::batched_matmul(a, b, ta, tb);
      },
      "a"_a,
      "b"_a,
      "ta"_a = false,
      "tb"_a = false,
      "op(a) @ op(b) over matching batch axes through one cblas_sgemm_batch_strided call.");
  m.def("set_sgemm_batch", &mlxlab::set_sgemm_batch, "address"_a,
        "The address of the cblas_sgemm_batch_strided batched_matmul calls (0 unsets).");
  m.def("has_sgemm_batch", &mlxlab::has_sgemm_batch);
  m.def(
      "bf16_matmul",
      [](const mx::array& a, const mx::array& b, bool ta, bool tb) {
        return mlxlab::bf16_matmul(a, b, ta, tb);
      },
      "a"_a,
      "b"_a,
      "ta"_a = false,
      "tb"_a = false,
      "op(a) @ op(b) of float32 matrices rounded to bfloat16, summed in float32 (set_gemm_bf16).");
  m.def("set_gemm_bf16", &mlxlab::set_gemm_bf16, "address"_a, "local_threads"_a = 0,
        "below"_a = 0,
        "The address of the cblas_gemm_bf16bf16f32 bf16_matmul calls (0 unsets), of MKL's "
        "mkl_set_num_threads_local, and the M*N*K below which a product runs on one thread.");
  m.def("has_gemm_bf16", &mlxlab::has_gemm_bf16);
  m.def(
      "isa",
      []() {
        // What the compiler was told it may use (its predefined macros): a test checks that the
        // build is the fixed level's (x86-64-v3: AVX2 and FMA, no AVX-512), whatever CPU built it.
        std::vector<std::string> features;
#ifdef __AVX2__
        features.push_back("avx2");
#endif
#ifdef __FMA__
        features.push_back("fma");
#endif
#ifdef __AVX512F__
        features.push_back("avx512f");
#endif
#ifdef __ARM_NEON
        features.push_back("neon");
#endif
#ifdef __ARM_FEATURE_SVE
        features.push_back("sve");
#endif
#ifdef __FP_FAST_FMAF
        features.push_back("fp_fast_fmaf");
#endif
        return features;
      },
      "The instruction-set features the module was compiled for.");
  m.def("flush_denormals", &mlxlab::flush_denormals, "on"_a,
        "Sets (on) or clears FTZ/DAZ on MLX's CPU stream thread once evaluated; 1.0 where it was on.");
  m.def("set_num_threads", &mlxlab::set_num_threads, "n"_a);
  m.def("num_threads", &mlxlab::num_threads);
  m.def("set_spin_us", &mlxlab::set_spin_us, "us"_a);
}
