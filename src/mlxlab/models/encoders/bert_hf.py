"""Load a pretrained Hugging Face BERT from a local directory into BertClassifier, and name its
parameters both ways (reading a folder's config.json and weights in general is models/hf.py).

The directory holds config.json and model.safetensors (tokenizer.json is for the data side).
HF names map one to one onto ours (see _RULES); Linear weights are (out, in) in both, so no
transposes. The MLM head (cls.*) is unused; a missing or differently-sized classifier keeps its
fresh init, so a bare BertModel checkpoint fine-tunes to any label set.
"""

from __future__ import annotations

import re
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlxlab.errors import ConfigError
from mlxlab.models.adapters.lora import lora_base_name_map
from mlxlab.models.hf import read_config, weight_files
from mlxlab.runtime.memory.io_threads import load_arrays

# (HF name without the "bert." prefix, ours); the first matching rule wins.
_RULES = [
    (r"^embeddings\.LayerNorm\.", "encoder.embeddings.norm."),
    (r"^embeddings\.(word|position|token_type)_embeddings\.", r"encoder.embeddings.\1_embeddings."),
    (
        r"^encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)\.",
        r"encoder.layers.\1.attention.\2.",
    ),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"encoder.layers.\1.attention.out."),
    (
        r"^encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.",
        r"encoder.layers.\1.attention_norm.",
    ),
    (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"encoder.layers.\1.mlp.up."),
    (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"encoder.layers.\1.mlp.down."),
    (r"^encoder\.layer\.(\d+)\.output\.LayerNorm\.", r"encoder.layers.\1.mlp_norm."),
    (r"^pooler\.dense\.", "pooler."),
    (r"^classifier\.", "classifier."),
]
# Parts a checkpoint may lack: they keep the fresh init (task heads).
_OPTIONAL = ("classifier.", "pooler.")


# The inverse: (ours, HF name with its "bert." prefix where it has one).
_EXPORT_RULES = [
    (r"^encoder\.embeddings\.norm\.", "bert.embeddings.LayerNorm."),
    (r"^encoder\.embeddings\.(\w+)_embeddings\.", r"bert.embeddings.\1_embeddings."),
    (r"^encoder\.layers\.(\d+)\.attention\.(query|key|value)\.",
     r"bert.encoder.layer.\1.attention.self.\2."),
    (r"^encoder\.layers\.(\d+)\.attention\.out\.", r"bert.encoder.layer.\1.attention.output.dense."),
    (r"^encoder\.layers\.(\d+)\.attention_norm\.",
     r"bert.encoder.layer.\1.attention.output.LayerNorm."),
    (r"^encoder\.layers\.(\d+)\.mlp\.up\.", r"bert.encoder.layer.\1.intermediate.dense."),
    (r"^encoder\.layers\.(\d+)\.mlp\.down\.", r"bert.encoder.layer.\1.output.dense."),
    (r"^encoder\.layers\.(\d+)\.mlp_norm\.", r"bert.encoder.layer.\1.output.LayerNorm."),
    (r"^pooler\.", "bert.pooler.dense."),
    (r"^classifier\.", "classifier."),
]


def mlxlab_to_hf_name(name: str) -> str:
    """'encoder.layers.0.attention.query.weight' -> 'bert.encoder.layer.0.attention.self.query.weight'
    (BertForSequenceClassification's names); the inverse of hf_to_mlxlab_name."""
    for pattern, repl in _EXPORT_RULES:
        if re.match(pattern, name):
            return re.sub(pattern, repl, name)
    raise ValueError(f"{name} has no Hugging Face BERT name (a pre-norm final_norm has none)")


def hf_to_mlxlab_name(name: str) -> str | None:
    """'bert.encoder.layer.0.attention.self.query.weight' -> 'encoder.layers.0.attention.query.weight';
    None for tensors we do not use (MLM head, position_ids buffer)."""
    name = name.removeprefix("bert.")
    # TF-era checkpoints call LayerNorm parameters gamma/beta
    name = re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", name))
    for pattern, repl in _RULES:
        if re.match(pattern, name):
            return re.sub(pattern, repl, name)
    return None


def bert_config_from_hf(path: str | Path, model_types: tuple[str, ...] = ("bert",)) -> dict:
    """BertClassifier keyword arguments (sizes, eps, dropout, vocab_size) from config.json;
    `model_types`: the BERT-layout types the caller reads (an embedder's: RoBERTa's too)."""
    path = Path(path)
    c = read_config(path)
    if c.get("model_type", "bert") not in model_types:
        raise ConfigError(
            f"{path}/config.json has model_type={c['model_type']!r}; only 'bert' is supported "
            "(model=hf_decoder loads a decoder)"
        )
    if c.get("hidden_act", "gelu") != "gelu":
        raise ConfigError(
            f"hidden_act={c['hidden_act']!r} in {path}; only exact 'gelu' is supported"
        )
    if c.get("position_embedding_type", "absolute") != "absolute":
        raise ConfigError(f"{path}: only absolute position embeddings are supported")
    try:
        return dict(
            vocab_size=c["vocab_size"],
            hidden_size=c["hidden_size"],
            num_layers=c["num_hidden_layers"],
            num_heads=c["num_attention_heads"],
            intermediate_size=c["intermediate_size"],
            max_position=c["max_position_embeddings"],
            type_vocab_size=c.get("type_vocab_size", 2),
            dropout=c.get("hidden_dropout_prob", 0.1),
            layer_norm_eps=c.get("layer_norm_eps", 1e-12),
            norm_position="post",
        )
    except KeyError as e:
        raise ConfigError(f"{path}/config.json lacks {e.args[0]!r}; is it a BERT config?") from None


def _read_weights(path: Path) -> dict[str, mx.array]:
    weights = {}
    for f in weight_files(path):
        weights.update(load_arrays(f))
    return weights


def assign_weights(
    model: nn.Module, weights: dict[str, mx.array], rename, reinit: tuple[str, ...] = ()
) -> tuple[dict[str, mx.array], list[str], list[str]]:
    """Match checkpoint tensors to the model's parameters through `rename` (checkpoint name ->
    ours or None), LoRA-wrapped layers included. Returns (loaded, unused checkpoint names,
    parameters left missing besides LoRA adapters). A shape mismatch is an error, except for
    parameters under `reinit` prefixes (a task head for another label set), which are skipped."""
    params = dict(tree_flatten(model.parameters()))
    lora_names = lora_base_name_map(model)
    loaded, unused = {}, []
    for name, value in weights.items():
        ours = rename(name)
        ours = lora_names.get(ours, ours)
        if ours not in params or (value.shape != params[ours].shape and ours.startswith(reinit)):
            unused.append(name)
            continue
        if value.shape != params[ours].shape:
            raise ConfigError(
                f"{name} has shape {tuple(value.shape)} but {ours} is "
                f"{tuple(params[ours].shape)}; the config.json does not match the weights"
            )
        loaded[ours] = value.astype(params[ours].dtype)
    adapters = {n for n in params if n.endswith((".lora_a", ".lora_b"))}
    return loaded, sorted(unused), sorted(params.keys() - loaded.keys() - adapters)


def load_hf_bert_weights(model: nn.Module, path: str | Path) -> dict[str, list[str]]:
    """Copy HF BERT weights into `model` (a BertClassifier, LoRA-wrapped or not).

    Returns {"loaded": our names set, "missing": our names kept at init (heads only),
    "unused": HF names ignored}. Any other missing tensor or shape mismatch is an error.
    """
    path = Path(path)
    read_config(path)
    loaded, unused, missing = assign_weights(
        model, _read_weights(path), hf_to_mlxlab_name, reinit=("classifier.",)
    )
    if required := [n for n in missing if not n.startswith(_OPTIONAL)]:
        raise ConfigError(f"{path} lacks {len(required)} BERT weights, e.g. {required[:3]}")
    model.load_weights(list(loaded.items()), strict=False)
    return {"loaded": sorted(loaded), "missing": missing, "unused": unused}
