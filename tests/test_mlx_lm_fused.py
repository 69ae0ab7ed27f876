"""mlx-lm's decoders through mlxlab's fused CPU kernels (models/mlx_lm_fused.py, issue 54): a
loaded llama / qwen3 takes the fused attention, SwiGLU, RMSNorm and RoPE on the CPU, with logits and
LoRA gradients equal to mlx-lm's own code (the kernels off) to float32 rounding; where the fused
path does not apply (kernels off, a KV cache, another dtype) the wrappers run mlx-lm's functions
to the bit."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from hf_helpers import save_tiny_model
from mlxlab import kernels
from mlxlab.models import layers
from mlxlab.models.mlx_lm_decoder import MLXLMDecoder
from mlxlab.models.mlx_lm_fused import ORIGINALS, RoPE

LORA = {"rank": 4, "alpha": 8.0, "targets": ["query", "key", "value", "out", "gate_proj"]}


@pytest.fixture
def kernel_mode():
    before = kernels.mode()
    yield kernels.set_mode
    kernels.set_mode(before)


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
    assert any(isinstance(m, layers.RMSNorm) for m in model.lm.modules())
    assert any(isinstance(m, RoPE) for m in model.lm.modules())
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
    np.testing.assert_allclose(fused_logits, ref_logits, rtol=1e-4, atol=1e-4)
    assert fused_grads.keys() == ref_grads.keys() and any("lora" in k for k in ref_grads)
    for name, g in ref_grads.items():
        scale = max(float(np.abs(g).max()), 1e-6)
        np.testing.assert_allclose(fused_grads[name], g, rtol=0, atol=1e-4 * scale, err_msg=name)


def test_wrappers_run_mlx_lm_where_the_kernels_do_not_apply(tmp_path, kernel_mode):
    from mlx_lm.models import activations, base
    from mlx_lm.models.cache import KVCache

    from mlxlab.models.mlx_lm_fused import fused_attention, fused_swiglu

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
