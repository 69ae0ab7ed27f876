"""A Whisper written as transformers' WhisperForConditionalGeneration folder: model.safetensors
under transformers' names (the model keeps them: models/speech/whisper.py; the output
projection tied to the token embedding is not stored, as transformers saves it), the base's
config.json and generation_config.json, and the tokenizer and feature-extractor files
WhisperProcessor reads.

A CTranslate2 or mlx-whisper base has neither transformers' config.json nor its generation
config or preprocessor_config.json: the config is the one mlxlab translated on loading, the
generation config names Whisper's special tokens from the tokenizer (the prompt transformers'
generate builds) and the suppressed tokens mlxlab decodes with, and the feature extractor is
WhisperFeatureExtractor's for the model's num_mel_bins."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from mlxlab.export.hf import DTYPES
from mlxlab.export.speech.source import WhisperSource

# the tokenizer's and feature extractor's files a transformers Whisper folder may hold
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "normalizer.json", "added_tokens.json", "special_tokens_map.json")
PREPROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
TASKS = ("transcribe", "translate")


def whisper_hf_weights(model: Any, dtype: str) -> dict[str, mx.array]:
    """The model's parameters under transformers' names, cast to `dtype`."""
    return {name: value.astype(DTYPES[dtype]) for name, value in
            tree_flatten(model.parameters())}


def write_hf_folder(source: WhisperSource, out: Path, dtype: str) -> None:
    """The transformers folder (module docstring) into `out`."""
    model, base = source.model, source.base_folder
    weights = whisper_hf_weights(model, dtype)
    mx.eval(weights)
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "pt"})
    config = dict(model.config)
    config["architectures"] = ["WhisperForConditionalGeneration"]
    config["model_type"] = "whisper"
    config["torch_dtype"] = config["dtype"] = dtype  # transformers 4 reads the first, 5 the second
    config.pop("quantization", None)
    _write_json(out / "config.json", config)
    if (base / "generation_config.json").is_file():
        shutil.copyfile(base / "generation_config.json", out / "generation_config.json")
    else:
        _write_json(out / "generation_config.json", generation_config(model, source.tokenizer))
    write_processor_files(base, out, source.tokenizer, int(config["num_mel_bins"]))


def write_processor_files(base: Path, out: Path, tokenizer: Any, n_mels: int) -> None:
    """The base's tokenizer files and feature-extractor settings copied as they are; a base
    without transformers' tokenizer_config.json gets the tokenizer transformers loaded from it
    saved, one without preprocessor_config.json WhisperFeatureExtractor's for `n_mels`."""
    if (base / "tokenizer_config.json").is_file():
        for name in TOKENIZER_FILES:
            if (base / name).is_file():
                shutil.copyfile(base / name, out / name)
    else:
        tokenizer.save_pretrained(str(out))
    copied = [n for n in PREPROCESSOR_FILES if (base / n).is_file()]
    for name in copied:
        shutil.copyfile(base / name, out / name)
    if "preprocessor_config.json" not in copied:
        from transformers import WhisperFeatureExtractor

        WhisperFeatureExtractor(feature_size=n_mels).save_pretrained(str(out))


def generation_config(model: Any, tokenizer: Any) -> dict:
    """transformers' Whisper generation config for a base that has none: the special tokens
    from the tokenizer, the suppressed tokens and end token mlxlab decodes with."""
    token = tokenizer.convert_tokens_to_ids
    config, decoding = model.config, model.generation_config
    eos = decoding.get("eos_token_id", config.get("eos_token_id"))
    languages = {t: i for t, i in tokenizer.get_added_vocab().items() if _is_language(t)}
    multilingual = decoding.get("is_multilingual", bool(languages))
    out = {
        "decoder_start_token_id": int(config.get("decoder_start_token_id")
                                      or token("<|startoftranscript|>")),
        "eos_token_id": eos, "pad_token_id": config.get("pad_token_id", eos),
        "bos_token_id": config.get("bos_token_id", eos),
        "max_length": int(config.get("max_target_positions", 448)),
        "suppress_tokens": list(decoding.get("suppress_tokens") or []),
        "begin_suppress_tokens": list(decoding.get("begin_suppress_tokens") or []),
        "no_timestamps_token_id": token("<|notimestamps|>"),
        "is_multilingual": bool(multilingual),
    }
    if multilingual:
        out["lang_to_id"] = languages
        out["task_to_id"] = {task: token(f"<|{task}|>") for task in TASKS}
    return out


def _is_language(token: str) -> bool:
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    return token.startswith("<|") and token[2:-2] in LANGUAGES


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
