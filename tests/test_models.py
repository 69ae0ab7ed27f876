"""Models room: shapes, masking, KV cache, generation, presets, LoRA, HF loading, and forwards
checked against NumPy written from the equations."""

import itertools
import json
import math
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from hydra.utils import instantiate
from mlx.utils import tree_flatten
from omegaconf import OmegaConf

from mlxlab.config import compose_config
from mlxlab.decoding.generation import generate_tokens
from mlxlab.models import BertClassifier, CNNHybrid, Transformer, num_parameters
from mlxlab.models.adapters.lora import (
    LoRALinear,
    adapter_parameters,
    apply_lora,
    fuse_lora,
    load_adapters,
    load_base_weights,
    lora_base_name_map,
    save_adapters,
)
from mlxlab.models.encoders.bert_hf import hf_to_mlxlab_name, load_hf_bert_weights
from mlxlab.models.layers.blocks import KVCache


def model_config(name: str):
    """conf/model/<name>.yaml composed as train.py composes it (its defaults: the transformer
    base, the LoRA node), as a mutable DictConfig."""
    cfg = compose_config(Path(__file__).resolve().parents[1], [f"model={name}"])
    return OmegaConf.create(OmegaConf.to_container(cfg.model))
V = 97


def ids(shape, seed=0, vocab=V):
    # stay 8 below the vocabulary so tests can shift ids (x + 5) and remain in range
    return mx.random.randint(1, vocab - 8, shape, key=mx.random.key(seed)).astype(mx.int32)


def right_pad_mask(lengths, T):
    return (mx.arange(T)[None, :] < mx.array(lengths)[:, None]).astype(mx.int32)


def tiny_decoder(**kw):
    cfg = dict(vocab_size=V, dim=32, num_layers=2, num_heads=4, max_seq_len=64)
    cfg.update(kw)
    model = Transformer(**cfg)
    model.eval()
    return model


def tiny_bert(**kw):
    cfg = dict(vocab_size=V, num_labels=3, hidden_size=32, num_layers=2, num_heads=4)
    cfg.update(kw)
    model = BertClassifier(**cfg)
    model.eval()
    return model


def randomize(model, seed=1, scale=0.3):
    """Non-trivial values everywhere (norm weights, biases, LoRA B) so tests see every term."""
    key = mx.random.key(seed)
    new = []
    for i, (name, p) in enumerate(tree_flatten(model.parameters())):
        new.append(
            (name, p + scale * mx.random.normal(p.shape, key=mx.random.split(key, i + 1)[i]))
        )
    model.load_weights(new)
    mx.eval(model.parameters())


# ---------------------------------------------------------------- shapes and masking


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"norm_position": "pre", "pooler": False},
        {"type_vocab_size": 0, "intermediate_size": 48},
    ],
)
def test_bert_shapes(kw):
    model = tiny_bert(**kw)
    out = model(ids((2, 9)), right_pad_mask([9, 4], 9))
    assert out.shape == (2, 3)
    assert np.isfinite(np.array(out)).all()


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"norm": "layernorm", "mlp": "gelu", "positions": "learned"},
        {"tie_embeddings": False, "num_kv_heads": 2, "mlp_dim": 40},
    ],
)
def test_decoder_shapes(kw):
    model = tiny_decoder(**kw)
    assert model(ids((2, 7))).shape == (2, 7, V)


def _np_gelu(x):
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


_NP_ACTIVATIONS = {
    "swiglu": lambda g, u: g / (1 + np.exp(-g)) * u,
    "geglu": lambda g, u: _np_gelu(g) * u,
    "gelu": _np_gelu,
    "relu": lambda x: np.maximum(x, 0.0),
    "silu": lambda x: x / (1 + np.exp(-x)),
}


@pytest.mark.parametrize("kind", list(_NP_ACTIVATIONS))
def test_every_decoder_mlp_computes_its_activation(kind):
    """model.mlp: gated kinds are down(act(gate x) * up x), plain ones down(act(up x)), each
    against NumPy; all default to ~8*dim^2 parameters, so switching keeps the model size."""
    from mlxlab.models.layers.blocks import make_mlp

    mlp = make_mlp(kind, 24, None, bias=True)
    randomize(mlp)
    x = np.random.default_rng(0).normal(size=(3, 24)).astype(np.float32) * 2
    p = {k: np.array(v, dtype=np.float64) for k, v in tree_flatten(mlp.parameters())}

    def dense(h, name):
        return h @ p[f"{name}.weight"].T + p[f"{name}.bias"]

    act = _NP_ACTIVATIONS[kind]
    hidden = act(dense(x, "gate"), dense(x, "up")) if "gate" in mlp else act(dense(x, "up"))
    np.testing.assert_allclose(np.array(mlp(mx.array(x))), dense(hidden, "down"), atol=1e-4,
                               rtol=1e-4)
    assert ("gate" in mlp) == kind.endswith("glu")
    assert abs(num_parameters(mlp) - 8 * 24 * 24) / (8 * 24 * 24) < 0.2
    model = tiny_decoder(mlp=kind)
    assert model(ids((2, 7))).shape == (2, 7, V) and model.architecture["mlp"] == kind


def test_unknown_mlp_fails_with_the_choices():
    with pytest.raises(ValueError, match=r"unknown mlp='tanh'; use one of \['swiglu', 'geglu', "
                       r"'gelu', 'relu', 'silu'\]"):
        tiny_decoder(mlp="tanh")


@pytest.mark.parametrize("use_encoder", [True, False])
def test_cnn_hybrid_shapes_and_short_sequences(use_encoder):
    model = CNNHybrid(
        V,
        2,
        hidden_size=32,
        cnn_kernels=[2, 5],
        cnn_filters=8,
        use_encoder=use_encoder,
        num_heads=4,
    )
    model.eval()
    # length 1 is shorter than every kernel: still a finite output
    out = model(ids((3, 6)), right_pad_mask([6, 3, 1], 6))
    assert out.shape == (3, 2)
    assert np.isfinite(np.array(out)).all()


def _padding_invariance(model):
    randomize(model)  # the N(0, 0.02) init makes every output nearly the same
    x = ids((2, 10))
    mask = right_pad_mask([10, 6], 10)
    base = np.array(model(x, mask))
    x_pad = x.at[1, 6:].add(5)  # other tokens in the padded slots only
    np.testing.assert_allclose(np.array(model(x_pad, mask)), base, atol=1e-6)
    x_real = x.at[1, 2].add(5)  # a real token of row 1: row 1 must change, row 0 not
    changed = np.array(model(x_real, mask))
    assert np.abs(changed[1] - base[1]).max() > 1e-4
    np.testing.assert_allclose(changed[0], base[0], atol=1e-6)
    # and without the mask the padded tokens do matter (the mask is what hides them)
    assert np.abs(np.array(model(x_pad)) - np.array(model(x)))[1].max() > 1e-4


def test_bert_padding_mask_masks():
    for norm_position in ("post", "pre"):
        _padding_invariance(tiny_bert(norm_position=norm_position))


def test_cnn_hybrid_padding_mask_masks():
    for use_encoder in (True, False):
        model = CNNHybrid(V, 2, hidden_size=32, cnn_filters=8, use_encoder=use_encoder)
        model.eval()
        _padding_invariance(model)


def test_decoder_left_padding_mask_masks():
    model = tiny_decoder()
    randomize(model)
    x = ids((2, 8))
    mask = mx.array([[1] * 8, [0, 0, 0] + [1] * 5], dtype=mx.int32)
    base = np.array(model(x, mask))
    x_pad = x.at[1, :3].add(7)
    out = np.array(model(x_pad, mask))
    np.testing.assert_allclose(out[:, 3:], base[:, 3:], atol=1e-5)
    assert np.abs(np.array(model(x_pad))[1, 3:] - base[1, 3:]).max() > 1e-4


def test_bad_arguments_give_clear_errors():
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        tiny_bert(hidden_size=30)
    with pytest.raises(ValueError, match="norm_position"):
        tiny_bert(norm_position="middle")
    with pytest.raises(ValueError, match="num_kv_heads"):
        tiny_decoder(num_kv_heads=3)
    with pytest.raises(ValueError, match="unknown norm"):
        tiny_decoder(norm="batchnorm")
    with pytest.raises(ValueError, match="dropout"):
        tiny_decoder(dropout=1.5)
    with pytest.raises(ValueError, match="max_position"):
        tiny_bert(max_position=8)(ids((1, 9)))
    with pytest.raises(ValueError, match="max_seq_len"):
        tiny_decoder(max_seq_len=8)(ids((1, 9)))
    with pytest.raises(ValueError, match="cnn_kernels"):
        CNNHybrid(V, 2, cnn_kernels=[])


# ---------------------------------------------------------------- KV cache and generation


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_kv_cache_matches_full_forward(positions, monkeypatch):
    monkeypatch.setattr(KVCache, "step", 4)  # force the buffers to grow several times
    model = tiny_decoder(positions=positions, num_kv_heads=2)
    x = ids((2, 13))
    full = model(x)
    cache = model.make_cache()
    parts = [model(x[:, :5], cache=cache)]
    parts += [model(x[:, t : t + 1], cache=cache) for t in range(5, 13)]
    np.testing.assert_allclose(np.array(mx.concatenate(parts, axis=1)), np.array(full), atol=1e-5)
    assert cache[0].offset == 13
    # left-padded batch: the mask covers cached + new positions at every call
    mask = mx.array([[1] * 13, [0] * 4 + [1] * 9], dtype=mx.int32)
    full = model(x, mask)
    cache = model.make_cache()
    parts = [model(x[:, :6], mask[:, :6], cache=cache)]
    parts += [model(x[:, t : t + 1], mask[:, : t + 1], cache=cache) for t in range(6, 13)]
    real = np.array(mask, dtype=bool)  # padded queries see no key: their output is arbitrary
    out = np.array(mx.concatenate(parts, axis=1))
    np.testing.assert_allclose(out[real], np.array(full)[real], atol=1e-5)
    with pytest.raises(ValueError, match="cached"):
        model(x[:, :1], mask[:, :1], cache=cache)


@pytest.mark.parametrize("fused_kernels", ["auto", "off"])
def test_decoder_passes_causal_where_it_is_exact(fused_kernels, kernel_mode, monkeypatch):
    """With no padding and nothing cached the decoder's layers get mask="causal" (no (T, T)
    array of its own; kernels.attention builds one only where the blocked kernel does not run),
    with the logits of the explicit additive mask to the bit; a chunk after cached positions
    gets the explicit (T, cached + T) array, its logits the full forward's rows."""
    from mlxlab import kernels

    kernel_mode(fused_kernels)
    model = tiny_decoder(num_kv_heads=2)
    x = ids((2, 13))
    masks = []
    attend = kernels.attention
    monkeypatch.setattr(kernels, "attention",
                        lambda q, k, v, scale, mask: masks.append(mask) or attend(
                            q, k, v, scale, mask))
    full = model(x)
    assert masks and all(isinstance(m, str) and m == "causal" for m in masks)
    h = model.embed_tokens(x)
    for layer in model.layers:
        h = layer(h, kernels.causal_additive_mask(13, 13))
    explicit = model.embed_tokens.as_linear(model.norm(h))
    np.testing.assert_array_equal(np.array(full), np.array(explicit))
    cache = model.make_cache()
    model(x[:, :5], cache=cache)
    masks.clear()
    chunk = model(x[:, 5:9], cache=cache)
    assert masks and all(isinstance(m, mx.array) and m.shape == (4, 9) for m in masks)
    np.testing.assert_allclose(np.array(chunk), np.array(full[:, 5:9]), atol=1e-5)


def test_generation_reproducible_and_uses_cache():
    model = tiny_decoder()
    prompt = [3, 14, 15]

    def run(seed, **kw):
        return list(itertools.islice(generate_tokens(model, prompt, seed=seed, **kw), 12))

    assert run(7) == run(7)
    assert run(7) != run(8)
    assert run(7, top_k=5, top_p=0.8) == run(7, top_k=5, top_p=0.8)
    assert all(0 <= t < V for t in run(3, top_k=5, top_p=0.8))
    # greedy with the cache == greedy by repeated full forwards
    greedy = list(itertools.islice(generate_tokens(model, prompt, temperature=0), 8))
    seq = list(prompt)
    for _ in range(8):
        seq.append(int(mx.argmax(model(mx.array([seq]))[0, -1]).item()))
    assert greedy == seq[len(prompt) :]
    # stops when the context is full: every token it yields was fed to the model (mlx-lm's
    # generate_step computes the next one ahead), so prompt + yielded = max_seq_len
    assert len(list(generate_tokens(tiny_decoder(max_seq_len=10), prompt))) == 7


def test_top_k_and_top_p_restrict_the_samples():
    """mlx-lm's sampler, as generate_tokens sets it up: top_k=2 draws only the two best
    tokens, top_p=0.5 only the one holding more than half the mass."""
    from mlx_lm.sample_utils import make_sampler

    logprobs = nn.log_softmax(mx.array([[0.0, 5.0, 4.0, -1.0, 3.0]]))
    mx.random.seed(0)
    seen = {int(make_sampler(temp=1.0, top_k=2)(logprobs).item()) for _ in range(50)}
    assert seen == {1, 2}
    seen = {int(make_sampler(temp=1.0, top_p=0.5)(logprobs).item()) for _ in range(50)}
    assert seen == {1}  # token 1 alone holds > 50% of the mass


# ---------------------------------------------------------------- presets


PRESETS = {  # name: (vocab the yaml quotes, target parameters)
    "nano": (8192, 5e6),
    "tiny": (8192, 15e6),
    "small": (32000, 50e6),
    "medium": (32000, 150e6),
    "large": (32000, 400e6),
    "xlarge": (32000, 1e9),
}


@pytest.mark.parametrize("name", PRESETS)
def test_preset_parameter_counts_without_allocating(name):
    vocab, target = PRESETS[name]
    cfg = model_config(f"transformer_{name}")
    active = mx.get_active_memory()
    model = instantiate(cfg, vocab_size=vocab, num_labels=None)
    n = num_parameters(model)
    assert abs(n - target) / target < 0.1, f"{name}: {n / 1e6:.1f}M params, target {target / 1e6}M"
    # MLX arrays are lazy: building even the 1B model allocates nothing until mx.eval
    assert mx.get_active_memory() - active < 1e6


def test_classifier_configs_instantiate():
    for name in ("bert", "cnn_hybrid"):
        model = instantiate(model_config(name), vocab_size=V, num_labels=2)
        model.eval()
        assert model(ids((2, 12)), right_pad_mask([12, 5], 12)).shape == (2, 2)
    # LoRA through Hydra's DictConfig/ListConfig, as train.py passes it
    cfg = model_config("bert")
    cfg.lora.rank = 4
    model = instantiate(cfg, vocab_size=V, num_labels=2)
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 2 * 2
    assert {k.split(".")[-1] for k in adapter_parameters(model)} == {
        "lora_a",
        "lora_b",
        "weight",
        "bias",
    }
    cfg = model_config("transformer_nano")
    cfg.lora.rank = 4
    model = instantiate(cfg, vocab_size=V, num_labels=None)
    assert {k.split(".")[-1] for k in adapter_parameters(model)} == {"lora_a", "lora_b"}


def test_bert_default_learns():
    """A few AdamW steps on a token-presence task: gradients reach the whole model."""
    model = instantiate(model_config("bert"), vocab_size=V, num_labels=2)
    x = np.array(ids((16, 8), seed=3))
    x[x == 5] = 6
    x[::2, 4] = 5  # label = does token 5 occur
    x, y = mx.array(x), mx.array((x == 5).any(axis=1).astype(np.int32))
    opt = optim.AdamW(1e-3)

    def loss_fn(m):
        return nn.losses.cross_entropy(m(x), y, reduction="mean")

    step = nn.value_and_grad(model, loss_fn)
    losses = []
    for _ in range(12):
        loss, grads = step(model)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)
        losses.append(loss.item())
    assert min(losses[-4:]) < 0.3 * losses[0], losses


# ---------------------------------------------------------------- NumPy references


def _np_params(model):
    return {k: np.array(v, dtype=np.float64) for k, v in tree_flatten(model.parameters())}


def _np_rope(x, theta):  # x (H, T, D); half-split rotary embedding (GPT-NeoX / Llama layout)
    T, D = x.shape[-2:]
    inv_freq = theta ** (-np.arange(0, D, 2) / D)
    ang = np.arange(T)[:, None] * inv_freq[None, :]
    cos, sin = np.cos(ang), np.sin(ang)
    x1, x2 = x[..., : D // 2], x[..., D // 2 :]
    return np.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


def _np_softmax(s):
    s = s - s.max(-1, keepdims=True)
    e = np.exp(s)
    return e / e.sum(-1, keepdims=True)


def _np_decoder(p, tokens, num_heads, num_kv_heads, num_layers, eps=1e-5, theta=10000.0):
    def rmsnorm(x, w):
        return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * w

    h = p["embed_tokens.weight"][tokens]  # (T, dim)
    T, dim = h.shape
    hd = dim // num_heads
    causal = np.tril(np.ones((T, T), bool))
    for i in range(num_layers):
        L = f"layers.{i}."
        x = rmsnorm(h, p[L + "attention_norm.weight"])
        q = (x @ p[L + "attention.query.weight"].T).reshape(T, num_heads, hd).transpose(1, 0, 2)
        k = (x @ p[L + "attention.key.weight"].T).reshape(T, num_kv_heads, hd).transpose(1, 0, 2)
        v = (x @ p[L + "attention.value.weight"].T).reshape(T, num_kv_heads, hd).transpose(1, 0, 2)
        q, k = _np_rope(q, theta), _np_rope(k, theta)
        rep = num_heads // num_kv_heads  # each kv head serves `rep` query heads
        k, v = np.repeat(k, rep, axis=0), np.repeat(v, rep, axis=0)
        s = np.where(causal, q @ k.transpose(0, 2, 1) / math.sqrt(hd), -np.inf)
        o = (_np_softmax(s) @ v).transpose(1, 0, 2).reshape(T, dim)
        h = h + o @ p[L + "attention.out.weight"].T
        x = rmsnorm(h, p[L + "mlp_norm.weight"])
        g = x @ p[L + "mlp.gate.weight"].T
        silu = g / (1 + np.exp(-g))
        h = h + (silu * (x @ p[L + "mlp.up.weight"].T)) @ p[L + "mlp.down.weight"].T
    h = rmsnorm(h, p["norm.weight"])
    return h @ p["embed_tokens.weight"].T


def test_decoder_matches_numpy_forward():
    model = tiny_decoder(num_heads=4, num_kv_heads=2, rope_theta=500.0)
    randomize(model)
    tokens = np.array([5, 17, 3, 88, 41, 2, 9, 60, 33])
    ref = _np_decoder(_np_params(model), tokens, 4, 2, 2, theta=500.0)
    out = np.array(model(mx.array(tokens[None])))[0]
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)


def _np_bert(hf, tokens, mask, num_heads, num_layers, eps=1e-12):
    """Post-LN BERT from the equations, reading Hugging Face names directly."""
    p = {k: np.array(v, dtype=np.float64) for k, v in hf.items()}
    erf = np.vectorize(math.erf)

    def ln(x, name):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * p[name + ".weight"] + p[name + ".bias"]

    def dense(x, name):
        return x @ p[name + ".weight"].T + p[name + ".bias"]

    B, T = tokens.shape
    e = "bert.embeddings."
    h = p[e + "word_embeddings.weight"][tokens] + p[e + "position_embeddings.weight"][:T]
    h = ln(h + p[e + "token_type_embeddings.weight"][0], e + "LayerNorm")
    dim = h.shape[-1]
    hd = dim // num_heads
    for i in range(num_layers):
        L = f"bert.encoder.layer.{i}."

        def heads(x):
            return x.reshape(B, T, num_heads, hd).transpose(0, 2, 1, 3)

        q, k, v = (heads(dense(h, L + f"attention.self.{n}")) for n in ("query", "key", "value"))
        s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd)
        s = np.where(mask[:, None, None, :] > 0, s, -np.inf)
        o = (_np_softmax(s) @ v).transpose(0, 2, 1, 3).reshape(B, T, dim)
        h = ln(h + dense(o, L + "attention.output.dense"), L + "attention.output.LayerNorm")
        u = dense(h, L + "intermediate.dense")
        u = 0.5 * u * (1 + erf(u / math.sqrt(2)))
        h = ln(h + dense(u, L + "output.dense"), L + "output.LayerNorm")
    pooled = np.tanh(dense(h[:, 0], "bert.pooler.dense"))
    return dense(pooled, "classifier")


def _write_hf_bert(path: Path, with_classifier=True, vocab=50, hidden=16, layers=2, heads=2):
    """A tiny Hugging Face style BertForSequenceClassification checkpoint, HF names."""
    key = iter(mx.random.split(mx.random.key(42), 64))
    w = {}

    def t(name, *shape, base=0.0):
        w[name] = base + 0.2 * mx.random.normal(shape, key=next(key))

    e = "bert.embeddings."
    t(e + "word_embeddings.weight", vocab, hidden)
    t(e + "position_embeddings.weight", 32, hidden)
    t(e + "token_type_embeddings.weight", 2, hidden)
    t(e + "LayerNorm.weight", hidden, base=1.0)
    t(e + "LayerNorm.bias", hidden)
    w[e + "position_ids"] = mx.arange(32)[None]  # a buffer HF saves; must be ignored
    for i in range(layers):
        L = f"bert.encoder.layer.{i}."
        for n in (
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
        ):
            t(L + n + ".weight", hidden, hidden)
            t(L + n + ".bias", hidden)
        t(L + "intermediate.dense.weight", 4 * hidden, hidden)
        t(L + "intermediate.dense.bias", 4 * hidden)
        t(L + "output.dense.weight", hidden, 4 * hidden)
        t(L + "output.dense.bias", hidden)
        for n in ("attention.output.LayerNorm", "output.LayerNorm"):
            t(L + n + ".weight", hidden, base=1.0)
            t(L + n + ".bias", hidden)
    t("bert.pooler.dense.weight", hidden, hidden)
    t("bert.pooler.dense.bias", hidden)
    t("cls.predictions.bias", vocab)  # MLM head: unused by a classifier
    if with_classifier:
        t("classifier.weight", 2, hidden)
        t("classifier.bias", 2)
    path.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(path / "model.safetensors"), w)
    config = dict(
        model_type="bert",
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        max_position_embeddings=32,
        type_vocab_size=2,
        hidden_act="gelu",
        hidden_dropout_prob=0.1,
        layer_norm_eps=1e-12,
    )
    (path / "config.json").write_text(json.dumps(config))
    return w


def test_hf_bert_logits_match_numpy(tmp_path):
    hf = _write_hf_bert(tmp_path / "bert")
    # our sizes are overridden by config.json; the data's vocab (40) fits in the HF one (50)
    model = BertClassifier(
        vocab_size=40,
        num_labels=2,
        hidden_size=128,
        num_layers=5,
        pretrained=str(tmp_path / "bert"),
    )
    model.eval()
    assert model.encoder.embeddings.word_embeddings.weight.shape == (50, 16)
    tokens = np.array([[2, 7, 9, 31, 4, 0, 0], [2, 11, 3, 0, 0, 0, 0]])
    mask = (tokens > 0).astype(np.int32)
    mask[:, 0] = 1
    out = np.array(model(mx.array(tokens), mx.array(mask)))
    np.testing.assert_allclose(out, _np_bert(hf, tokens, mask, 2, 2), atol=1e-4, rtol=1e-4)


def test_hf_weights_round_trip_by_name(tmp_path):
    hf = _write_hf_bert(tmp_path / "bert", with_classifier=False)
    model = BertClassifier(
        vocab_size=50, num_labels=3, hidden_size=16, num_layers=2, num_heads=2, max_position=32,
        pooler=True,
    )
    before = np.array(model.classifier.weight)
    report = load_hf_bert_weights(model, tmp_path / "bert")
    ours = dict(tree_flatten(model.parameters()))
    for name, value in hf.items():
        mapped = hf_to_mlxlab_name(name)
        if mapped is None:
            assert name in report["unused"]
        else:
            np.testing.assert_array_equal(np.array(ours[mapped]), np.array(value), err_msg=name)
    assert report["missing"] == ["classifier.bias", "classifier.weight"]
    assert "cls.predictions.bias" in report["unused"]
    np.testing.assert_array_equal(np.array(model.classifier.weight), before)  # kept its init


def test_bert_pooler_and_dropout_follow_where_the_model_comes_from(tmp_path):
    # from scratch: no pooler, dropout 0.3 (Titanic's best); from a checkpoint: its own pooler
    # and dropout
    scratch = BertClassifier(50, 2, hidden_size=16, num_layers=1, num_heads=2)
    assert "pooler" not in scratch and scratch.dropout._p_1 == pytest.approx(0.7)
    assert scratch.architecture["pooler"] is False and scratch.architecture["dropout"] == 0.3
    _write_hf_bert(tmp_path / "bert")
    tuned = BertClassifier(50, 2, pretrained=str(tmp_path / "bert"))
    assert "pooler" in tuned and tuned.architecture["dropout"] == pytest.approx(0.1)
    # the pooler is in what rebuilds the run without the folder (run_model passes model_init)
    assert tuned.checkpoint_init["pooler"] is True
    rebuilt = BertClassifier(**tuned.checkpoint_init, num_labels=2)
    names = [n for n, _ in tree_flatten(tuned.parameters())]
    assert [n for n, _ in tree_flatten(rebuilt.parameters())] == names
    given = BertClassifier(50, 2, pretrained=str(tmp_path / "bert"), pooler=False, dropout=0.0)
    assert "pooler" not in given and given.architecture["dropout"] == 0.0


def test_hf_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        BertClassifier(50, 2, pretrained=str(tmp_path / "nope"))
    _write_hf_bert(tmp_path / "bert")
    with pytest.raises(ValueError, match="tokenizer has 60 tokens"):
        BertClassifier(60, 2, pretrained=str(tmp_path / "bert"))
    (tmp_path / "bert" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        BertClassifier(50, 2, pretrained=str(tmp_path / "bert"))


def test_hf_pretrained_with_lora(tmp_path):
    _write_hf_bert(tmp_path / "bert")
    plain = BertClassifier(50, 2, pretrained=str(tmp_path / "bert"))
    lora = BertClassifier(50, 2, pretrained=str(tmp_path / "bert"), lora={"rank": 4})
    plain.eval(), lora.eval()
    x, m = ids((2, 8), vocab=50), right_pad_mask([8, 5], 8)
    np.testing.assert_allclose(np.array(lora(x, m)), np.array(plain(x, m)), atol=1e-6)


# ---------------------------------------------------------------- LoRA


def test_lora_only_adapters_train_and_fuse_matches(tmp_path):
    model = tiny_decoder()
    x = ids((2, 9))
    before = np.array(model(x))
    n = apply_lora(model, rank=4, alpha=8, targets=["query", "value", "mlp.down"])
    assert n == 6
    np.testing.assert_allclose(np.array(model(x)), before, atol=1e-6)  # B = 0: no change yet
    trainable = adapter_parameters(model)
    assert trainable and all(k.endswith((".lora_a", ".lora_b")) for k in trainable)
    assert sum(v.size for v in trainable.values()) < 0.2 * num_parameters(model)

    # one real training step changes adapters only
    frozen = {k: np.array(v) for k, v in tree_flatten(model.parameters()) if k not in trainable}
    y = ids((2, 9), seed=5)

    def loss_fn(m):
        return nn.losses.cross_entropy(m(x), y, reduction="mean")

    loss, grads = nn.value_and_grad(model, loss_fn)(model)
    assert set(dict(tree_flatten(grads))) == set(trainable)
    optim.Adam(1e-2).update(model, grads)
    for k, v in tree_flatten(model.parameters()):
        if k in frozen:
            np.testing.assert_array_equal(np.array(v), frozen[k], err_msg=k)
    lora_out = np.array(model(x))
    assert np.abs(lora_out - before).max() > 1e-4

    # adapters save small and load onto a fresh model built from the same base
    save_adapters(model, tmp_path / "adapters.safetensors")
    fresh = tiny_decoder()
    plain = {k.replace(".linear.", "."): v for k, v in frozen.items()}  # un-wrapped base names
    apply_lora(fresh, rank=4, alpha=8, targets=["query", "value", "mlp.down"])
    load_base_weights(fresh, {k: mx.array(v) for k, v in plain.items()})
    load_adapters(fresh, tmp_path / "adapters.safetensors")
    fresh.eval()
    np.testing.assert_allclose(np.array(fresh(x)), lora_out, atol=1e-6)

    # fused: plain nn.Linear, same logits, loads strictly into a rank-0 model
    fuse_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    np.testing.assert_allclose(np.array(model(x)), lora_out, atol=1e-5)
    export = tiny_decoder()
    export.load_weights(list(tree_flatten(model.parameters())))  # strict by default
    np.testing.assert_allclose(np.array(export(x)), lora_out, atol=1e-5)


def test_lora_name_map_and_bert_head_trainable():
    model = tiny_bert(lora={"rank": 2, "targets": ["query", "value"]})
    mapping = lora_base_name_map(model)
    assert mapping["encoder.layers.0.attention.query.weight"] == (
        "encoder.layers.0.attention.query.linear.weight"
    )
    assert len(mapping) == 2 * 2 * 2  # layers x (query, value) x (weight, bias)
    trainable = adapter_parameters(model)
    assert {"classifier.weight", "classifier.bias"} <= set(trainable)
    assert not any(k.startswith("pooler") or "linear" in k for k in trainable)
    # a plain checkpoint loads into the LoRA model through the map
    plain = tiny_bert()
    randomize(plain)
    load_base_weights(model, dict(tree_flatten(plain.parameters())))
    x, m = ids((2, 7)), right_pad_mask([7, 3], 7)
    np.testing.assert_allclose(np.array(model(x, m)), np.array(plain(x, m)), atol=1e-6)


def test_lora_bad_config():
    with pytest.raises(ValueError, match="match no Linear"):
        tiny_decoder(lora={"rank": 4, "targets": ["qkv"]})
    with pytest.raises(ValueError, match="unknown lora keys"):
        tiny_decoder(lora={"rank": 4, "ranks": 2})
    assert adapter_parameters(tiny_decoder(lora={"rank": 0})).keys() == {
        k for k, _ in tree_flatten(tiny_decoder().parameters())
    }  # rank 0: LoRA off, everything trainable
    with pytest.raises(ValueError, match="no LoRA adapters"):
        load_adapters(tiny_decoder(), Path(__file__))
