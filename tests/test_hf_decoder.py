"""Hugging Face and mlx-lm decoder folders in, through mlx-lm's own loading: tiny random llama /
qwen2 (q/k/v biases, tied) / mistral (GQA) / llama3 rope scaling saved by transformers give
transformers' logits; the KV cache path equals one forward; sharded and mlx-lm (quantized)
layouts load as mlx-lm loads them; a checkpoint rebuilds the model without its folder; what
mlx-lm cannot load is one line."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from hf_helpers import mlx_logits, save_tiny_model, torch_logits
from mlxlab.errors import ConfigError, MissingFileError
from mlxlab.models.decoders.mlx_lm_decoder import MLXLMDecoder

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
    ours = MLXLMDecoder(vocab_size=1, pretrained=str(path))
    expected, got = torch_logits(ref, IDS), mlx_logits(ours, IDS)
    assert np.abs(expected).max() > 1.0  # the random weights give logits far from uniform
    assert np.abs(expected - got).max() <= 1e-4
    config = json.loads((path / "config.json").read_text())
    assert ours.hf_config["model_type"] == config["model_type"] == kind.removesuffix("3")
    assert ours.max_seq_len == config["max_position_embeddings"]


def test_incremental_decoding_matches_full_forward(checkpoints):
    """mlx-lm's KV cache (make_cache) agrees with one full forward on a GQA + bias model."""
    model = MLXLMDecoder(vocab_size=1, pretrained=str(checkpoints["qwen2"]))
    full = mlx_logits(model, IDS[:1])
    cache = model.make_cache()
    first = model(mx.array(IDS[:1, :30]), cache=cache)
    rest = model(mx.array(IDS[:1, 30:]), cache=cache)
    stepped = np.concatenate([np.array(first), np.array(rest)], axis=1)
    assert np.abs(full - stepped).max() <= 1e-4


def test_a_checkpoint_rebuilds_the_model_without_its_folder(checkpoints):
    """checkpoint_init (config.json, quantized layers, weight names) rebuilds the same modules,
    so the checkpoint's weights load by name: a tied qwen2 has no lm_head either way."""
    from mlx.utils import tree_flatten

    ours = MLXLMDecoder(vocab_size=1, pretrained=str(checkpoints["qwen2"]),
                        lora={"rank": 4, "targets": ["query", "value"]})
    rebuilt = MLXLMDecoder(vocab_size=1, lora={"rank": 4, "targets": ["query", "value"]},
                           **ours.checkpoint_init)
    names = dict(tree_flatten(ours.parameters()))
    assert names.keys() == dict(tree_flatten(rebuilt.parameters())).keys()
    assert "lm.lm_head.weight" not in names
    rebuilt.load_weights(list(names.items()), strict=True)
    assert np.array_equal(mlx_logits(rebuilt, IDS), mlx_logits(ours, IDS))


def test_sharded_checkpoint_loads(checkpoints, tmp_path):
    """A checkpoint split over shards with model.safetensors.index.json (as save_pretrained
    writes for big models) loads the same."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(checkpoints["mistral"])
    ref.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    (tmp_path / "config.json").write_text((checkpoints["mistral"] / "config.json").read_text())
    ours = MLXLMDecoder(vocab_size=1, pretrained=str(tmp_path))
    assert np.abs(torch_logits(ref.eval(), IDS) - mlx_logits(ours, IDS)).max() <= 1e-4


def test_mlx_lm_layout_and_quantized_checkpoint(checkpoints, tmp_path):
    """mlx_lm.convert's output loads: unquantized equal to the original, 4-bit kept packed and
    what mlx-lm itself computes (to float32 rounding: on the CPU the packed layers multiply
    through mlxlab's fused dequantize + GEMM, models/quantized/quantized_cpu.py, summing in another
    order than MLX's quantized matmul)."""
    import mlx_lm
    from mlx_lm.convert import convert

    plain, q4 = tmp_path / "plain", tmp_path / "q4"
    convert(str(checkpoints["llama"]), str(plain), dtype="float32")
    convert(str(checkpoints["llama"]), str(q4), quantize=True, q_bits=4, q_group_size=32,
            dtype="float32")
    original = mlx_logits(MLXLMDecoder(vocab_size=1, pretrained=str(checkpoints["llama"])), IDS)
    assert np.abs(mlx_logits(MLXLMDecoder(1, pretrained=str(plain)), IDS) - original).max() <= 1e-5
    ours = MLXLMDecoder(vocab_size=1, pretrained=str(q4))
    assert isinstance(ours.lm.model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    assert ours.quantized and ours.quantized_bits() == "4"
    theirs, _ = mlx_lm.load(str(q4))
    mine, mlx_lm_logits = mlx_logits(ours, IDS), np.array(theirs(mx.array(IDS)))
    assert np.abs(mine - mlx_lm_logits).max() <= 1e-5 * np.abs(mlx_lm_logits).max()
    assert np.abs(mlx_logits(ours, IDS) - original).max() > 1e-3  # 4 bits did change the model


def test_what_mlx_lm_cannot_load_is_one_line(checkpoints, tmp_path):
    import mlx_lm

    config = json.loads((checkpoints["llama"] / "config.json").read_text())
    folder = tmp_path / "gpt9"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "gpt9"}))
    with pytest.raises(ConfigError) as e:
        MLXLMDecoder(vocab_size=1, pretrained=str(folder))
    assert str(e.value) == (f"{folder}: model_type='gpt9' is not an architecture mlx-lm "
                            f"{mlx_lm.__version__} loads; give a folder of a type it supports "
                            "(or a newer mlx-lm)")
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(MissingFileError, match="no model\\*.safetensors weights"):
        MLXLMDecoder(vocab_size=1, pretrained=str(folder))
    with pytest.raises(ConfigError, match="embeds only"):
        MLXLMDecoder(vocab_size=10**6, pretrained=str(checkpoints["llama"]))
    with pytest.raises(FileNotFoundError, match="no such folder or file"):
        MLXLMDecoder(vocab_size=1, pretrained=str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="no dropout"):
        MLXLMDecoder(vocab_size=1, pretrained=str(checkpoints["llama"]), dropout=0.1)
