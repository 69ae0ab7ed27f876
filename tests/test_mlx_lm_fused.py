"""mlx-lm's decoders through mlxlab's fused CPU kernels (models/decoders/mlx_lm_fused.py): a loaded
llama / qwen3 takes the fused attention, SwiGLU, RMSNorm and RoPE on the CPU, a Gemma 3 its (1 +
weight) norms, its GELU-gated MLP (the backward recomputing the GELU) and its attention, with logits
and LoRA gradients equal to mlx-lm's own code (the kernels off) to float32 rounding; where the fused
path does not apply (kernels off, a KV cache, another dtype) the wrappers run mlx-lm's functions to
the bit. A Gemma 3 LoRA step's MLX peak stays below mlx-lm's own training step's."""

from __future__ import annotations

import io
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from hf_helpers import save_tiny_model
from mlxlab import kernels
from mlxlab.kernels.dispatch import OPS
from mlxlab.models.decoders.mlx_lm_decoder import MLXLMDecoder
from mlxlab.models.decoders.mlx_lm_fused import (
    ORIGINALS,
    GemmaAttention,
    GemmaMLP,
    GemmaRMSNorm,
    RoPE,
)
from mlxlab.models.layers import blocks

LORA = {"rank": 4, "alpha": 8.0, "targets": ["query", "key", "value", "out", "gate_proj"]}


def logits_and_grads(model: MLXLMDecoder, ids: mx.array) -> tuple[np.ndarray, dict]:
    def loss(m):
        return nn.losses.cross_entropy(m(ids[:, :-1]), ids[:, 1:]).mean()

    value_grad = nn.value_and_grad(model, loss)
    _, grads = value_grad(model)
    logits = model(ids)
    mx.eval(logits, grads)
    return np.array(logits), {k: np.array(v) for k, v in tree_flatten(grads)}


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_fused_decoder_equals_mlx_lm(kind, tmp_path, kernel_mode, monkeypatch):
    if kernels.extension() is None:
        pytest.skip("the fused kernels do not build here")
    folder = save_tiny_model(kind, tmp_path / kind, num_attention_heads=4, num_key_value_heads=2)
    model = MLXLMDecoder(vocab_size=0, pretrained=str(folder), lora=LORA)
    module = __import__(type(model.lm).__module__, fromlist=["x"])
    # the loaded model's attention and SwiGLU are the wrappers, its norms the fused RMSNorm
    assert module.scaled_dot_product_attention in ORIGINALS
    assert module.swiglu in ORIGINALS
    assert all(type(m) is not nn.RMSNorm for m in model.lm.modules())
    assert any(isinstance(m, blocks.RMSNorm) for m in model.lm.modules())
    assert any(isinstance(m, RoPE) for m in model.lm.modules())
    assert_fused_equals_mlx_lm(model, kernel_mode, monkeypatch)


def test_long_rows_pass_causal_to_the_blocked_kernel(tmp_path, kernel_mode, monkeypatch):
    """The wrapper hands kernels.attention mlx-lm's "causal" as it is; from
    kernels.ops.BLOCKED_MIN_KEYS keys on (16 here) that runs the blocked kernel's causal flag (no
    (T, T) mask array), below it the additive mask on the whole-scores path (MLX's bits); either
    way mlx-lm's logits and LoRA gradients."""
    if kernels.extension() is None:
        pytest.skip("the fused kernels do not build here")
    from mlxlab.kernels import ops

    folder = save_tiny_model("qwen3", tmp_path / "qwen3", num_attention_heads=4,
                             num_key_value_heads=2)
    model = MLXLMDecoder(vocab_size=0, pretrained=str(folder), lora=LORA)
    masks, flags = [], []
    original = kernels.attention
    monkeypatch.setattr(kernels, "attention",
                        lambda q, k, v, scale, mask: masks.append(mask) or original(
                            q, k, v, scale, mask))
    blocked = ops._blocked_attention
    monkeypatch.setattr(ops, "_blocked_attention",
                        lambda *a, causal=False: flags.append(causal) or blocked(*a, causal=causal))
    monkeypatch.setattr(ops, "BLOCKED_MIN_KEYS", 16)
    assert_fused_equals_mlx_lm(model, kernel_mode, monkeypatch)
    assert masks and all(isinstance(m, str) and m == "causal" for m in masks)
    assert flags and all(flags)
    monkeypatch.setattr(ops, "BLOCKED_MIN_KEYS", 64)
    masks.clear()
    flags.clear()
    assert_fused_equals_mlx_lm(model, kernel_mode, monkeypatch)
    assert masks and all(isinstance(m, str) and m == "causal" for m in masks)
    assert not flags


def assert_fused_equals_mlx_lm(model: MLXLMDecoder, kernel_mode, monkeypatch,
                               tolerance: float = 1e-4) -> None:
    """Logits and LoRA gradients with the kernels on (every layer's attention through
    kernels.attention) equal those with them off (mlx-lm's own code) to `tolerance`."""
    ids = mx.array(np.random.default_rng(0).integers(0, model.vocab_size, (2, 33)))
    calls = []
    original = kernels.attention  # counted: the wrapper reaches it on the CPU, kernels on
    monkeypatch.setattr(kernels, "attention", lambda *a: calls.append(1) or original(*a))
    kernel_mode("on")
    fused_logits, fused_grads = logits_and_grads(model, ids)
    assert len(calls) == len(model.layers) * 2  # every layer, in both forward passes
    kernel_mode("off")  # mlx-lm's own functions and mx.fast.rms_norm throughout
    ref_logits, ref_grads = logits_and_grads(model, ids)
    assert len(calls) == len(model.layers) * 2  # none more with the kernels off
    np.testing.assert_allclose(fused_logits, ref_logits, rtol=tolerance, atol=tolerance)
    assert fused_grads.keys() == ref_grads.keys() and any("lora" in k for k in ref_grads)
    for name, g in ref_grads.items():
        scale = max(float(np.abs(g).max()), 1e-6)
        np.testing.assert_allclose(fused_grads[name], g, rtol=0, atol=tolerance * scale,
                                   err_msg=name)


def test_fused_gemma3_equals_mlx_lm(tmp_path, kernel_mode, monkeypatch):
    """Gemma 3 (a sliding-window layer, its mask an array at 32 positions over a window of 16,
    then a global one): its norms, MLPs and attentions are mlx-lm's classes with mlxlab's
    __call__, and compute mlx-lm's logits and LoRA gradients (gate_proj's adapters included:
    their gradient goes through kernels.gelu_gate's backward) to 1e-5."""
    if kernels.extension() is None:
        pytest.skip("the fused kernels do not build here")
    from mlx_lm.models import gemma3_text

    folder = save_tiny_model("gemma3_text", tmp_path / "gemma", num_attention_heads=4,
                             num_key_value_heads=2)
    model = MLXLMDecoder(vocab_size=0, pretrained=str(folder), lora=LORA)
    for mixin, original, count in ((GemmaRMSNorm, gemma3_text.RMSNorm, 4 * 2 + 1 + 2 * 2),
                                   (GemmaMLP, gemma3_text.MLP, 2),
                                   (GemmaAttention, gemma3_text.Attention, 2)):
        swapped = [m for m in model.lm.modules() if isinstance(m, original)]
        assert len(swapped) == count and all(isinstance(m, mixin) for m in swapped)
    assert gemma3_text.scaled_dot_product_attention in ORIGINALS
    gates = []  # the MLPs reach kernels.gelu_gate with the kernels on, mlx-lm's code off
    gelu_gate = kernels.gelu_gate
    monkeypatch.setattr(kernels, "gelu_gate", lambda *a: gates.append(1) or gelu_gate(*a))
    assert_fused_equals_mlx_lm(model, kernel_mode, monkeypatch, tolerance=1e-5)
    assert len(gates) == len(model.layers) * 2


@pytest.mark.parametrize("mode", ["on", "off"])
def test_gelu_gate_equals_autodiff_of_mlx_lm_activation(mode, kernel_mode):
    """kernels.gelu_gate (the fused kernel; kernels off: mlx_gelu_gate, the MLX formulation)
    computes nn.gelu_approx(gate) * up and autodiff's gradients to float32 rounding, over the
    GELU's curved range and far into both tails; the MLX formulation's values to the bit."""
    if mode == "on" and kernels.extension() is None:
        pytest.skip("the fused kernels do not build here")
    kernel_mode(mode)
    rng = np.random.default_rng(2)
    gate = mx.array(np.concatenate([rng.normal(0, 2, 500), [-30.0, -8.0, 0.0, 8.0, 30.0]])
                    .astype(np.float32)).reshape(5, 101)
    up = mx.array(rng.normal(size=gate.shape).astype(np.float32))
    cot = mx.array(rng.normal(size=gate.shape).astype(np.float32))

    def reference(g, u):
        return nn.gelu_approx(g) * u

    ours, theirs = kernels.gelu_gate(gate, up), reference(gate, up)
    dot = io.StringIO()  # the path taken: the extension's primitive only with the kernels on
    mx.export_to_dot(dot, ours)
    assert ("MlxlabGeluGate" in dot.getvalue()) == (mode == "on")
    np.testing.assert_allclose(np.array(ours), np.array(theirs), rtol=1e-5, atol=1e-6)
    assert mx.array_equal(kernels.mlx_gelu_gate(gate, up), theirs).item()
    _, our_grads = mx.vjp(kernels.gelu_gate, [gate, up], [cot])
    _, their_grads = mx.vjp(reference, [gate, up], [cot])
    for a, b in zip(our_grads, their_grads):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-5, atol=1e-6)


def test_wrappers_run_mlx_lm_where_the_kernels_do_not_apply(tmp_path, kernel_mode):
    from mlx_lm.models import activations, base
    from mlx_lm.models.cache import KVCache

    from mlxlab.models.decoders.mlx_lm_fused import fused_attention, fused_swiglu

    attention = fused_attention(base.scaled_dot_product_attention)
    swiglu = fused_swiglu(activations.swiglu)
    rng = np.random.default_rng(1)
    q, k, v = (mx.array(rng.normal(size=(1, 4, 8, 16)).astype(np.float32)) for _ in range(3))
    gate, up = (mx.array(rng.normal(size=(3, 8, 32)).astype(np.float32)) for _ in range(2))

    def same(a, b):
        return mx.array_equal(a, b).item()

    kernel_mode("off")
    assert same(attention(q, k, v, None, 0.25, "causal"),
                base.scaled_dot_product_attention(q, k, v, None, scale=0.25, mask="causal"))
    assert same(swiglu(gate, up), activations.swiglu(gate, up))
    kernel_mode("auto")
    cache = KVCache()  # generation: mlx-lm's own path, whatever the kernels
    assert same(attention(q, k, v, cache, 0.25, "causal"),
                base.scaled_dot_product_attention(q, k, v, None, scale=0.25, mask="causal"))
    half = [x.astype(mx.bfloat16) for x in (q, k, v)]  # not float32: mlx-lm's SDPA
    assert same(attention(*half, None, 0.25, "causal"),
                base.scaled_dot_product_attention(*half, None, scale=0.25, mask="causal"))


def test_a_gated_norms_precise_swiglu_takes_the_fused_swiglu_in_float32(tmp_path, kernel_mode,
                                                                       monkeypatch):
    """The gated norm's `precise_swiglu(h, gate, x)` of a loaded Qwen3.5 (Qwen3-Next's and
    OLMo-Hybrid's norms call the same name) is the wrapper: float32
    throughout, kernels.swiglu (mlx-lm's value to float32 rounding); another dtype, the op
    skipped or the kernels off, mlx-lm's own function to the bit."""
    from mlx_lm.models import activations

    from hybrid_families import save_tiny_hybrid

    if kernels.extension() is None:
        pytest.skip("the fused kernels do not build here")
    model = MLXLMDecoder(vocab_size=0, pretrained=str(save_tiny_hybrid("qwen3_5", tmp_path)))
    wrappers = {vars(m)["precise_swiglu"] for m in map(sys.modules.get, {
        type(x).__module__ for x in model.lm.modules()}) if "precise_swiglu" in vars(m)}
    (wrapper,) = wrappers
    assert ORIGINALS[wrapper] is activations.precise_swiglu
    calls = []
    swiglu = kernels.swiglu
    monkeypatch.setattr(kernels, "swiglu", lambda g, x: calls.append(1) or swiglu(g, x))
    rng = np.random.default_rng(2)
    h, gate, x = (mx.array(rng.normal(size=(2, 7, 33)).astype(np.float32)) for _ in range(3))
    np.testing.assert_allclose(np.array(wrapper(h, gate, x)),
                               np.array(activations.precise_swiglu(h, gate, x)), rtol=1e-6)
    assert calls == [1]
    half = h.astype(mx.bfloat16)
    assert mx.array_equal(wrapper(half, gate, x), activations.precise_swiglu(half, gate, x))
    kernel_mode("off")
    assert mx.array_equal(wrapper(h, gate, x), activations.precise_swiglu(h, gate, x))
    assert calls == [1]


def test_the_gated_delta_layers_norms_take_the_fused_rms_norm(tmp_path, kernel_mode, monkeypatch):
    """A loaded Qwen3.5's `normalize_qk` (q and k l2-normalized) is the wrapper and its gated norm
    mlx-lm's class with GatedRMSNorm's __call__: in float32 both norm through kernels.rms_norm, to
    mlx-lm's values and gradients within float32 rounding; the kernels off, mlx-lm's own to the
    bit."""
    from mlx_lm.models import gated_delta, qwen3_next

    from hybrid_families import save_tiny_hybrid
    from mlxlab.models.decoders.mlx_lm_fused import GatedRMSNorm

    if kernels.extension() is None:
        pytest.skip("the fused kernels do not build here")
    model = MLXLMDecoder(vocab_size=0, pretrained=str(save_tiny_hybrid("qwen3_5", tmp_path)))
    modules = {sys.modules[type(x).__module__] for x in model.lm.modules()}
    wrappers = [vars(m)["normalize_qk"] for m in modules if "normalize_qk" in vars(m)]
    assert wrappers and all(ORIGINALS[w] is gated_delta.normalize_qk for w in wrappers)
    wrapper = vars(sys.modules["mlx_lm.models.qwen3_5"])["normalize_qk"]  # the layers' module
    norms = [m for m in model.lm.modules() if isinstance(m, qwen3_next.Qwen3NextRMSNormGated)]
    assert norms and all(isinstance(m, GatedRMSNorm) for m in norms)
    calls = []
    rms_norm = kernels.rms_norm
    monkeypatch.setattr(kernels, "rms_norm", lambda x, w, eps: calls.append(1) or rms_norm(x, w, eps))
    rng = np.random.default_rng(3)
    q, k, x, gate, cot = (mx.array(rng.normal(size=(2, 9, 3, 16)).astype(np.float32))
                          for _ in range(5))

    def ours_qk(q, k):
        return sum((a * cot).sum() for a in wrapper(q, k, inv_scale=0.25, eps=1e-6))

    def theirs_qk(q, k):
        return sum((a * cot).sum() for a in gated_delta.normalize_qk(q, k, inv_scale=0.25, eps=1e-6))

    norm = norms[0]

    def ours_norm(x, gate):
        return (norm(x, gate) * cot).sum()

    def theirs_norm(x, gate):
        return (qwen3_next.Qwen3NextRMSNormGated.__call__(norm, x, gate) * cot).sum()

    for ours, theirs in ((ours_qk, theirs_qk), (ours_norm, theirs_norm)):
        args = (q, k) if ours is ours_qk else (x, gate)
        (a, ga), (b, gb) = (mx.value_and_grad(f, argnums=(0, 1))(*args) for f in (ours, theirs))
        np.testing.assert_allclose(a.item(), b.item(), rtol=1e-5)
        for u, v in zip(ga, gb):
            np.testing.assert_allclose(np.array(u), np.array(v), rtol=1e-4, atol=1e-6)
    assert len(calls) >= 3  # q's and k's norms, the gated norm's
    kernel_mode("off")
    calls.clear()
    for got, want in zip(wrapper(q, k, inv_scale=0.25, eps=1e-6),
                         gated_delta.normalize_qk(q, k, inv_scale=0.25, eps=1e-6)):
        assert mx.array_equal(got, want).item()
    assert mx.array_equal(norm(x, gate), qwen3_next.Qwen3NextRMSNormGated.__call__(norm, x, gate))
    assert calls == []


def step_peak_bytes(run_step) -> int:
    """MLX's peak memory over two training steps above what was allocated before them (the
    second step runs the compiled graph the first traced)."""
    mx.eval(mx.array(0.0))
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    for _ in range(2):
        run_step()
    return mx.get_peak_memory() - before


def training_step_peaks(folder, ids: mx.array) -> tuple[int, int]:
    """(mlx_lm.lora's, mlxlab's) MLX peak bytes over two LoRA steps (rank 8 on q/k/v/o) on the
    rows `ids` of `folder`: mlx_lm.tuner.trainer's loss and compiled Adam update on mlx-lm's own
    loaded model, and mlxlab's make_step (its loss and AdamW) on the folder as mlxlab loads it."""
    from functools import partial

    import mlx.optimizers as optim
    from mlx_lm.tuner.trainer import default_loss
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model

    from mlxlab.objectives import losses
    from mlxlab.training.settings import TrainerSettings
    from mlxlab.training.step import make_step

    rows, width = ids.shape[0], ids.shape[1] - 1
    theirs, _ = load_model(folder)  # mlx_lm.lora's model, adapters and step
    theirs.freeze()
    linear_to_lora_layers(theirs, -1, {"rank": 8, "dropout": 0.0, "scale": 2.0, "keys": [
        f"self_attn.{p}_proj" for p in "qkvo"]})
    adam = optim.Adam(learning_rate=2e-4)
    state = [theirs.state, adam.state, mx.random.state]
    value_and_grad = nn.value_and_grad(theirs, default_loss)

    @partial(mx.compile, inputs=state, outputs=state)
    def their_step(batch, lengths):
        (loss, _), grads = value_and_grad(theirs, batch, lengths)
        adam.update(theirs, grads)
        return loss

    lengths = mx.array([[0, width + 1]] * rows)
    mx.eval(theirs.parameters())
    # mlx-lm's own code even where an earlier MLXLMDecoder wrapped its module's functions (the
    # wrappers are process-wide and fall through to mlx-lm's when their op is skipped)
    kernels.set_skip(OPS)
    try:
        their_peak = step_peak_bytes(lambda: mx.eval(their_step(ids, lengths), state))
    finally:
        kernels.set_skip(None)

    ours = MLXLMDecoder(vocab_size=0, pretrained=str(folder),
                        lora={"rank": 8, "alpha": 16.0, "targets": ["query", "key", "value", "out"]})
    step = make_step(ours, kernels.AdamW(learning_rate=2e-4), losses.task_loss("lm"),
                     TrainerSettings(max_steps=2))
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": mx.ones((rows, width))}
    mx.eval(ours.parameters(), batch)
    return their_peak, step_peak_bytes(lambda: step([batch]))


def test_gemma3_lora_step_peak_is_below_mlx_lm_training(tmp_path, kernel_mode):
    """LoRA's peak memory on a tiny Gemma 3 built here: mlxlab's compiled LoRA step (make_step,
    its loss and AdamW) on the loaded model peaks below mlx_lm.lora's own step
    (mlx_lm.tuner.trainer's loss and compiled update) on the same folder, rows and adapters, by at
    least two (rows, intermediate) float32 arrays per layer: what kernels.gelu_gate does not keep
    of what autodiff of nn.gelu_approx keeps (its tanh and products)."""
    if kernels.extension() is None:
        pytest.skip("the fused kernels do not build here")
    rows, width, intermediate, layers = 4, 128, 512, 2
    folder = save_tiny_model("gemma3_text", tmp_path / "gemma", intermediate_size=intermediate,
                             num_hidden_layers=layers, max_position_embeddings=512)
    kernel_mode("auto")
    ids = mx.array(np.random.default_rng(0).integers(1, 64, (rows, width + 1)).astype(np.int32))
    their_peak, our_peak = training_step_peaks(folder, ids)
    one_array = rows * width * intermediate * 4
    assert our_peak <= their_peak - layers * one_array, (our_peak, their_peak)


def test_a_4bit_llama_lora_step_peaks_below_mlx_lm_training(tmp_path, kernel_mode):
    """QLoRA's peak memory on a tiny 4-bit folder from `mlx_lm.convert -q`: mlxlab's step (the
    packed base through the fused quantized product, its scratch block included) peaks below
    mlx_lm.lora's on the same folder by at least one (rows, intermediate) float32 a layer: the
    fused SwiGLU keeps gate and up where mlx-lm's compiled silu(gate) * up keeps two
    more (on the 302M benchmark, 152 MB of mlx_lm.lora's 719; docs/benchmarks.md)."""
    if kernels.extension() is None:
        pytest.skip("the fused kernels do not build here")
    from mlx_lm.convert import convert

    rows, width, intermediate, layers = 4, 128, 1024, 2
    folder = save_tiny_model("llama", tmp_path / "llama", hidden_size=256,
                             intermediate_size=intermediate, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2)
    convert(str(folder), str(tmp_path / "q4"), quantize=True, q_bits=4, q_group_size=64,
            dtype="float32")
    kernel_mode("auto")
    ids = mx.array(np.random.default_rng(0).integers(1, 300, (rows, width + 1)).astype(np.int32))
    their_peak, our_peak = training_step_peaks(tmp_path / "q4", ids)
    one_array = rows * width * intermediate * 4
    assert our_peak <= their_peak - layers * one_array, (our_peak, their_peak)
