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

// softmax(x + mask) over the last axis: scores (..., T_q, T_kv) float32, mask an optional additive
// (T_q, T_kv) float32 array broadcast over the leading axes (attention's causal mask).
mx::array softmax(const mx::array& x, const std::optional<mx::array>& mask);

// Threads the kernels split work over (default: hardware concurrency).
void set_num_threads(int n);
int num_threads();

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

class Softmax : public CpuPrimitive {
 public:
  MLXLAB_PRIMITIVE_BODY(Softmax)
  MLXLAB_VJP
};

// Inputs: softmax output p, cotangent dp -> d scores.
class SoftmaxGrad : public CpuPrimitive {
 public:
  MLXLAB_PRIMITIVE_BODY(SoftmaxGrad)
};

#undef MLXLAB_PRIMITIVE_BODY
#undef MLXLAB_VJP

} // namespace mlxlab
