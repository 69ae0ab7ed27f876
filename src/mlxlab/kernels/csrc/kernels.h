// Fused CPU kernels for mlxlab: custom MLX primitives with eval_cpu and VJPs.
//
// Why: on x86, MLX's CPU element-wise transcendentals (exp, sigmoid) run scalar and on one thread,
// so the softmax cross-entropy, attention softmax and SiLU of a small transformer cost several
// times PyTorch's. These primitives do the same math in one pass per row/chunk, with a
// branch-free exp the compiler vectorizes (AVX2/AVX-512/NEON), split over threads. Float32 only; the Python dispatch
// (mlxlab/kernels/__init__.py) sends anything else to the pure-MLX formulation.
#pragma once

#include <optional>

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace mx = mlx::core;

namespace mlxlab {

// Per-row softmax cross-entropy: logits (N, V) float32, targets (N,) integer -> (N,) float32,
// lse - logits[target]. A target outside [0, V) is ignored: loss 0 and a zero gradient row.
mx::array cross_entropy(const mx::array& logits, const mx::array& targets);

// silu(gate) * up, element-wise; gate and up float32 of one shape.
mx::array swiglu(const mx::array& gate, const mx::array& up);
// gelu_approx(gate) * up (Gemma's MLP), float32 arrays of one shape.
mx::array gelu_gate(const mx::array& gate, const mx::array& up);

// softmax(x + mask) over the last axis: scores (..., T_q, T_kv) float32, mask an optional additive
// float32 array: (T_q, T_kv) broadcast over the leading axes (attention's causal mask), or with
// key_mask (B, T_kv) broadcast over the heads and queries of scores (B, ..., T_q, T_kv) (an
// encoder's key padding).
mx::array softmax(const mx::array& x, const std::optional<mx::array>& mask, bool key_mask = false);

// softmax(q k^T * scale + mask) v without the (B, H, T_q, T_kv) scores: q (B, H, T_q, D), k and v
// (B, H_kv, T_kv, D) with H_kv dividing H (query head h reads key/value head h / (H / H_kv)),
// mask an optional additive float32 (1 or B, 1 or T_q, T_kv), all float32. Computed `block`
// query rows at a time through the BLAS set_sgemm_batch gave (blocked_attention.cpp), which must
// be set. Differentiable in q, k, v (a blocked backward) and the mask. causal: SDPA's
// mask="causal" (row i reads keys j <= i + T_kv - T_q) with no mask array, the keys above the
// diagonal skipped; it takes no mask and T_q <= T_kv.
mx::array blocked_attention(const mx::array& q, const mx::array& k, const mx::array& v,
                            const std::optional<mx::array>& mask, float scale, int block,
                            bool causal = false);
// The address of MKL's mkl_set_num_threads_local where MKL's batched sgemm is the one set (its
// calls from blocked_attention's threads then stay on those threads); 0 for OpenBLAS.
void set_blas_local_threads(uintptr_t address);

// The causal depthwise convolution of the hybrids' short convolutions: x (B, T + K - 1, C)
// (left-padded by the caller), weight (C, K) or nn.Conv1d's (C, K, 1), optional bias (C,), all
// float32 -> (B, T, C), y[b, t, c] = sum_k x[b, t + k, c] w[c, k] + bias[c] (nn.Conv1d(C, C, K,
// groups=C)'s values to float32 rounding), then silu(y) when `silu`. Differentiable in x, the
// weight and the bias.
mx::array depthwise_conv1d(const mx::array& x, const mx::array& w,
                           const std::optional<mx::array>& bias, bool silu,
                           const std::optional<mx::array>& positions = std::nullopt);

// The gated delta rule token by token (mlx-lm's gated_delta_ops; gated_delta.cpp): q, k
// (B, T, Hk, Dk), v (B, T, Hv, Dv) with Hk dividing Hv (value head h reads key head
// h / (Hv / Hk)), log_g the gate's logarithm (B, T, Hv) or per key channel (B, T, Hv, Dk), beta
// (B, T, Hv), state (B, Hv, Dv, Dk), keep an optional (B, T) 1/0 (a 0 step leaves the state as it
// was, its output still read from the step's update), all float32 -> (y (B, T, Hv, Dv), the final
// state). Differentiable in all but keep: the forward keeps the state entering every `span`
// tokens (0: gated_delta.cpp's kSpan) for the backward, which recomputes the others from them.
// delta false: gated linear attention, S <- g S + beta v k^T (Mamba-2's scan with beta its time
// step, k its B, q its C), not the delta rule's beta (v - S k) k^T.
std::vector<mx::array> gated_delta(const mx::array& q, const mx::array& k, const mx::array& v,
                                   const mx::array& log_g, const mx::array& beta,
                                   const mx::array& state, const std::optional<mx::array>& keep,
                                   int span = 0, bool delta = true);

// gated_delta's backward from what its forward returned: primals its inputs (q, k, v, log_g,
// beta, state[, keep]), kept its third output (the states a span apart, (B, Hv, ceil(T / span),
// Dv, Dk)), dy and ds the cotangents of y and of the final state -> the gradients of q, k, v,
// log_g, beta and the initial state. What its VJP computes; called directly by a recompute that
// kept the forward's outputs and so never runs the forward again.
std::vector<mx::array> gated_delta_grad(const std::vector<mx::array>& primals,
                                        const mx::array& kept, const mx::array& dy,
                                        const mx::array& ds, int span = 0, bool delta = true);

// The exact GELU, x * (1 + erf(x / sqrt(2))) / 2, element-wise on float32 (BERT's, GPT-2's MLP).
mx::array gelu(const mx::array& x);

// The SiLU, x * sigmoid(x), element-wise on float32 (the hybrids' activation after their short
// convolution): nn.silu's values and gradient to the bit (silu.cpp).
mx::array silu(const mx::array& x);

// Inverted dropout: x * mask * scale with mask ~ Bernoulli(keep) drawn as
// mx.random.bernoulli(keep, x.shape, key) draws it (MLX's threefry bits, to the bit), scale
// 1 / keep: nn.Dropout's output for the same key, on all cores.
mx::array dropout(const mx::array& x, const mx::array& key, float keep, float scale);

// Layer normalization over the last axis: x (..., D), weight and bias (D,), float32 ->
// (x - mean) / sqrt(var + eps) * weight + bias (what mx.fast.layer_norm computes).
mx::array layer_norm(const mx::array& x, const mx::array& weight, const mx::array& bias, float eps);

// RMS normalization over the last axis: x (..., D) float32, weight (D,) float32 ->
// x * rsqrt(mean(x^2) + eps) * weight (what mx.fast.rms_norm computes).
mx::array rms_norm(const mx::array& x, const mx::array& weight, float eps);

// One AdamW step of one parameter: (p, g, m, v) float32 of one shape and coef = (decay, c1, c2)
// float32 -> (p', m', v') with m' = b1 m + (1-b1) g, v' = b2 v + (1-b2) g^2,
// p' = p decay - c1 m' / (sqrt(v') c2 + eps): mlx.optimizers.AdamW's update, with
// decay = 1 - lr wd, c1 = lr / (1 - b1^t), c2 = 1 / sqrt(1 - b2^t) (or c1 = lr, c2 = 1 without
// bias correction).
std::vector<mx::array> adamw(
    const mx::array& p,
    const mx::array& g,
    const mx::array& m,
    const mx::array& v,
    const mx::array& coef,
    double b1,
    double b2,
    float eps);

// mlx.optimizers.clip_grad_norm in one dispatch: float32 gradients -> each scaled by
// min(max_norm / (norm + 1e-6), 1), then the global norm (a float32 scalar).
std::vector<mx::array> clip_global_norm(const std::vector<mx::array>& grads, float max_norm);

// Rotary embedding (rotate-half layout) fused with the move of the heads axis: x (B, T, H, D)
// float32, cos and sin (T, D/2) float32 (of the angles (offset + t) * scale * base^(-2i/D)) ->
// (B, H, T, D), what mx.fast.rope(x.transpose(0, 2, 1, 3), D, traditional=False, ...) computes.
mx::array rope(const mx::array& x, const mx::array& cos, const mx::array& sin);

// The heads transpose of attention as one multi-threaded copy: (B, T, H, D) -> (B, H, T, D) when
// to_heads, else (B, H, T, D) -> (B, T, H, D). Its VJP is the other direction.
mx::array swap_heads(const mx::array& x, bool to_heads);

// Affine dequantization (mx.dequantize's, MLX's values) of a weight mx.quantize packed at 2, 4 or
// 8 bits: w (..., K * bits / 32) uint32, scales and biases (..., K / group_size) float32 ->
// (..., K) float32, scale * q + bias per group. No VJP: the packed weights are frozen (QLoRA).
mx::array dequantize(const mx::array& w, const mx::array& scales, const mx::array& biases,
                     int group_size, int bits);

// x @ W.T (transpose) or x @ W (not) for a weight W (N, K) packed as `dequantize` takes it and
// x (M, K) or (M, N) float32: the weight dequantized a block of rows at a time into a scratch
// buffer and multiplied by the sgemm set_sgemm gave (MLX's own BLAS). Differentiable in x (its
// VJP is the other product); zeros for the packed weight, scales and biases (frozen).
mx::array quantized_matmul(const mx::array& x, const mx::array& w, const mx::array& scales,
                           const mx::array& biases, int group_size, int bits, bool transpose);

// op(a) @ op(b) over matching batch axes, a (..., M, K) or (..., K, M) when ta, b (..., K, N) or
// (..., N, K) when tb, float32: one cblas_sgemm_batch_strided call (set_sgemm_batch), which gives
// whole matrices to the BLAS's threads. Differentiable in both.
mx::array batched_matmul(const mx::array& a, const mx::array& b, bool ta, bool tb);
// The address of the BLAS's cblas_sgemm_batch_strided (0 unsets it), and whether one is set.
void set_sgemm_batch(uintptr_t address);
bool has_sgemm_batch();

// op(a) @ op(b) for float32 matrices a (M, K) or (K, M) when ta, b (K, N) or (N, K) when tb,
// both rounded to bfloat16 and their products summed in float32 by the bf16 gemm set_gemm_bf16
// gave (MKL's cblas_gemm_bf16bf16f32): float32 out. Differentiable in both (bf16 products too).
mx::array bf16_matmul(const mx::array& a, const mx::array& b, bool ta, bool tb);
// The address of MKL's cblas_gemm_bf16bf16f32 (0 unsets it), of its mkl_set_num_threads_local
// (0: none) and the M*N*K below which a product runs on one thread; whether a gemm is set.
void set_gemm_bf16(uintptr_t address, uintptr_t local_threads, int64_t below);
bool has_gemm_bf16();

// The address of the cblas_sgemm quantized_matmul calls (0 unsets it), and whether one is set.
void set_sgemm(uintptr_t address);
bool has_sgemm();

// Sets (on) or clears flush-to-zero and denormals-are-zero on the thread of MLX's CPU stream
// (fp_mode.cpp): a float32 scalar, 1 where the mode was on before, evaluated for its effect.
mx::array flush_denormals(bool on);

// Threads the kernels split work over (default: hardware concurrency).
void set_num_threads(int n);
int num_threads();
// Microseconds the pool's threads stay awake, yielding the core, before they sleep (kernels.cpp).
void set_spin_us(int us);

// What every mlxlab primitive shares: CPU only (eval_gpu throws; the Python dispatch never sends
// GPU arrays here), and no attributes, so two of the same kind on the same inputs are equivalent.
class CpuPrimitive : public mx::Primitive {
 public:
  explicit CpuPrimitive(mx::Stream stream) : mx::Primitive(stream) {}
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  bool is_equivalent(const mx::Primitive& other) const override {
    return true;
  }
};

#define MLXLAB_PRIMITIVE_BODY(Name)                                                          \
  explicit Name(mx::Stream stream) : CpuPrimitive(stream) {}                                 \
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override; \
  const char* name() const override {                                                        \
    return "Mlxlab" #Name;                                                                    \
  }

#define MLXLAB_VJP                                                                             \
  std::vector<mx::array> vjp(                                                                  \
      const std::vector<mx::array>& primals,                                                   \
      const std::vector<mx::array>& cotangents,                                                \
      const std::vector<int>& argnums,                                                         \
      const std::vector<mx::array>& outputs) override;

class CrossEntropy : public CpuPrimitive {
 public:
  MLXLAB_PRIMITIVE_BODY(CrossEntropy)
  MLXLAB_VJP
};

// Inputs: logits (N, V), targets (N,), lse (N,), cotangent (N,) -> d logits (N, V).
class CrossEntropyGrad : public CpuPrimitive {
 public:
  MLXLAB_PRIMITIVE_BODY(CrossEntropyGrad)
};

class SwiGLU : public CpuPrimitive {
 public:
  MLXLAB_PRIMITIVE_BODY(SwiGLU)
  MLXLAB_VJP
};

// Inputs: gate, up, cotangent -> (d gate, d up).
class SwiGLUGrad : public CpuPrimitive {
 public:
  MLXLAB_PRIMITIVE_BODY(SwiGLUGrad)
};

class GeluGate : public CpuPrimitive {
 public:
  MLXLAB_PRIMITIVE_BODY(GeluGate)
  MLXLAB_VJP
};

// Inputs: gate, up, cotangent -> (d gate, d up).
class GeluGateGrad : public CpuPrimitive {
 public:
  MLXLAB_PRIMITIVE_BODY(GeluGateGrad)
};

class Softmax : public CpuPrimitive {
 public:
  Softmax(mx::Stream stream, bool key_mask) : CpuPrimitive(stream), key_mask_(key_mask) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  const char* name() const override {
    return "MlxlabSoftmax";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    return key_mask_ == static_cast<const Softmax&>(other).key_mask_;
  }
  MLXLAB_VJP

 private:
  bool key_mask_; // the mask is (B, T_kv) per batch row, not (T_q, T_kv)
};

// Inputs: softmax output p, cotangent dp -> d scores.
class SoftmaxGrad : public CpuPrimitive {
 public:
  MLXLAB_PRIMITIVE_BODY(SoftmaxGrad)
};

// Inputs: q, k, v (, mask) -> (out (B, H, T_q, D), stats (B, H, T_q, 2)): each query row's
// softmax max and 1 / sum, kept for the VJP (its logsumexp, max - log(1 / sum)).
class BlockedAttention : public CpuPrimitive {
 public:
  BlockedAttention(mx::Stream stream, float scale, int block, bool causal)
      : CpuPrimitive(stream), scale_(scale), block_(block), causal_(causal) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  const char* name() const override {
    return "MlxlabBlockedAttention";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const BlockedAttention&>(other);
    return scale_ == o.scale_ && block_ == o.block_ && causal_ == o.causal_;
  }
  MLXLAB_VJP

 private:
  float scale_;
  int block_;   // query rows per task
  bool causal_; // SDPA's mask="causal", no mask input
};

// Inputs: q, k, v (, mask), out, stats, cotangent -> (d q, d k, d v).
class BlockedAttentionGrad : public CpuPrimitive {
 public:
  BlockedAttentionGrad(mx::Stream stream, float scale, int block, bool causal)
      : CpuPrimitive(stream), scale_(scale), block_(block), causal_(causal) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  const char* name() const override {
    return "MlxlabBlockedAttentionGrad";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const BlockedAttentionGrad&>(other);
    return scale_ == o.scale_ && block_ == o.block_ && causal_ == o.causal_;
  }

 private:
  float scale_;
  int block_;
  bool causal_;
};

// Inputs: x (N, D), weight (D,) -> (y (N, D), rstd (N,)); rstd is kept for the VJP.
class RMSNorm : public CpuPrimitive {
 public:
  RMSNorm(mx::Stream stream, float eps) : CpuPrimitive(stream), eps_(eps) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  const char* name() const override {
    return "MlxlabRMSNorm";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    return eps_ == static_cast<const RMSNorm&>(other).eps_;
  }
  MLXLAB_VJP

 private:
  float eps_;
};

// Inputs: x (N, D), weight (D,), rstd (N,), cotangent (N, D) -> (d x, d weight).
class RMSNormGrad : public CpuPrimitive {
 public:
  MLXLAB_PRIMITIVE_BODY(RMSNormGrad)
};

// Inputs: p, g, m, v, coef (3,) -> (p', m', v'); see adamw() above.
class AdamW : public CpuPrimitive {
 public:
  // b1, b2 as the Python floats they are: 1 - b1 is rounded to float32 once, as MLX does.
  AdamW(mx::Stream stream, double b1, double b2, float eps)
      : CpuPrimitive(stream), b1_(b1), b2_(b2), eps_(eps) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  const char* name() const override {
    return "MlxlabAdamW";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const AdamW&>(other);
    return b1_ == o.b1_ && b2_ == o.b2_ && eps_ == o.eps_;
  }

 private:
  double b1_, b2_;
  float eps_;
};

class ClipGlobalNorm : public CpuPrimitive {
 public:
  ClipGlobalNorm(mx::Stream stream, float max_norm) : CpuPrimitive(stream), max_norm_(max_norm) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  const char* name() const override {
    return "MlxlabClipGlobalNorm";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    return max_norm_ == static_cast<const ClipGlobalNorm&>(other).max_norm_;
  }

 private:
  float max_norm_;
};

class Rope : public CpuPrimitive {
 public:
  MLXLAB_PRIMITIVE_BODY(Rope)
  MLXLAB_VJP
};

// Inputs: cotangent (B, H, T, D), cos, sin -> d x (B, T, H, D): the inverse rotation.
class RopeGrad : public CpuPrimitive {
 public:
  MLXLAB_PRIMITIVE_BODY(RopeGrad)
};

class SwapHeads : public CpuPrimitive {
 public:
  SwapHeads(mx::Stream stream, bool to_heads) : CpuPrimitive(stream), to_heads_(to_heads) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  const char* name() const override {
    return "MlxlabSwapHeads";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    return to_heads_ == static_cast<const SwapHeads&>(other).to_heads_;
  }
  MLXLAB_VJP

 private:
  bool to_heads_;
};

// Inputs: x, x (see gelu) -> y.
class Gelu : public CpuPrimitive {
 public:
  MLXLAB_PRIMITIVE_BODY(Gelu)
  MLXLAB_VJP
};

// Inputs: x, cotangent -> x's gradient in two parts (see gelu).
class GeluGrad : public CpuPrimitive {
 public:
  MLXLAB_PRIMITIVE_BODY(GeluGrad)
};

// Inputs: x -> y (silu).
class Silu : public CpuPrimitive {
 public:
  MLXLAB_PRIMITIVE_BODY(Silu)
  MLXLAB_VJP
};

// Inputs: x, cotangent -> x's gradient.
class SiluGrad : public CpuPrimitive {
 public:
  MLXLAB_PRIMITIVE_BODY(SiluGrad)
};

// Inputs: x, key -> (y, scale) with scale = mask / keep: the VJP multiplies by it.
class Dropout : public CpuPrimitive {
 public:
  Dropout(mx::Stream stream, float keep, float scale)
      : CpuPrimitive(stream), keep_(keep), scale_(scale) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  const char* name() const override {
    return "MlxlabDropout";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const Dropout&>(other);
    return keep_ == o.keep_ && scale_ == o.scale_;
  }
  MLXLAB_VJP

 private:
  float keep_, scale_;
};

// Inputs: x (N, D) twice (see layer_norm), weight (D,), bias (D,) -> (y (N, D), mean (N,),
// var + eps (N,)); the row statistics are kept for the VJP.
class LayerNorm : public CpuPrimitive {
 public:
  LayerNorm(mx::Stream stream, float eps) : CpuPrimitive(stream), eps_(eps) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  const char* name() const override {
    return "MlxlabLayerNorm";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    return eps_ == static_cast<const LayerNorm&>(other).eps_;
  }
  MLXLAB_VJP

 private:
  float eps_;
};

// Inputs: x (N, D), weight (D,), mean (N,), var + eps (N,), cotangent (N, D) -> (x's gradient
// through x - mean (N, D), through the mean (N,), d weight, d bias).
class LayerNormGrad : public CpuPrimitive {
 public:
  MLXLAB_PRIMITIVE_BODY(LayerNormGrad)
};

// Inputs: x, weight (, bias) (, positions: `rows`) -> y (depthwise_conv1d).
class DepthwiseConv1d : public CpuPrimitive {
 public:
  DepthwiseConv1d(mx::Stream stream, bool silu, bool rows)
      : CpuPrimitive(stream), silu_(silu), rows_(rows) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  const char* name() const override {
    return "MlxlabDepthwiseConv1d";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const DepthwiseConv1d&>(other);
    return silu_ == o.silu_ && rows_ == o.rows_;
  }
  MLXLAB_VJP

 private:
  bool silu_, rows_;
};

// Inputs: x, weight (, bias) (, positions: `rows`), cotangent -> (d x, d weight (, d bias));
// without `params` (only x's gradient asked for) -> d x, and without the SiLU too, from the
// weight (, positions) and cotangent alone.
class DepthwiseConv1dGrad : public CpuPrimitive {
 public:
  DepthwiseConv1dGrad(mx::Stream stream, bool silu, bool params, bool rows)
      : CpuPrimitive(stream), silu_(silu), params_(params), rows_(rows) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  const char* name() const override {
    return "MlxlabDepthwiseConv1dGrad";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const DepthwiseConv1dGrad&>(other);
    return silu_ == o.silu_ && params_ == o.params_ && rows_ == o.rows_;
  }

 private:
  bool silu_;
  bool params_; // the weight's and bias's gradients too
  bool rows_;   // a packed sequence's positions
};

// Inputs: q, k, v, log_g, beta, state (, keep) -> (y, final state, the states entering every
// span_ tokens (B, Hv, N, Dv, Dk)).
class GatedDelta : public CpuPrimitive {
 public:
  GatedDelta(mx::Stream stream, int span, bool delta)
      : CpuPrimitive(stream), span_(span), delta_(delta) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  const char* name() const override {
    return "MlxlabGatedDelta";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const GatedDelta&>(other);
    return span_ == o.span_ && delta_ == o.delta_;
  }
  MLXLAB_VJP

 private:
  int span_;
  bool delta_;
};

// Inputs: GatedDelta's, its kept states, then the cotangents of y and of the final state -> the
// gradients of q and k per value head (B, T, Hv, Dk), of v, log_g, beta and the initial state.
class GatedDeltaGrad : public CpuPrimitive {
 public:
  GatedDeltaGrad(mx::Stream stream, int span, bool delta)
      : CpuPrimitive(stream), span_(span), delta_(delta) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  const char* name() const override {
    return "MlxlabGatedDeltaGrad";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const GatedDeltaGrad&>(other);
    return span_ == o.span_ && delta_ == o.delta_;
  }

 private:
  int span_;
  bool delta_;
};

#undef MLXLAB_PRIMITIVE_BODY
#undef MLXLAB_VJP

// Inputs: w, scales, biases -> the float32 weight. Never equivalent to another: each use is meant
// as a short-lived temporary, and mx.compile would merge two uses of one weight (one in the
// forward, one in the backward) into a single float copy kept alive between them.
class Dequantize : public CpuPrimitive {
 public:
  Dequantize(mx::Stream stream, int group_size, int bits)
      : CpuPrimitive(stream), group_size_(group_size), bits_(bits) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  const char* name() const override {
    return "MlxlabDequantize";
  }
  bool is_equivalent(const mx::Primitive&) const override {
    return false;
  }

 private:
  int group_size_, bits_;
};

// Inputs: x, w, scales, biases -> x @ W.T (transpose) or x @ W.
class QuantizedMatmul : public CpuPrimitive {
 public:
  QuantizedMatmul(mx::Stream stream, int group_size, int bits, bool transpose)
      : CpuPrimitive(stream), group_size_(group_size), bits_(bits), transpose_(transpose) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  const char* name() const override {
    return "MlxlabQuantizedMatmul";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const QuantizedMatmul&>(other);
    return group_size_ == o.group_size_ && bits_ == o.bits_ && transpose_ == o.transpose_;
  }
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals,
                             const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums,
                             const std::vector<mx::array>& outputs) override;

 private:
  int group_size_, bits_;
  bool transpose_;
};

// Inputs: a, b -> op(a) @ op(b) (batched_matmul).
class BatchedMatmul : public CpuPrimitive {
 public:
  BatchedMatmul(mx::Stream stream, bool ta, bool tb) : CpuPrimitive(stream), ta_(ta), tb_(tb) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  const char* name() const override {
    return "MlxlabBatchedMatmul";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const BatchedMatmul&>(other);
    return ta_ == o.ta_ && tb_ == o.tb_;
  }
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals,
                             const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums,
                             const std::vector<mx::array>& outputs) override;

 private:
  bool ta_, tb_;
};

// Inputs: a, b -> op(a) @ op(b) with bf16-rounded inputs, float32 sums (bf16_matmul).
class Bf16Matmul : public CpuPrimitive {
 public:
  Bf16Matmul(mx::Stream stream, bool ta, bool tb) : CpuPrimitive(stream), ta_(ta), tb_(tb) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  const char* name() const override {
    return "MlxlabBf16Matmul";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const Bf16Matmul&>(other);
    return ta_ == o.ta_ && tb_ == o.tb_;
  }
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals,
                             const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums,
                             const std::vector<mx::array>& outputs) override;

 private:
  bool ta_, tb_;
};

// No inputs; sets the mode of the thread it runs on. Not equivalent to another (never merged
// away by compile: each call is an effect).
class FlushDenormals : public CpuPrimitive {
 public:
  FlushDenormals(mx::Stream stream, bool on) : CpuPrimitive(stream), on_(on) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  const char* name() const override {
    return "MlxlabFlushDenormals";
  }
  bool is_equivalent(const mx::Primitive&) const override {
    return false;
  }

 private:
  bool on_;
};

} // namespace mlxlab
