"""Llama-family checkpoints in: tiny random llama / qwen2 (q/k/v biases) / mistral (GQA) /
llama3 rope scaling saved by transformers give the same logits in mlxlab's Transformer; the
mlx-lm layout (quantized too) and sharded checkpoints load; unsupported configs are refused."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

from hf_helpers import mlx_logits, save_tiny_model, torch_logits
from mlxlab.models.hf_llama import from_hf_name, read_hf_weights, to_hf_name
from mlxlab.models.transformer import Transformer

IDS = np.random.default_rng(0).integers(0, 500, size=(2, 40))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {kind: save_tiny_model(kind, root / kind) for kind in ("llama", "qwen2", "mistral", "llama3")}


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "llama3"])
def test_import_parity(checkpoints, kind):
    from transformers import AutoModelForCausalLM

    path = checkpoints[kind]
    ref = AutoModelForCausalLM.from_pretrained(path).eval()
    ours = Transformer(vocab_size=1, pretrained=str(path))
    expected, got = torch_logits(ref, IDS), mlx_logits(ours, IDS)
    assert np.abs(expected).max() > 1.0  # the random weights give logits far from uniform
    assert np.abs(expected - got).max() <= 1e-4
    config = json.loads((path / "config.json").read_text())
    a = ours.architecture
    assert a["num_kv_heads"] == config["num_key_value_heads"]
    assert a["qkv_bias"] == (kind == "qwen2") and ("lm_head" in ours) != a["tie_embeddings"]
    if kind == "llama3":
        assert a["rope_scaling"]["rope_type"] == "llama3"


def test_incremental_decoding_matches_full_forward(checkpoints):
    """The KV cache path (generation) agrees with one full forward on a GQA + bias model."""
    model = Transformer(vocab_size=1, pretrained=str(checkpoints["qwen2"]))
    full = mlx_logits(model, IDS[:1])
    cache = model.make_cache()
    first = model(mx.array(IDS[:1, :30]), cache=cache)
    rest = model(mx.array(IDS[:1, 30:]), cache=cache)
    stepped = np.concatenate([np.array(first), np.array(rest)], axis=1)
    assert np.abs(full - stepped).max() <= 1e-4


def test_names_round_trip():
    for ours in ["embed_tokens.weight", "norm.weight", "lm_head.weight",
                 "layers.3.attention.query.bias", "layers.0.mlp.down.weight",
                 "layers.1.mlp_norm.weight", "layers.2.attention.value.lora_a"]:
        assert from_hf_name(to_hf_name(ours)) == ours
    assert to_hf_name("layers.0.attention_norm.weight") == "model.layers.0.input_layernorm.weight"
    assert from_hf_name("model.layers.0.self_attn.rotary_emb.inv_freq") is None


def test_sharded_checkpoint_loads(checkpoints, tmp_path):
    """A checkpoint split over shards with model.safetensors.index.json (as save_pretrained
    writes for big models) loads the same; a stray consolidated.safetensors is ignored."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(checkpoints["mistral"])
    ref.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    mx.save_safetensors(str(tmp_path / "consolidated.safetensors"), {"x": mx.zeros(3)})
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / f).write_bytes((checkpoints["mistral"] / f).read_bytes())
    ours = Transformer(vocab_size=1, pretrained=str(tmp_path))
    assert np.abs(torch_logits(ref.eval(), IDS) - mlx_logits(ours, IDS)).max() <= 1e-4


def test_mlx_lm_layout_and_quantized_checkpoint(checkpoints, tmp_path):
    """mlx_lm.convert's output loads: unquantized equal to the original, 4-bit dequantized to
    exactly what mlx-lm itself computes."""
    import mlx_lm
    from mlx_lm.convert import convert

    plain, q4 = tmp_path / "plain", tmp_path / "q4"
    convert(str(checkpoints["llama"]), str(plain), dtype="float32")
    convert(str(checkpoints["llama"]), str(q4), quantize=True, q_bits=4, q_group_size=32,
            dtype="float32")
    original = mlx_logits(Transformer(vocab_size=1, pretrained=str(checkpoints["llama"])), IDS)
    assert np.abs(mlx_logits(Transformer(vocab_size=1, pretrained=str(plain)), IDS) - original).max() <= 1e-5
    ours_q = mlx_logits(Transformer(vocab_size=1, pretrained=str(q4)), IDS)
    theirs_q, _ = mlx_lm.load(str(q4))
    ref_q = np.array(theirs_q(mx.array(IDS)).astype(mx.float32))
    assert np.abs(ours_q - ref_q).max() <= 1e-3  # dequantized matmul vs quantized kernel
    assert np.abs(ours_q - original).max() > 1e-3  # 4 bits did change the model
    weights = read_hf_weights(q4)
    assert not any(n.endswith(".scales") for n in weights)


def test_gelu_llama_imports_as_geglu(tmp_path):
    """A Llama with hidden_act=gelu (transformers' exact GELU in the gated MLP) is mlp=geglu with
    the same logits; the tanh GELUs are refused with one line."""
    from transformers import AutoModelForCausalLM

    path = save_tiny_model("llama", tmp_path / "gelu", hidden_act="gelu")
    ref = AutoModelForCausalLM.from_pretrained(path).eval()
    ours = Transformer(vocab_size=1, pretrained=str(path))
    assert ours.architecture["mlp"] == "geglu"
    assert np.abs(torch_logits(ref, IDS) - mlx_logits(ours, IDS)).max() <= 1e-4
    config = json.loads((path / "config.json").read_text())
    with pytest.raises(ValueError, match=r"hidden_act='gelu_pytorch_tanh': only silu \(mlp=swiglu\)"):
        Transformer(vocab_size=1, hf_config={**config, "hidden_act": "gelu_pytorch_tanh"})


def test_unsupported_configs_are_refused(checkpoints, tmp_path):
    config = json.loads((checkpoints["llama"] / "config.json").read_text())
    config["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    with pytest.raises(ValueError, match="rope_scaling type 'yarn' is not supported"):
        Transformer(vocab_size=1, hf_config=config)
    with pytest.raises(ValueError, match="model_type='gpt2'"):
        Transformer(vocab_size=1, hf_config={**config, "model_type": "gpt2"})
    with pytest.raises(ValueError, match="embeds only"):
        Transformer(vocab_size=10**6, hf_config={**config, "rope_scaling": None})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Transformer(vocab_size=1, pretrained=str(tmp_path / "nope"))
