"""A SentenceEmbedder written as a sentence-transformers folder: the one writer of a run's
`save_native` (the fine-tune at its run's end) and `mlxlab export --format sentence-transformers`
(export/embedder.py, which then reads the folder back).

The folder is written from the model in memory and the folder it was read from (`source`), laid
out as sentence-transformers saves one: modules.json; the Transformer at the top (config.json,
its dtype float32; model.safetensors in the Hugging Face base model's names, float32, every
adapter merged into its layer, BERT's unused pooler kept as the source has it; the tokenizer's
files; sentence_bert_config.json with the length texts are truncated to); 1_Pooling/config.json;
N_Dense/ (config.json, model.safetensors); N_Normalize/; config_sentence_transformers.json (the
source's named prompts, default prompt and similarity function). sentence-transformers and
`load_sentence_embedder` read it as they read the source.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from mlxlab.errors import ConfigError
from mlxlab.models.adapters.adapter_layer import AdapterLayer
from mlxlab.models.embedders.embedder import Dense, SentenceEmbedder
from mlxlab.models.embedders.pooling import LEGACY_FLAGS
from mlxlab.models.embedders.sentence_folder import (
    read_modules,
    sentence_settings,
    truncation_length,
)
from mlxlab.models.encoders.bert import BertEncoder
from mlxlab.models.encoders.bert_hf import mlxlab_to_hf_name
from mlxlab.models.encoders.decoder_encoder import DecoderEncoder
from mlxlab.models.hf import weight_files
from mlxlab.runtime.files.staging import staged_folder
from mlxlab.runtime.memory.io_threads import load_arrays

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.txt", "vocab.json", "merges.txt", "added_tokens.json",
                   "sentencepiece.bpe.model", "spiece.model", "tokenizer.model")
TORCH_ACTIVATIONS = {"Identity": "torch.nn.modules.linear.Identity"}  # else activation.<name>
ST_TYPE = "sentence_transformers.models."  # the module paths every sentence-transformers reads


def save_sentence_folder(model: SentenceEmbedder, source: str | Path, out: str | Path) -> Path:
    """`model` (read from the sentence-transformers folder `source`) as such a folder at `out`,
    written beside it and renamed into place (one that was there is replaced)."""
    out = Path(out)
    with staged_folder(out) as tmp:
        write_sentence_folder(model, Path(source), tmp)
    return out


def write_sentence_folder(model: SentenceEmbedder, source: Path, folder: Path) -> None:
    """`model`'s modules into `folder` (an empty one), as the module docstring lays out."""
    weights = merged_weights(model)
    modules = [("", "Transformer"), ("1_Pooling", "Pooling")]
    _write_transformer(model, weights, read_modules(source)[0][1], folder)
    _write_json(folder / "1_Pooling" / "config.json", pooling_config(model))
    for i, layer in enumerate(model.dense):
        path = f"{len(modules)}_Dense"
        prefix = f"dense.{i}."
        _write_dense(layer, {k.removeprefix(prefix): v for k, v in weights.items()
                             if k.startswith(prefix)}, folder / path)
        modules.append((path, "Dense"))
    if model.normalize:
        path = f"{len(modules)}_Normalize"
        (folder / path).mkdir()
        modules.append((path, "Normalize"))
    _write_json(folder / "modules.json", [
        {"idx": i, "name": str(i), "path": path, "type": ST_TYPE + kind}
        for i, (path, kind) in enumerate(modules)])
    settings = sentence_settings(source)
    prompts = {str(k): str(v) for k, v in (settings.get("prompts") or {}).items()}
    default = settings.get("default_prompt_name")
    _write_json(folder / "config_sentence_transformers.json", {
        "prompts": prompts, "default_prompt_name": default if default in prompts else None,
        "similarity_fn_name": settings.get("similarity_fn_name") or "cosine",
        "model_type": "SentenceTransformer"})


def merged_weights(model: SentenceEmbedder) -> dict[str, mx.array]:
    """The model's weights under their plain names, every adapter merged into its base."""
    weights = dict(tree_flatten(model.parameters()))
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            weights = {k: v for k, v in weights.items() if not k.startswith(f"{name}.")}
            weights.update({f"{name}.{k}": v
                            for k, v in tree_flatten(module.fuse(dequantize=True).parameters())})
    return weights


def encoder_weights(model: SentenceEmbedder,
                    weights: dict[str, mx.array] | None = None) -> dict[str, mx.array]:
    """The encoder's parameters (of `weights`, else the model's merged ones) under the Hugging
    Face base model's names (BertModel's, RobertaModel's, a decoder's Qwen3Model's,
    ModernBertModel's: its own), float32."""
    weights = merged_weights(model) if weights is None else weights
    params = [(k.removeprefix("encoder."), v) for k, v in weights.items()
              if k.startswith("encoder.")]
    if isinstance(model.encoder, DecoderEncoder):
        return {name.removeprefix("decoder."): value.astype(mx.float32) for name, value in params}
    if not isinstance(model.encoder, BertEncoder):  # ModernBERT: transformers' names already
        return {name: value.astype(mx.float32) for name, value in params}
    try:
        return {mlxlab_to_hf_name(f"encoder.{name}").removeprefix("bert."): value.astype(mx.float32)
                for name, value in params}
    except ValueError as err:  # a pre-norm encoder's final norm
        raise ConfigError(f"this encoder has no Hugging Face layout: {err}") from None


def _write_transformer(model: SentenceEmbedder, weights: dict[str, mx.array], source: Path,
                       folder: Path) -> None:
    """config.json (the source Transformer's, its dtype float32), the encoder's weights, the
    tokenizer's files and sentence_bert_config.json."""
    config = json.loads((source / "config.json").read_text())
    config.pop("dtype", None)
    config["torch_dtype"] = "float32"
    _write_json(folder / "config.json", config)
    tensors = {**_unused_source_tensors(source), **encoder_weights(model, weights)}
    mx.save_safetensors(str(folder / "model.safetensors"), tensors, metadata={"format": "pt"})
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, folder / name)
    settings_file = source / "sentence_bert_config.json"
    settings = json.loads(settings_file.read_text()) if settings_file.is_file() else {}
    _write_json(folder / "sentence_bert_config.json",
                {"do_lower_case": False, **settings,
                 "max_seq_length": truncation_length(source, model.encoder.max_length)})


def _unused_source_tensors(source: Path) -> dict[str, mx.array]:
    """BERT's pooler as the source holds it: no embedding reads it, but transformers' BertModel
    has one and would report it missing (and draw it at random) without it."""
    kept = {}
    for file in weight_files(source):
        for name, value in load_arrays(file).items():
            plain = name.removeprefix("bert.").removeprefix("roberta.")
            if plain.startswith("pooler."):
                kept[plain] = value.astype(mx.float32)
    return kept


def pooling_config(model: SentenceEmbedder) -> dict:
    """1_Pooling/config.json: the legacy flags every sentence-transformers reads, or (modes in
    another order than the flags concatenate) the `pooling_mode` list of version 5 and later."""
    config: dict = {"word_embedding_dimension": model.encoder.hidden_size, "include_prompt": True}
    canonical = [mode for mode in LEGACY_FLAGS.values() if mode in model.pooling]
    if canonical == list(model.pooling):
        config.update({flag: mode in model.pooling for flag, mode in LEGACY_FLAGS.items()})
    else:
        config["pooling_mode"] = list(model.pooling)
    return config


def _write_dense(layer: Dense, weights: dict[str, mx.array], folder: Path) -> None:
    out_features, in_features = layer.linear.weight.shape
    name = layer.activation_name
    _write_json(folder / "config.json", {
        "in_features": int(in_features), "out_features": int(out_features),
        "bias": "bias" in layer.linear, "use_residual": bool(layer.use_residual),
        "activation_function": TORCH_ACTIVATIONS.get(name, f"torch.nn.modules.activation.{name}")})
    mx.save_safetensors(str(folder / "model.safetensors"),
                        {k: v.astype(mx.float32) for k, v in weights.items()},
                        metadata={"format": "pt"})


def _write_json(path: Path, value: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n")
