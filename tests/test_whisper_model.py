"""Whisper in MLX (models/speech/whisper.py) against transformers' WhisperForConditional-
Generation on the same tiny random folders, saved by transformers (80 and 128 mel bins): the
logits of teacher-forced decoder ids on features from transformers' WhisperFeatureExtractor, in
float32, within 1e-4 of the logits' scale; the same through an mlx-whisper folder (written by
renaming); the KV cache's step-by-step logits equal to the whole sequence's; and bad folders
refused in one line."""

from __future__ import annotations

import json
import re
import shutil

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlxlab.errors import ConfigError, MissingFileError
from mlxlab.models.speech.whisper import WhisperModel, sinusoids
from mlxlab.models.speech.whisper_folder import MLX_WHISPER_DIMS
from whisper_fixtures import features, tone, whisper_folder

IDS = [[0, 1, 2, 3, 40, 41, 42], [0, 1, 2, 3, 200, 7, 9]]  # the prompt's tokens set per folder


@pytest.fixture(scope="module", params=[80, 128], ids=["80mel", "128mel"])
def folder(request, tmp_path_factory):
    return whisper_folder(tmp_path_factory.mktemp(f"whisper{request.param}"), request.param)


def reference_logits(folder, feats, ids, positions=None):
    """transformers' logits; `positions`: its encoder's sinusoids replaced by these."""
    import torch
    from transformers import WhisperForConditionalGeneration

    model = WhisperForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        if positions is not None:
            model.model.encoder.embed_positions.weight.copy_(torch.tensor(np.asarray(positions)))
        out = model(input_features=torch.tensor(feats), decoder_input_ids=torch.tensor(ids))
    return out.logits.numpy()


def prompt_ids(folder):
    config = json.loads((folder / "config.json").read_text())
    sot = config["decoder_start_token_id"]
    return np.array([[sot, sot + 1, sot + 4, sot + 8, *row[4:]] for row in IDS], dtype=np.int32)


@pytest.fixture(scope="module")
def case(folder):
    n_mels = json.loads((folder / "config.json").read_text())["num_mel_bins"]
    feats = features([tone(1.0, 440), tone(2.5, 880, seed=1)], n_mels)
    ids = prompt_ids(folder)
    return feats, ids, reference_logits(folder, feats, ids)


def check_close(ours, reference):
    scale = np.abs(reference).max()
    assert np.abs(np.asarray(ours) - reference).max() <= 1e-4 * scale


def test_logits_equal_transformers(folder, case):
    feats, ids, reference = case
    model = WhisperModel(pretrained=str(folder))
    check_close(model(mx.array(feats), mx.array(ids)), reference)
    assert not any(k.startswith("proj_out") for k, _ in tree_flatten(model.parameters()))
    # the cache: the prompt at once, then one token at a time, gives the same logits
    states = model.encode(mx.array(feats))
    first, cache = model.decode(mx.array(ids[:, :4]), states)
    steps = [first]
    for t in range(4, ids.shape[1]):
        logits, cache = model.decode(mx.array(ids[:, t:t + 1]), states, cache)
        steps.append(logits)
    check_close(mx.concatenate(steps, axis=1), reference)


MLX_NAMES = [("model.encoder.layers.", "encoder.blocks."), ("model.decoder.layers.", "decoder.blocks."),
             (".self_attn.q_proj.", ".attn.query."), (".self_attn.k_proj.", ".attn.key."),
             (".self_attn.v_proj.", ".attn.value."), (".self_attn.out_proj.", ".attn.out."),
             (".encoder_attn.q_proj.", ".cross_attn.query."),
             (".encoder_attn.k_proj.", ".cross_attn.key."),
             (".encoder_attn.v_proj.", ".cross_attn.value."),
             (".encoder_attn.out_proj.", ".cross_attn.out."),
             (".self_attn_layer_norm.", ".attn_ln."), (".encoder_attn_layer_norm.", ".cross_attn_ln."),
             (".fc1.", ".mlp1."), (".fc2.", ".mlp2."), (".final_layer_norm.", ".mlp_ln."),
             ("model.encoder.conv", "encoder.conv"), ("model.encoder.layer_norm.", "encoder.ln_post."),
             ("model.decoder.embed_tokens.", "decoder.token_embedding."),
             ("model.decoder.embed_positions.weight", "decoder.positional_embedding"),
             ("model.decoder.layer_norm.", "decoder.ln.")]


def write_mlx_whisper(folder, out, suffix="safetensors"):
    """The transformers folder as mlx-whisper's convert script lays it out: its config keys,
    its names, its (out, kernel, in) convolutions, no encoder positions (it computes them)."""
    out.mkdir()
    config = json.loads((folder / "config.json").read_text())
    dims = {mlx: config[hf] for mlx, hf in MLX_WHISPER_DIMS.items()}
    (out / "config.json").write_text(json.dumps({**dims, "model_type": "whisper"}))
    weights = {}
    for name, value in mx.load(str(folder / "model.safetensors")).items():
        if name in ("model.encoder.embed_positions.weight", "proj_out.weight"):
            continue
        for hf, mlx in MLX_NAMES:
            name = name.replace(hf, mlx)
        weights[name] = value.transpose(0, 2, 1) if re.search(r"conv\d\.weight", name) else value
    weights["alignment_heads"] = mx.array([[1, 0]])
    if suffix == "npz":
        mx.savez(str(out / "weights.npz"), **weights)
    else:
        mx.save_safetensors(str(out / "weights.safetensors"), weights)
    return out


@pytest.mark.parametrize("suffix", ["safetensors", "npz"])
def test_mlx_whisper_folder(folder, case, tmp_path, suffix):
    """An mlx-whisper folder stores no encoder positions: the exact sinusoids stand in for
    the float32 ones torch computed into the transformers folder (~1e-4 apart), in the
    reference too."""
    feats, ids, _ = case
    model = WhisperModel(pretrained=str(write_mlx_whisper(folder, tmp_path / "mlx", suffix)))
    positions = model.model.encoder.embed_positions.weight
    assert np.abs(np.asarray(positions) - np.asarray(sinusoids(*positions.shape))).max() == 0
    reference = reference_logits(folder, feats, ids, positions)
    check_close(model(mx.array(feats), mx.array(ids)), reference)


def test_bad_folders(folder, tmp_path):
    with pytest.raises(MissingFileError, match="no such folder or file"):
        WhisperModel(pretrained=str(tmp_path / "nowhere"))
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ConfigError, match="no Whisper folder.*'bert'"):
        WhisperModel(pretrained=str(bert))
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(folder / "config.json", empty)
    with pytest.raises(MissingFileError, match="no \\*.safetensors"):
        WhisperModel(pretrained=str(empty))
    mlx = write_mlx_whisper(folder, tmp_path / "mlx")
    (mlx / "weights.safetensors").unlink()
    with pytest.raises(MissingFileError, match="neither weights.safetensors nor weights.npz"):
        WhisperModel(pretrained=str(mlx))
    with pytest.raises(ConfigError, match="model.quantize=4"):
        WhisperModel(pretrained=str(folder), quantize=4)


def test_lora_reaches_attention_and_mlp(folder):
    model = WhisperModel(pretrained=str(folder), lora={"rank": 4, "targets": [
        "query", "key", "value", "out", "fc1", "fc2"]})
    trainable = {k for k, _ in tree_flatten(model.trainable_parameters())}
    assert trainable and all(".lora_" in k for k in trainable)
    wrapped = {k.rsplit(".lora_", 1)[0] for k in trainable}
    for part in ("encoder.layers.0.self_attn", "decoder.layers.1.encoder_attn"):
        assert {f"model.{part}.{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj")} <= wrapped
    assert "model.decoder.layers.0.fc2" in wrapped and "model.encoder.layers.1.fc1" in wrapped
    decoder_only = WhisperModel(pretrained=str(folder), lora={"rank": 4, "modules": ["decoder"]})
    assert all(k.startswith("model.decoder.") for k, _ in
               tree_flatten(decoder_only.trainable_parameters()))
    full = WhisperModel(pretrained=str(folder), lora={"rank": 0})
    frozen = {k for k, _ in tree_flatten(full.parameters())} - {
        k for k, _ in tree_flatten(full.trainable_parameters())}
    assert frozen == {"model.encoder.embed_positions.weight"}
    # a checkpoint's rebuild: the config and generation settings, no folder
    rebuilt = WhisperModel(**full.checkpoint_init)
    assert rebuilt.config == full.config and rebuilt.generation_config == full.generation_config
