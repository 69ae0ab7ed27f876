"""The fused ops: each computes what its MLX formulation computes, through the compiled kernel
when dispatch.fused says so (CPU, float32, mode not off, op not skipped), else with MLX's ops."""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten

from mlxlab.kernels.dispatch import extension, fused, skipped
from mlxlab.runtime.compute import bf16, blas


def mlx_cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
    """The pure-MLX per-row cross-entropy: a max-shifted log-sum-exp minus the target logit (on
    MLX's CPU backend `exp` is the slow op, and this form runs it once forward and reuses it
    backward: 2x faster than nn.losses.cross_entropy)."""
    shift = mx.stop_gradient(logits.max(axis=-1, keepdims=True))
    lse = mx.log(mx.exp(logits - shift).sum(axis=-1)) + shift.squeeze(-1)
    return lse - mx.take_along_axis(logits, targets[..., None], axis=-1).squeeze(-1)


def cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
    """Cross-entropy over the last axis, no reduction: logits (..., V) as float32, targets (...)."""
    logits = logits.astype(mx.float32)
    module = fused("cross_entropy", logits)
    if module is None:
        return mlx_cross_entropy(logits, targets)
    vocab = logits.shape[-1]
    ce = module.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1))
    return ce.reshape(targets.shape)


def attention(
    q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | str | None = None
) -> mx.array:
    """softmax(q k^T * scale + mask) v over (B, H, T, D) heads, what
    mx.fast.scaled_dot_product_attention computes. Fused for float32 with no mask, "causal", an
    additive (T_q, T_kv) mask, an additive mask per row (B, 1, T_q, T_kv) (packed rows:
    models/decoders/packing.py) or a key-padding mask (B, 1, 1, T_kv) (boolean, True = may attend,
    as models.layers.blocks.padding_mask makes; or additive), with as many key/value heads as
    query heads or a divisor of them (grouped-query attention); otherwise MLX's SDPA. Two fused
    paths: from BLOCKED_MIN_KEYS keys on, the blocked kernel (csrc/blocked_attention.cpp: a block
    of query rows at a time, no (B, H, T_q, T_kv) scores; float32 rounding of MLX's SDPA); below
    that the two matmuls go to BLAS and the masked softmax (forward and backward) to one kernel
    that is MLX's op for op, so the result is MLX's to the bit. mask="causal" (SDPA's, aligned
    bottom-right) is decided here, once a call: the blocked kernel takes it as a flag (no mask
    array, the keys above the diagonal skipped); every other path gets causal_additive_mask,
    the array it stands for (MLX's bits on MLX's SDPA and on the whole-scores path), except
    with more queries than keys, where MLX's SDPA takes "causal" itself (its rule for a query
    row with no key left, where the array's -inf row would give NaN)."""
    causal = isinstance(mask, str) and mask == "causal"
    if causal and q.shape[2] > k.shape[2]:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    key_mask = isinstance(mask, mx.array) and mask.ndim == 4 and mask.shape[1:3] == (1, 1)
    # a mask per row shared by the heads (B, 1, T_q, T_kv): packed rows' block-diagonal mask
    row_mask = (isinstance(mask, mx.array) and mask.ndim == 4 and mask.shape[1] == 1
                and not key_mask and mask.dtype != mx.bool_)
    plain_mask = (mask is None or causal or key_mask or row_mask
                  or (isinstance(mask, mx.array) and mask.ndim == 2))
    module = fused("attention", q, k, v)
    grouped = k.shape[1] == v.shape[1] and q.shape[1] % k.shape[1] == 0
    fused_path = module is not None and plain_mask and grouped
    blocked = fused_path and _takes_blocked(module, k.shape[2])
    if causal and blocked and k.shape == v.shape:
        return _blocked_attention(module, q, k, v, scale, None, causal=True)
    if causal:
        mask = causal_additive_mask(q.shape[2], k.shape[2], q.dtype)
    if not fused_path:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    if isinstance(mask, mx.array) and mask.dtype == mx.bool_:
        # MLX puts float32's lowest where the mask is false; adding it to a score gives that
        # lowest exactly, so this is the same softmax (a row with no key left is uniform, as
        # MLX's, not NaN).
        mask = mx.where(mask, mx.array(0.0), mx.array(mx.finfo(mx.float32).min))
    mask = None if mask is None else mask.astype(mx.float32)
    if blocked:
        return _blocked_attention(module, q, k, v, scale, mask)
    if row_mask:  # added to the scores before the fused softmax (one broadcast pass)
        return _attention_rows(module, q, k, v, scale, mask)
    if key_mask:
        mask = mask.reshape(mask.shape[0], mask.shape[-1])
    B, H, T, D = q.shape
    group = H // k.shape[1]
    product = _batched_product(module)
    if group == 1:
        scores = product(q * scale, k, True)
        return product(module.softmax(scores, mask, key_mask), v, False)
    # Grouped-query attention: query head h reads key/value head h // group (SDPA's rule). The
    # group's queries are stacked along T, (B, H_kv, group * T, D), so each product runs once
    # per key/value head over all its queries, with no repeated keys or values: SDPA's CPU path
    # runs MLX's scalar softmax, and repeating k and v costs copies and a wider backward.
    grouped_q = (q * scale).reshape(B, H // group, group * T, D)
    scores = product(grouped_q, k, True).reshape(B, H, T, -1)
    probs = module.softmax(scores, mask, key_mask).reshape(B, H // group, group * T, -1)
    return product(probs, v, False).reshape(B, H, T, D)


def causal_additive_mask(t_q: int, t_kv: int, dtype: mx.Dtype = mx.float32) -> mx.array:
    """The lower-right aligned causal mask (SDPA's mask="causal": query row i reads keys
    j <= i + t_kv - t_q) as an additive (t_q, t_kv) array of 0 / -inf. On MLX's CPU backend
    SDPA with this array runs ~2x faster than with mask="causal", to the same bits (t_q <=
    t_kv)."""
    q_pos = mx.arange(t_kv - t_q, t_kv)[:, None]
    allowed = q_pos >= mx.arange(t_kv)[None, :]
    return mx.where(allowed, mx.array(0.0, dtype), mx.array(-mx.inf, dtype))


# From how many keys attention takes the blocked kernel. Below, the whole-scores path stays: its
# results are MLX's SDPA's to the bit (a seed trains the same run with the kernels on as off), and
# its scores are small there (256 keys: 256 KB a head). The blocked kernel measured faster at
# every length tried (16 to 1500 keys, alternating rounds on a loaded 2-core Xeon, family 6
# model 207: 1.6-1.7x forward and backward at the nano decoder's 128 and 256), so this bound
# trades speed for those bits on short sequences; 1 would take the blocked kernel everywhere.
BLOCKED_MIN_KEYS = 512
# Bytes of scores a block of query rows holds (the backward holds two such buffers): the rows per
# block are this over T_kv's (a multiple of 16, 16 to 256 rows): 128 rows at Whisper's 1500 keys.
BLOCK_BYTES = 768 * 1024


def _takes_blocked(module, keys: int) -> bool:
    """Whether attention over `keys` keys takes the blocked kernel: long enough, not skipped,
    and MLX's BLAS has a batched sgemm that runs on the thread that calls it (the kernel calls it
    with a batch of one from its own threads): OpenBLAS's does by itself, MKL's once told with
    mkl_set_num_threads_local; another BLAS might start its own threads inside each of ours."""
    if keys < BLOCKED_MIN_KEYS or "blocked_attention" in skipped():
        return False
    batch = blas.mlx_sgemm_batch()
    library = _library_of(blas.mlx_gemm_target()) if batch else ""
    local = blas.mlx_blas_local_threads() if "mkl" in library else None
    if "openblas" not in library and local is None:
        return False
    module.set_sgemm_batch(batch)  # read each call: setup_blas may have rebound libmlx since
    module.set_blas_local_threads(local or 0)
    return True


@functools.lru_cache(maxsize=8)
def _library_of(address: int | None) -> str:
    """The file name (lower case) of the library `address` lies in, "" where unknown."""
    path = blas.mlx_gemm_library() if address is not None else None
    return Path(path).name.lower() if path else ""


def _blocked_attention(module, q: mx.array, k: mx.array, v: mx.array, scale: float,
                       mask: mx.array | None, causal: bool = False) -> mx.array:
    """The blocked kernel with attention()'s masks as it takes them: additive float32 (1 or B,
    1 or T_q, T_kv); (T_q, T_kv), (B, 1, 1, T_kv) and (B, 1, T_q, T_kv) drop their unit axes;
    or causal, with no mask."""
    if mask is not None:
        mask = mask[None] if mask.ndim == 2 else mask.reshape(mask.shape[0], *mask.shape[2:])
    block = max(16, min(256, BLOCK_BYTES // (4 * k.shape[2]) // 16 * 16))
    return module.blocked_attention(q, k, v, mask, scale, block, causal)


def _attention_rows(module, q: mx.array, k: mx.array, v: mx.array, scale: float,
                    mask: mx.array) -> mx.array:
    """kernels.attention with an additive (B, 1, T_q, T_kv) mask: the scores plus the mask, then
    the fused softmax with no mask of its own (grouped-query heads as in attention above)."""
    B, H, T, D = q.shape
    group = H // k.shape[1]
    product = _batched_product(module)
    if group == 1:
        return product(module.softmax(product(q * scale, k, True) + mask, None, False), v, False)
    grouped_q = (q * scale).reshape(B, H // group, group * T, D)
    scores = product(grouped_q, k, True).reshape(B, H, T, -1) + mask
    probs = module.softmax(scores, None, False).reshape(B, H // group, group * T, -1)
    return product(probs, v, False).reshape(B, H, T, D)


def _batched_product(module):
    """attention's products a @ b (or a @ b^T): one batched BLAS call for all (batch, head)
    matrices where the BLAS MLX calls has one (kernels.batched_matmul: whole matrices to the
    BLAS's threads), else MLX's matmul (one BLAS call a matrix)."""
    batch = blas.mlx_sgemm_batch() if "batched_matmul" not in skipped() else None
    if not batch:
        return lambda a, b, tb: a @ (b.swapaxes(-1, -2) if tb else b)
    module.set_sgemm_batch(batch)  # read each call: setup_blas may have rebound libmlx since
    return lambda a, b, tb: module.batched_matmul(a, b, False, tb)


def rms_norm(x: mx.array, weight: mx.array, eps: float) -> mx.array:
    """x * rsqrt(mean(x^2, -1) + eps) * weight, what mx.fast.rms_norm computes. Fused: one pass
    forward and one backward (MLX's CPU rms_norm runs as composed single-threaded ops)."""
    module = fused("rms_norm", x, weight) if weight.ndim == 1 and x.shape[-1:] == weight.shape else None
    if module is None:
        return mx.fast.rms_norm(x, weight, eps)
    return module.rms_norm(x, weight, eps)


def rope(x: mx.array, dims: int, base: float, scale: float, offset: int) -> mx.array:
    """Rotary positions for heads laid out (B, T, H, D), returned as (B, H, T, D): what
    mx.fast.rope(x.transpose(0, 2, 1, 3), dims, traditional=False, base=base, scale=scale,
    offset=offset) computes (nn.RoPE). Fused: the rotation and the transpose copy in one pass
    each way, for the whole head (dims == D)."""
    module = fused("rope", x) if x.ndim == 4 and dims == x.shape[-1] and dims % 2 == 0 else None
    if module is None:
        return mx.fast.rope(
            x.transpose(0, 2, 1, 3), dims, traditional=False, base=base, scale=scale, offset=offset
        )
    half = dims // 2
    # The angles as MLX's rope forms them (tests/test_kernels_step.py checks the result).
    inv_freq = mx.exp(mx.arange(half, dtype=mx.float32) * (-math.log(base) / half))
    positions = mx.arange(offset, offset + x.shape[1], dtype=mx.float32) * scale
    theta = positions[:, None] * inv_freq[None]
    return module.rope(x, mx.cos(theta), mx.sin(theta))


def split_heads(x: mx.array) -> mx.array:
    """(B, T, H, D) -> (B, H, T, D) as a contiguous array: MLX's strided copy (which a matmul on
    the transposed view makes) is single-threaded and generic; fused, one multi-threaded copy."""
    module = fused("heads", x) if x.ndim == 4 else None
    return x.transpose(0, 2, 1, 3) if module is None else module.swap_heads(x, True)


def merge_heads(x: mx.array) -> mx.array:
    """(B, H, T, D) -> (B, T, H * D), attention's output back to the model's layout."""
    B, H, T, D = x.shape
    module = fused("heads", x)
    out = x.transpose(0, 2, 1, 3) if module is None else module.swap_heads(x, False)
    return out.reshape(B, T, H * D)


def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """silu(gate) * up, the Llama MLP's activation."""
    module = fused("swiglu", gate, up) if gate.shape == up.shape else None
    if module is None:
        return nn.silu(gate) * up
    return module.swiglu(gate, up)


@mx.custom_function
def mlx_gelu_gate(gate: mx.array, up: mx.array) -> mx.array:
    """nn.gelu_approx(gate) * up (its values to the bit), the backward recomputing the GELU from
    gate and up: autodiff of nn.gelu_approx keeps its tanh and products for the backward,
    several (rows, intermediate) arrays a layer where this keeps none but the inputs."""
    return nn.gelu_approx(gate) * up


@mlx_gelu_gate.vjp
def _mlx_gelu_gate_vjp(primals: list[mx.array], cotangent: mx.array, output: mx.array
                   ) -> tuple[mx.array, mx.array]:
    # gelu_approx(g) = g (1 + tanh(z)) / 2 = g sigmoid(2z), 2z = 2c (g + 0.044715 g^3), c =
    # sqrt(2 / pi); d/dg = s + g s (1 - s) 2c (1 + 3 * 0.044715 g^2), s = sigmoid(2z). Written
    # with other ops than nn.gelu_approx's on purpose: mx.compile merges an expression the
    # forward also computed (its tanh, its g^3) into one array, which then lives from the
    # forward to the backward: the memory this function is here to save.
    gate, up = primals
    k1 = 2 * math.sqrt(2 / math.pi)
    k3 = k1 * 0.044715
    square = gate * gate
    s = mx.sigmoid(gate * (k1 + k3 * square))
    slope = s + gate * s * (1 - s) * (k1 + 3 * k3 * square)
    return cotangent * up * slope, cotangent * (gate * s)


def gelu_gate(gate: mx.array, up: mx.array) -> mx.array:
    """nn.gelu_approx(gate) * up, the GELU-gated MLP's activation (Gemma's), with a backward that
    reads gate and up alone. Fused: one vectorized, multi-threaded pass each way, the GELU as
    gate * sigmoid(2z) (= gate (1 + tanh(z)) / 2: MLX's CPU tanh is scalar), equal to MLX's to
    float32 rounding; else mlx_gelu_gate."""
    module = fused("gelu_gate", gate, up) if gate.shape == up.shape else None
    return mlx_gelu_gate(gate, up) if module is None else module.gelu_gate(gate, up)


def gelu(x: mx.array) -> mx.array:
    """The exact GELU, x * (1 + erf(x / sqrt(2))) / 2: nn.gelu. Fused: one vectorized,
    multi-threaded pass each way (MLX's CPU erf is scalar and single-threaded) computing MLX's
    own erf and exp op for op, so values and gradients are nn.gelu's to the bit."""
    module = fused("gelu", x)
    return nn.gelu(x) if module is None else module.gelu(x)


def silu(x: mx.array) -> mx.array:
    """x * sigmoid(x): nn.silu (the hybrids' activation after their short convolution). Fused:
    one vectorized, multi-threaded pass each way (MLX's CPU sigmoid is a scalar exp on one
    thread) computing MLX's own sigmoid and exp op for op: values nn.silu's to the bit, and the
    gradient too where x feeds the SiLU alone (else to float32 rounding: csrc/silu.cpp says
    why); the backward reads x alone."""
    module = fused("silu", x)
    return nn.silu(x) if module is None else module.silu(x)


def mlx_depthwise_conv1d(x: mx.array, weight: mx.array, bias: mx.array | None = None,
                         silu: bool = False, positions: mx.array | None = None) -> mx.array:
    """depthwise_conv1d with MLX's ops: nn.Conv1d(C, C, K, groups=C)'s convolution and bias
    (mx.conv1d, then + bias), then nn.silu when `silu`; with `positions`, the sum of the taps
    inside each output's row instead of mx.conv1d."""
    if positions is None:
        y = mx.conv1d(x, weight, groups=x.shape[-1])
    else:
        k, t = weight.shape[1], x.shape[1] - weight.shape[1] + 1
        y = None
        for tap in range(k):  # tap k reads k - (K - 1) tokens back: inside the row or not
            inside = (positions >= k - 1 - tap)[..., None]
            term = mx.where(inside, x[:, tap:tap + t], 0) * weight[:, tap, 0]
            y = term if y is None else y + term
    if bias is not None:
        y = y + bias
    return nn.silu(y) if silu else y


def depthwise_conv1d(x: mx.array, weight: mx.array, bias: mx.array | None = None,
                     silu: bool = False, positions: mx.array | None = None) -> mx.array:
    """The causal depthwise convolution of a hybrid's short convolution (Qwen3.5's gated-delta
    conv1d, Mamba-2's mixer conv, ...): x (B, T + K - 1, C) already left-padded by K - 1 rows,
    weight (C, K, 1) as nn.Conv1d(C, C, K, groups=C) holds it, bias (C,) or None -> (B, T, C),
    then silu(y) when `silu`. `positions` (B, T), each token's place in its row of a packed
    sequence (models/layers/packed_rows.py): no output reads a token before its row's first,
    as a row of its own reads its left padding. Fused: one vectorized, multi-threaded pass each
    way (the backward gives x's, the weight's and the bias's gradients together, recomputing
    the SiLU's input), nn.Conv1d's values and gradients to float32 rounding; MLX's CPU grouped
    convolution runs one output at a time on one thread. Else mlx_depthwise_conv1d."""
    channels = x.shape[-1] if x.ndim == 3 else -1
    shaped = (weight.ndim == 3 and weight.shape[0] == channels and weight.shape[2] == 1
              and x.shape[1] >= weight.shape[1] and (bias is None or bias.shape == (channels,)))
    arrays = (x, weight) if bias is None else (x, weight, bias)
    module = fused("depthwise_conv1d", *arrays) if shaped else None
    if module is None:
        return mlx_depthwise_conv1d(x, weight, bias, silu, positions)
    if positions is None:
        return module.depthwise_conv1d(x, weight, bias, silu)
    return module.depthwise_conv1d(x, weight, bias, silu, positions.astype(mx.int32))


def gated_delta(q: mx.array, k: mx.array, v: mx.array, log_g: mx.array, beta: mx.array,
                state: mx.array, keep: mx.array | None = None, delta: bool = True,
                with_kept: bool = False, span: int = 0) -> tuple[mx.array, ...] | None:
    """The gated delta rule token by token (mlx-lm's `gated_delta_ops`, the gate as its
    logarithm): q, k (B, T, Hk, Dk), v (B, T, Hv, Dv), log_g (B, T, Hv) or (B, T, Hv, Dk), beta
    (B, T, Hv), state (B, Hv, Dv, Dk), keep (B, T) 1/0 or None -> (y (B, T, Hv, Dv), the final
    state), float32. Fused: each row of a head's state is a recurrence of its own, walked four
    rows at a time (csrc/gated_delta.cpp), with a backward that recomputes the states from the
    ones the forward kept every 64 tokens. None where the call takes MLX's path (not the CPU, not float32,
    the op skipped): the caller then computes the rule its own way (the chunked form,
    models/layers/gated_delta.py), which has no kernel of its own to fall back to here.
    delta=False: gated linear attention, S <- g S + beta v k^T (no - S k term): Mamba-2's scan
    (models/layers/ssm_scan.py), the backward the same walk with that term's gradients left out.
    with_kept: a third output, the states the forward keeps for its backward, one every `span`
    tokens (0: the kernel's 64), (B, Hv, T / span rounded up, Dv, Dk): what gated_delta_grad
    takes."""
    arrays = (q, k, v, log_g, beta, state) if keep is None else (q, k, v, log_g, beta, state, keep)
    module = fused("gated_delta", *arrays)
    if module is None:
        return None
    return tuple(module.gated_delta(q, k, v, log_g, beta, state, keep, span, delta, with_kept))


def gated_delta_grad(primals: list[mx.array], kept: mx.array, dy: mx.array, d_state: mx.array,
                     delta: bool = True, span: int = 0) -> tuple[mx.array, ...]:
    """gated_delta's backward without its forward: primals its float32 inputs (q, k, v, log_g,
    beta, state[, keep]), kept the states its call with_kept returned, dy and d_state the
    cotangents of y and of the final state -> the gradients of q, k, v, log_g, beta and the
    state, what its VJP computes (a recompute that kept the forward's outputs calls it, and the
    rule's forward runs once), `span` the forward's. Only where gated_delta took the fused path
    for the same inputs."""
    return tuple(extension().gated_delta_grad(primals, kept, dy, d_state, span, delta))


# The keys draws take instead of the global state's (same_draws), innermost last: each a list
# holding the key the next draw splits
_DRAWING: list[list[mx.array]] = []


@contextlib.contextmanager
def same_draws(key: mx.array) -> Iterator[None]:
    """Dropout inside draws its masks from `key`, split once a draw in call order, not from the
    global state: a pass run twice under the same key (gradient checkpointing's recompute in the
    backward) draws the same masks both times."""
    _DRAWING.append([key])
    try:
        yield
    finally:
        _DRAWING.pop()


def next_key() -> mx.array:
    """The key of the next draw: under same_draws, the next split of its key; otherwise the key
    MLX's next draw without a key would use, advancing the global state as that draw does: MLX's
    key sequence splits the state key in two, keeps the first half as the new state and draws
    with the second (mlx/random.cpp KeySequence::next). A zero-size draw advances it."""
    if _DRAWING:
        holder = _DRAWING[-1]
        holder[0], key = mx.random.split(holder[0])
        return key
    key = mx.random.split(mx.random.state[0])[1]
    mx.random.uniform(shape=(0,))
    return key


def dropout(x: mx.array, p: float) -> mx.array:
    """Inverted dropout, (keep * x) / (1 - p), keep ~ Bernoulli(1 - p): nn.Dropout in training.
    Its key is next_key()'s: outside same_draws, the one MLX's own draw would take (one draw
    from the global random state, as nn.Dropout makes), so its masks and outputs are nn.Dropout's
    to the bit on either path (a seed trains the same run, give or take other kernels'
    rounding), and mx.compile's captured state and bitwise resume work unchanged. Fused: the
    kernel draws MLX's own threefry bits, vectorized on all cores (MLX's draw runs on one)."""
    keep = 1.0 - p
    module = fused("dropout", x)
    if module is None:
        return (mx.random.bernoulli(keep, x.shape, key=next_key()) * x) * (1 / keep)
    return module.dropout(x, next_key(), keep, 1 / keep)


def layer_norm(x: mx.array, weight: mx.array | None, bias: mx.array | None, eps: float) -> mx.array:
    """(x - mean) / sqrt(var + eps) * weight + bias over the last axis: mx.fast.layer_norm.
    Fused for an affine norm (weight and bias (D,)): one pass forward, one backward, each
    MLX's CPU formula and autodiff gradient op for op with its sums in MLX's order, so values
    and gradients are mx.fast.layer_norm's to the bit."""
    affine = weight is not None and bias is not None and weight.ndim == 1
    module = fused("layer_norm", x, weight, bias) if affine and x.shape[-1:] == weight.shape else None
    if module is None:
        return mx.fast.layer_norm(x, weight, bias, eps)
    return module.layer_norm(x, weight, bias, eps)


# Bit widths the dequantize kernel unpacks (a word holds a whole number of values); MLX's other
# affine widths (3, 5, 6) straddle words and take mx.dequantize.
DEQUANTIZE_BITS = (2, 4, 8)


SCALE_DTYPES = (mx.float32, mx.bfloat16, mx.float16)  # the kernels read these and widen them


def _scale_dtype(scales: mx.array, biases: mx.array) -> tuple[mx.array, mx.array]:
    """Scales and biases as the kernels take them: as stored where they read that dtype (no
    float32 copy: a cast here is a graph node, whose output the product would hold from the
    forward to the backward), else cast to float32."""
    if scales.dtype == biases.dtype and scales.dtype in SCALE_DTYPES:
        return scales, biases
    return scales.astype(mx.float32), biases.astype(mx.float32)


def dequantize(w: mx.array, scales: mx.array, biases: mx.array, group_size: int, bits: int,
               dtype: mx.Dtype = mx.float32) -> mx.array:
    """The float weight of an affine-quantized one (mode "affine"), what mx.dequantize computes,
    as `dtype`. Fused for float32 at 2, 4 or 8 bits: vectorized on all cores, ~10x MLX's CPU
    dequantize, with MLX's values to the bit (scales and biases are taken as float32, bf16 / fp16
    ones widened in the kernel; MLX's own dequantize computes in that precision too). Never
    merged with another dequantize of the same weight by mx.compile (the backward's own copy
    must not live from the forward on)."""
    module = fused("dequantize") if bits in DEQUANTIZE_BITS and dtype == mx.float32 else None
    if module is None:
        return mx.dequantize(w, scales, biases, group_size=group_size, bits=bits, dtype=dtype)
    return module.dequantize(w, *_scale_dtype(scales, biases), group_size, bits)


def quantized_product(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array,
                      group_size: int, bits: int) -> mx.array | None:
    """x @ W.T for an affine-quantized W (N, K) and float32 x (..., K), fused: W dequantized a
    block of rows at a time into a scratch buffer and multiplied by the BLAS MLX's matmul calls,
    its VJP in x the same way (x's gradient only: the packed weight is frozen). None where the
    fused path does not run (not the CPU, not float32, bits not 2/4/8, no sgemm to call, op
    skipped, kernels off): the caller takes another path."""
    module = fused("quantized_matmul", x) if bits in DEQUANTIZE_BITS else None
    sgemm = blas.mlx_sgemm() if module is not None else None
    if module is None or not sgemm:
        return None
    module.set_sgemm(sgemm)  # read each call: setup_blas may have rebound libmlx since
    rows = x.reshape(-1, x.shape[-1])
    out = module.quantized_matmul(rows, w, *_scale_dtype(scales, biases), group_size, bits, True)
    return out.reshape(*x.shape[:-1], w.shape[0])


def bf16_matmul(a: mx.array, b: mx.array, ta: bool = False, tb: bool = False) -> mx.array | None:
    """op(a) @ op(b) for float32 matrices, both rounded to bfloat16 and their products summed in
    float32 by MKL on the CPU's bf16 units (runtime/compute/bf16.py), forward and backward; float32
    out. None where that path does not run (not the CPU, not float32, no bf16 units or no MKL,
    op skipped, kernels off): the caller takes another path."""
    module = fused("bf16_matmul", a, b)
    gemm = bf16.gemm_bf16()[0] if module is not None else None
    if module is None or gemm is None:
        return None
    module.set_gemm_bf16(gemm.address, gemm.local_threads, gemm.below)
    return module.bf16_matmul(a, b, ta, tb)


def bf16_product(x: mx.array, w: mx.array) -> mx.array | None:
    """x @ W.T (nn.Linear's product) for x (..., K) and W (N, K) through bf16_matmul, or None."""
    out = bf16_matmul(x.reshape(-1, x.shape[-1]), w, False, True)
    return None if out is None else out.reshape(*x.shape[:-1], w.shape[0])


def clip_grad_norm(grads: dict, max_norm: float) -> tuple[dict, mx.array]:
    """mlx.optimizers.clip_grad_norm: every gradient scaled by min(max_norm / (norm + 1e-6), 1),
    and the global norm. Fused (every float32 gradient in one kernel call, the norm summed in
    float64, so its last bits may differ from MLX's float32 sums) on the CPU; max_norm <= 0
    leaves the gradients as they are and returns their norm."""
    flat = tree_flatten(grads)
    module = fused("clip_grad_norm", *(g for _, g in flat)) if flat else None
    clipping = bool(max_norm) and max_norm > 0
    if module is None:
        if clipping:
            return optim.clip_grad_norm(grads, max_norm)
        norm = mx.sqrt(sum((g.astype(mx.float32) ** 2).sum() for _, g in flat))
        return grads, norm
    out = module.clip_global_norm([g for _, g in flat], max_norm if clipping else math.inf)
    if not clipping:
        return grads, out[-1]
    return tree_unflatten(list(zip((k for k, _ in flat), out[:-1]))), out[-1]
