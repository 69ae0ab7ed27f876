"""A Whisper folder read the one way every verb reads it: a transformers folder (config.json
with `model_type: whisper`, *.safetensors under transformers' names), an mlx-whisper folder
(config.json with mlx-whisper's `n_mels`, `n_audio_state`, ... and weights.safetensors or
weights.npz under mlx-whisper's names, renamed here to transformers') or a CTranslate2 one
(faster-whisper's: model.bin, read and renamed by ctranslate2_folder.py). Anything else is one
line naming what is missing, raised before anything is built or written."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import mlx.core as mx

from mlxlab.errors import ConfigError, MissingFileError
from mlxlab.models.hf import read_config, weight_files
from mlxlab.models.speech.ctranslate2_folder import (
    ct2_generation,
    is_ct2_whisper,
    read_ct2_whisper,
    transformers_weights,
)

# mlx-whisper's config.json keys -> transformers' WhisperConfig keys
MLX_WHISPER_DIMS = {
    "n_mels": "num_mel_bins", "n_audio_ctx": "max_source_positions",
    "n_audio_state": "d_model", "n_audio_head": "encoder_attention_heads",
    "n_audio_layer": "encoder_layers", "n_vocab": "vocab_size",
    "n_text_ctx": "max_target_positions", "n_text_head": "decoder_attention_heads",
    "n_text_layer": "decoder_layers",
}
# Whisper's vocabularies: the multilingual one (51865 and more: large-v3's 51866) puts
# <|endoftext|> at 50257, the English-only one (51864) at 50256; the start of transcript follows
MULTILINGUAL_VOCAB = 51865
# transformers' names for a Whisper's parts beside mlx-whisper's, read both ways (loading
# here, `--format mlx-whisper` in export/speech/mlx_whisper_folder.py): a block's parts match
# between dots (mlx-whisper's `.attn.` never inside `.cross_attn.`), the rest at a name's start
# (^) or whole ($)
NAME_PAIRS = [
    (".self_attn.q_proj.", ".attn.query."), (".self_attn.k_proj.", ".attn.key."),
    (".self_attn.v_proj.", ".attn.value."), (".self_attn.out_proj.", ".attn.out."),
    (".encoder_attn.q_proj.", ".cross_attn.query."), (".encoder_attn.k_proj.", ".cross_attn.key."),
    (".encoder_attn.v_proj.", ".cross_attn.value."),
    (".encoder_attn.out_proj.", ".cross_attn.out."),
    (".self_attn_layer_norm.", ".attn_ln."), (".encoder_attn_layer_norm.", ".cross_attn_ln."),
    (".fc1.", ".mlp1."), (".fc2.", ".mlp2."), (".final_layer_norm.", ".mlp_ln."),
    ("^model.encoder.layers.", "^encoder.blocks."), ("^model.decoder.layers.", "^decoder.blocks."),
    ("^model.encoder.conv", "^encoder.conv"), ("^model.encoder.layer_norm.", "^encoder.ln_post."),
    ("^model.decoder.embed_tokens.", "^decoder.token_embedding."),
    ("^model.decoder.embed_positions.weight$", "^decoder.positional_embedding$"),
    ("^model.decoder.layer_norm.", "^decoder.ln."),
]


def renamed(name: str, to_mlx_whisper: bool) -> str:
    """`name` in the other naming of NAME_PAIRS (unchanged where no pair matches)."""
    for hf, mlx_whisper in NAME_PAIRS:
        old, new = (hf, mlx_whisper) if to_mlx_whisper else (mlx_whisper, hf)
        start, end = old.startswith("^"), old.endswith("$")
        core = old.strip("^$")
        if (start and end and name == core) or (start and not end and name.startswith(core)):
            return new.strip("^$") + name[len(core):]
        if not start and core in name:
            name = name.replace(core, new, 1)
    return name
NOT_WHISPER = ("a Whisper folder is a transformers one (config.json with model_type whisper and "
               "*.safetensors), an mlx-whisper one (config.json with n_mels, ... and "
               "weights.safetensors or weights.npz) or a CTranslate2 (faster-whisper) one "
               "(config.json with lang_ids, ..., model.bin and tokenizer.json)")


def is_mlx_whisper(config: Mapping) -> bool:
    return "n_mels" in config and "n_audio_state" in config


def is_whisper_config(config: Mapping) -> bool:
    """Whether a config.json describes a Whisper model (any of the three layouts)."""
    return (config.get("model_type") == "whisper" or is_mlx_whisper(config)
            or is_ct2_whisper(config))


def is_whisper_folder(folder: Path) -> bool:
    """Whether a folder's config.json describes Whisper (no error for any other folder)."""
    try:
        return is_whisper_config(json.loads((Path(folder) / "config.json").read_text()))
    except (OSError, ValueError):
        return False


def whisper_config(config: Mapping, where: str | Path) -> dict:
    """The folder's config.json as transformers' WhisperConfig keys (an mlx-whisper one
    translated, its token ids those of its vocabulary), or one line saying it is no Whisper
    folder."""
    if not is_whisper_config(config):
        raise ConfigError(f"{where} is no Whisper folder (config.json model_type "
                          f"{config.get('model_type')!r}): {NOT_WHISPER}")
    if not is_mlx_whisper(config):
        return dict(config)
    if config.get("quantization"):
        raise ConfigError(f"{where} is a quantized mlx-whisper folder: mlxlab loads Whisper in "
                          "float; use the float folder (or the transformers one) of this model")
    missing = [k for k in MLX_WHISPER_DIMS if k not in config]
    if missing:
        raise ConfigError(f"{where}/config.json lacks mlx-whisper's {missing}: {NOT_WHISPER}")
    hf = {"model_type": "whisper", **{MLX_WHISPER_DIMS[k]: int(config[k]) for k in MLX_WHISPER_DIMS}}
    hf["encoder_ffn_dim"] = hf["decoder_ffn_dim"] = 4 * hf["d_model"]
    eot = 50257 if hf["vocab_size"] >= MULTILINGUAL_VOCAB else 50256
    hf.update(eos_token_id=eot, pad_token_id=eot, bos_token_id=eot,
              decoder_start_token_id=eot + 1, tie_word_embeddings=True)
    return hf


def check_sizes(config: Mapping, where: str | Path) -> None:
    """The sizes the model is built from: present, and heads dividing the width."""
    need = ["d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads",
            "decoder_attention_heads", "num_mel_bins", "vocab_size"]
    missing = [k for k in need if k not in config]
    if missing:
        raise ConfigError(f"{where}/config.json lacks {missing}: {NOT_WHISPER}")
    for heads in ("encoder_attention_heads", "decoder_attention_heads"):
        if config["d_model"] % config[heads]:
            raise ConfigError(f"{where}/config.json: d_model {config['d_model']} is not a "
                              f"multiple of {heads} {config[heads]}")


def read_whisper(folder: str | Path) -> tuple[dict, Path]:
    """(config as transformers' keys, folder) of a local Whisper folder, checked: a config
    that describes Whisper and the weights its layout keeps."""
    folder = Path(folder)
    raw = read_config(folder)
    if is_ct2_whisper(raw):
        config, _ = read_ct2_whisper(folder, raw)
        check_sizes(config, folder)
        return config, folder
    config = whisper_config(raw, folder)
    check_sizes(config, folder)
    if is_mlx_whisper(raw):
        _mlx_whisper_file(folder)
    else:
        weight_files(folder)
    return config, folder


def _mlx_whisper_file(folder: Path) -> Path:
    for name in ("weights.safetensors", "weights.npz"):
        if (folder / name).is_file():
            return folder / name
    raise MissingFileError(f"{folder} has mlx-whisper's config.json but neither "
                           "weights.safetensors nor weights.npz: copy the weights file beside it")


def rename_mlx_whisper(weights: Mapping[str, mx.array]) -> dict[str, mx.array]:
    """mlx-whisper's parameter names and layouts as transformers': its convolutions (out,
    kernel, in) become (out, in, kernel); the alignment heads (no parameter of transformers')
    are dropped, and the encoder's sinusoids are not stored by either."""
    out = {}
    for name, value in weights.items():
        if name == "alignment_heads":
            continue
        new = renamed(name, to_mlx_whisper=False)
        if not new.startswith("model."):
            raise ConfigError(f"mlx-whisper weight {name!r} has no transformers name: the "
                              "folder is not mlx-whisper's Whisper layout")
        if ".conv" in new and new.endswith(".weight"):
            value = value.transpose(0, 2, 1)
        out[new] = value
    return out


def load_weights(folder: Path, raw_config: Mapping) -> dict[str, mx.array]:
    """The folder's weights under transformers' names."""
    if is_mlx_whisper(raw_config):
        return rename_mlx_whisper(mx.load(str(_mlx_whisper_file(folder))))
    if is_ct2_whisper(raw_config):
        _, ct2 = read_ct2_whisper(folder, raw_config)
        return {k: mx.array(v) for k, v in transformers_weights(ct2).items()}
    weights: dict[str, mx.array] = {}
    for f in weight_files(folder):
        weights.update(mx.load(str(f)))
    return weights


# what decoding reads of a folder's generation_config.json (the rest is sampling's)
GENERATION_KEYS = ("suppress_tokens", "begin_suppress_tokens", "eos_token_id", "is_multilingual",
                   "length_penalty")


def read_generation(folder: Path) -> dict:
    """The decoding settings of the folder's generation_config.json (a CTranslate2 folder's
    from its config.json; {} where it has none: an mlx-whisper folder)."""
    raw = read_config(folder)
    if is_ct2_whisper(raw):
        return ct2_generation(read_ct2_whisper(folder, raw)[0], raw)
    path = folder / "generation_config.json"
    if not path.is_file():
        return {}
    config = json.loads(path.read_text())
    return {k: config[k] for k in GENERATION_KEYS if k in config}
