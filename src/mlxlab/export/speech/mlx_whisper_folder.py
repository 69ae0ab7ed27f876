"""A Whisper written as mlx-whisper's folder (what its convert.py writes and
mlx_whisper.load_models.load_model reads): config.json with ModelDimensions' keys (n_mels,
n_audio_ctx, n_audio_state, n_audio_head, n_audio_layer, n_vocab, n_text_ctx, n_text_state,
n_text_head, n_text_layer) and weights.safetensors under mlx-whisper's names and axes: the
inverse of models/speech/whisper_folder.py's rename_mlx_whisper (the convolutions (out, in,
kernel) -> (out, kernel, in); the encoder's sinusoids, which mlx-whisper computes, not
stored), the alignment heads of the base's generation config where it names them.

With `bits`, the linear layers and the token embedding are quantized by nn.quantize as
convert.py quantizes them (group size 64, affine), and config.json says so:
"quantization": {"group_size": 64, "bits": B}, which load_model reads to quantize the same
layers (those whose `.scales` the file holds).

mlx-whisper decodes with OpenAI's own vocabulary (tiktoken's gpt2 / multilingual encodings,
chosen by n_vocab), so only a model of Whisper's vocabulary, its special tokens at Whisper's
ids, exports to it; its blocks' MLP is 4 x the width and its output tied to the embedding."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlxlab.export.hf import DTYPES, ExportError
from mlxlab.models.speech.whisper import sinusoids
from mlxlab.models.speech.whisper_folder import MLX_WHISPER_DIMS, MULTILINGUAL_VOCAB, renamed

GROUP_SIZE = 64  # mlx-whisper's convert.py --q-group-size default
BITS = (2, 3, 4, 5, 6, 8)  # what nn.quantize's affine mode takes
# Whisper's vocabularies: English-only (51864), multilingual (51865), large-v3's (51866)
WHISPER_VOCABS = (51864, 51865, 51866)
# the largest gap of the encoder's stored positions from the sinusoids (torch's float32 sin,
# which transformers folders store, is ~1e-4 off the exact values)
SINUSOID_GAP = 1e-3
NOT_STORED = "model.encoder.embed_positions."  # mlx-whisper computes the encoder's sinusoids


def mlx_whisper_config(config: dict) -> dict:
    """transformers' WhisperConfig keys as mlx-whisper's ModelDimensions (+ model_type)."""
    dims = {mlx: int(config[hf]) for mlx, hf in MLX_WHISPER_DIMS.items()}
    dims["n_text_state"] = int(config["d_model"])
    return {**dims, "model_type": "whisper"}


def check_mlx_whisper(model: Any, tokenizer: Any) -> None:
    """One ExportError line for a Whisper mlx-whisper cannot run as it is."""
    config = model.config
    vocab = int(config["vocab_size"])
    token = tokenizer.convert_tokens_to_ids
    eot = 50257 if vocab >= MULTILINGUAL_VOCAB else 50256
    if vocab not in WHISPER_VOCABS or token("<|endoftext|>") != eot or \
            token("<|startoftranscript|>") != eot + 1:
        raise ExportError(
            f"--format mlx-whisper: mlx-whisper decodes with OpenAI's Whisper vocabulary "
            f"({'/'.join(map(str, WHISPER_VOCABS))} tokens, <|endoftext|> at 50256/50257); this "
            f"model has {vocab} tokens, <|endoftext|> at {token('<|endoftext|>')}: export it as "
            "--format hf")
    positions = model.model.encoder.embed_positions.weight
    off = float(mx.abs(positions - sinusoids(*positions.shape)).max())
    if off > SINUSOID_GAP:
        raise ExportError(f"--format mlx-whisper: mlx-whisper computes the encoder's positions "
                          f"as Whisper's sinusoids; this model's are {off:.3g} away from them "
                          "(a model whose encoder positions were changed): export it as "
                          "--format hf")
    width = int(config["d_model"])
    ffn = {int(config.get(k, 4 * width)) for k in ("encoder_ffn_dim", "decoder_ffn_dim")}
    if ffn != {4 * width} or not model.tied:
        raise ExportError(f"--format mlx-whisper: mlx-whisper's blocks have an MLP of 4 x the "
                          f"width ({4 * width}) and an output tied to the embedding; this model "
                          f"has {sorted(ffn)} and tie_word_embeddings={model.tied}: export it "
                          "as --format hf")


def mlx_whisper_name(name: str) -> str:
    """A transformers Whisper parameter's mlx-whisper name ('model.decoder.layers.0.fc1.weight'
    -> 'decoder.blocks.0.mlp1.weight'; quantized leaves .scales / .biases alike)."""
    new = renamed(name, to_mlx_whisper=True)
    if new.startswith("model.") or new.startswith("proj_out"):
        raise ExportError(f"{name} has no mlx-whisper name")
    return new


def mlx_whisper_weights(model: nn.Module, dtype: str) -> dict[str, mx.array]:
    """The model's parameters under mlx-whisper's names and axes, float ones cast to `dtype`
    (quantized ones stay packed uint32 with their scales and biases in `dtype`)."""
    out = {}
    for name, value in tree_flatten(model.parameters()):
        if name.startswith(NOT_STORED):
            continue
        if ".conv" in name and name.endswith(".weight"):
            value = value.transpose(0, 2, 1)
        out[mlx_whisper_name(name)] = value if value.dtype == mx.uint32 else \
            value.astype(DTYPES[dtype])
    return out


def quantize_in_place(model: nn.Module, bits: int) -> None:
    """The layers mlx-whisper quantizes (its linears and token embedding), quantized by
    nn.quantize at GROUP_SIZE; the learned decoder positions (a plain array in mlx-whisper)
    and the encoder's sinusoids stay float."""

    def quantized(path: str, module: nn.Module) -> bool:
        return (isinstance(module, nn.Linear | nn.Embedding)
                and not path.endswith("embed_positions")
                and module.weight.shape[-1] % GROUP_SIZE == 0)

    nn.quantize(model, group_size=GROUP_SIZE, bits=bits, class_predicate=quantized)


def alignment_heads(base: Path) -> mx.array | None:
    """The base generation config's alignment heads ([[layer, head], ...]: the cross-attention
    heads that follow the words' timing) as mlx-whisper stores them, None where it names none."""
    path = base / "generation_config.json"
    heads = json.loads(path.read_text()).get("alignment_heads") if path.is_file() else None
    return mx.array(heads, dtype=mx.int64) if heads else None


def write_mlx_whisper_folder(model: nn.Module, base: Path, out: Path, dtype: str,
                             bits: int | None) -> None:
    """config.json and weights.safetensors (module docstring) into `out`; with `bits`, the
    model is quantized in place first."""
    config = mlx_whisper_config(model.config)
    if bits:
        quantize_in_place(model, bits)
        config["quantization"] = {"group_size": GROUP_SIZE, "bits": bits}
    weights = mlx_whisper_weights(model, dtype)
    heads = alignment_heads(base)
    if heads is not None:
        weights["alignment_heads"] = heads
    mx.eval(weights)
    mx.save_safetensors(str(out / "weights.safetensors"), weights, metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(config, indent=4) + "\n")
