"""Fused CPU kernels (C++ MLX primitives in csrc/) with the pure-MLX formulation as fallback.

Models and losses call `cross_entropy`, `swiglu`, `gelu_gate`, `gelu`, `attention` (its causal
mask: `causal_additive_mask`), `rms_norm`,
`layer_norm`, `dropout`, `rope`, `split_heads`/`merge_heads`, `depthwise_conv1d` (a hybrid's short
causal convolution, optionally with its SiLU), `silu` (nn.silu: the SiLU mlx-lm's hybrids apply
after that convolution), `gated_delta` (the gated delta rule token by token, which the hybrids'
gated-delta layers train through on the CPU; None off it; `gated_delta_grad` its backward
alone) and `dequantize` (a 4/8-bit weight for the float GEMM: models/quantized/quantized_cpu.py)
here, and the trainer's AdamW is `AdamW` (adamw.py); each
call picks the fused primitive or the composed MLX ops. Why: on x86, MLX's CPU exp/sigmoid run
scalar on one thread, so the vocabulary softmax, the attention softmax and the SiLU of a small
transformer cost several times PyTorch's, its erf (the exact GELU) is a scalar libm call that took
more than half of the default BERT's step, and its RMSNorm, LayerNorm, RoPE, strided copies and
AdamW update run as single-threaded element-wise ops, its grouped convolution one output at a
time; its dropout draws threefry bits on one thread
(see the history record in benchmarks/results/history/). The fused kernels do the same math in one
vectorized, multi-threaded pass, forward and backward (their VJPs are fused kernels too); the
dropout kernel draws MLX's own bits, so its masks are nn.Dropout's. Attention over many keys
(ops.BLOCKED_MIN_KEYS) runs blocked, a block of query rows at a time with no (B, H, T_q, T_kv)
scores (csrc/blocked_attention.cpp): at Whisper's 1500 frames the whole scores were memory
traffic, not arithmetic.

Mode (`trainer.fused_kernels` -> set_mode, or $MLXLAB_FUSED_KERNELS for scripts):
  auto  fused on the CPU when the extension builds; otherwise, with one log line, pure MLX
  on    fused on the CPU; an error when the extension cannot be built
  off   pure MLX always
set_skip (default $MLXLAB_FUSED_KERNELS_SKIP: comma-separated names from OPS) leaves those ops
to MLX while the others stay fused: for measuring one kernel's effect, or for ruling one out when
a result looks wrong. set_threads (default $MLXLAB_KERNEL_THREADS, else the usable cores) sets
their threads. The variables are read once, by runtime/settings.py.
The fused path runs only when MLX's default device is the CPU and the inputs are float32; GPU
runs and other dtypes take the MLX ops silently. `pip install` compiles the extension into the
cache (hatch_build.py at the repository root, ~20-40 s); where that did not happen, the first
use does (build.py), and later processes load the cached build. It is built for one fixed
instruction-set level (isa_level: x86-64-v3 on x86-64), never for the building CPU, so it is
the same program, with the same results, on every CPU at that level; a CPU below it runs the
pure-MLX ops after one log line.

A module per job, imported one way (ops, adamw, denormals -> dispatch -> build): dispatch.py
(mode, skip, threads, the extension and `fused`, which path a call takes), ops.py (the ops),
adamw.py (the optimizer), denormals.py (flush-to-zero on MLX's CPU thread,
trainer.flush_denormals), build.py (compiling the extension). This __init__ only names them.
"""

from mlxlab.kernels.adamw import AdamW
from mlxlab.kernels.denormals import flush_denormals
from mlxlab.kernels.dispatch import (
    MODES,
    OPS,
    extension,
    isa_level,
    mode,
    set_mode,
    set_skip,
    set_threads,
    skipped,
    status,
    threads,
)
from mlxlab.kernels.ops import (
    attention,
    bf16_matmul,
    bf16_product,
    causal_additive_mask,
    clip_grad_norm,
    cross_entropy,
    depthwise_conv1d,
    dequantize,
    dropout,
    gated_delta,
    gated_delta_grad,
    gelu,
    gelu_gate,
    layer_norm,
    merge_heads,
    mlx_cross_entropy,
    mlx_depthwise_conv1d,
    mlx_gelu_gate,
    next_key,
    quantized_product,
    rms_norm,
    rope,
    same_draws,
    silu,
    split_heads,
    swiglu,
)

__all__ = ["MODES", "OPS", "AdamW", "attention", "bf16_matmul", "bf16_product", "causal_additive_mask", "clip_grad_norm", "cross_entropy", "depthwise_conv1d", "dequantize", "dropout", "extension",
           "flush_denormals", "gated_delta", "gated_delta_grad", "gelu", "gelu_gate",
           "isa_level", "layer_norm", "merge_heads", "mlx_cross_entropy", "mlx_depthwise_conv1d", "mlx_gelu_gate", "mode", "next_key", "quantized_product", "rms_norm", "rope",
           "same_draws", "set_mode", "set_skip", "set_threads", "silu", "skipped", "split_heads", "status", "swiglu",
           "threads"]
