"""A finished run as a Hugging Face folder: config.json, model.safetensors, tokenizer files.

Decoders become LlamaForCausalLM / Qwen2ForCausalLM (or keep the pretrained checkpoint's own
config, so an imported Mistral leaves as a Mistral); BERT classifiers become
BertForSequenceClassification with id2label/label2id from the run's label values. The weights
are the model's parameters renamed (models/hf_llama.py, models/hf.py) and cast to one dtype.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from tokenizers import Tokenizer, processors

from mlxlab.data.tokenizer import EOT_TOKENS, PAD_TOKENS, find_token_id, start_ids
from mlxlab.models.base import Model
from mlxlab.models.bert import BertClassifier
from mlxlab.models.hf import mlxlab_to_hf_name as bert_hf_name
from mlxlab.models.hf_llama import to_hf_name as decoder_hf_name
from mlxlab.models.transformer import Transformer

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
# Gated decoder MLPs as a Llama config.json's hidden_act: transformers' LlamaMLP (and Qwen2's,
# Mistral's) computes down(act(gate(x)) * up(x)) with ACT2FN[hidden_act]; "gelu" is the exact GELU.
HF_ACTIVATIONS = {"swiglu": "silu", "geglu": "gelu"}
SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
              "chat_template.jinja", "chat_template.json")


class ExportError(ValueError):
    """The run cannot be expressed in the asked format; the message says why and what to do."""


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def decoder_config(model: Transformer, tokenizer: Tokenizer, dtype: str) -> dict:
    """config.json of a decoder: the pretrained checkpoint's own (round trip), or a llama/qwen2
    config describing a model trained from scratch here."""
    a = model.architecture
    if model.hf_config is not None:
        config = model.hf_config
        for key in ("quantization", "quantization_config"):
            config.pop(key, None)
    else:
        if (a["norm"], a["positions"]) != ("rmsnorm", "rope") or a["mlp"] not in HF_ACTIVATIONS:
            raise ExportError(
                f"norm={a['norm']}, mlp={a['mlp']}, positions={a['positions']} has no Llama "
                "equivalent: only rmsnorm + rope decoders with a gated MLP (mlp=swiglu, the "
                "default, or geglu) export"
            )
        if a["qkv_bias"] and not a["out_bias"] and not a["mlp_bias"]:
            kind, extra = "qwen2", {"use_sliding_window": False}
        elif a["qkv_bias"] == a["out_bias"]:
            kind, extra = "llama", {"attention_bias": a["qkv_bias"], "mlp_bias": a["mlp_bias"]}
        else:
            raise ExportError("an output-projection bias without q/k/v biases has no HF model")
        eos = find_token_id(tokenizer, EOT_TOKENS, "end-of-text")
        bos = (start_ids(tokenizer) or [eos])[0]
        config = {
            "architectures": [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[kind]],
            "model_type": kind,
            "vocab_size": a["vocab_size"],
            "hidden_size": model.embed_tokens.weight.shape[1],
            "intermediate_size": a["mlp_dim"],
            "num_hidden_layers": a["num_layers"],
            "num_attention_heads": a["num_heads"],
            "num_key_value_heads": a["num_kv_heads"],
            "head_dim": a["head_dim"],
            "max_position_embeddings": a["max_seq_len"],
            "rms_norm_eps": a["norm_eps"],
            "rope_theta": a["rope_theta"],
            "rope_scaling": a["rope_scaling"],
            "tie_word_embeddings": a["tie_embeddings"],
            "hidden_act": HF_ACTIVATIONS[a["mlp"]],
            "bos_token_id": bos,
            "eos_token_id": eos,
            **extra,
        }
    config["torch_dtype"] = config["dtype"] = dtype  # transformers 4 reads the first, 5 the second
    return config


def bert_config(model: BertClassifier, label_values: list) -> dict:
    a = model.architecture
    if a["norm_position"] != "post" or not a["pooler"]:
        raise ExportError(
            "BertForSequenceClassification is post-norm with a pooler; this run has "
            f"norm_position={a['norm_position']}, pooler={a['pooler']}: train with "
            "model.norm_position=post model.pooler=true (or start from model.pretrained)"
        )
    if a["type_vocab_size"] < 1:
        raise ExportError("BERT in transformers needs token types: train with type_vocab_size>=1")
    labels = [str(v) for v in label_values]
    return {
        "architectures": ["BertForSequenceClassification"],
        "model_type": "bert",
        "vocab_size": a["vocab_size"],
        "hidden_size": a["hidden_size"],
        "num_hidden_layers": a["num_layers"],
        "num_attention_heads": a["num_heads"],
        "intermediate_size": a["intermediate_size"],
        "hidden_act": "gelu",
        "max_position_embeddings": a["max_position"],
        "type_vocab_size": a["type_vocab_size"],
        "layer_norm_eps": a["layer_norm_eps"],
        "hidden_dropout_prob": a["dropout"],
        "attention_probs_dropout_prob": 0.0,  # mlxlab's fused attention has no such dropout
        "position_embedding_type": "absolute",
        "id2label": dict(enumerate(labels)),
        "label2id": {v: i for i, v in enumerate(labels)},
        "problem_type": "single_label_classification",
    }


def hf_weights(model: nn.Module, dtype: str) -> dict[str, mx.array]:
    """The model's parameters under Hugging Face names, cast to `dtype` (LoRA fused before)."""
    rename = decoder_hf_name if isinstance(model, Transformer) else bert_hf_name
    cast = DTYPES[dtype]
    out = {}
    for name, value in tree_flatten(model.parameters()):
        # packed quantized weights stay uint32
        out[rename(name)] = value if value.dtype == mx.uint32 else value.astype(cast)
    return out


def write_tokenizer(run_dir: Path, tokenizer_path: Path, out: Path, model: Model) -> None:
    """tokenizer.json + tokenizer_config.json (+ the pretrained folder's side files). A tokenizer
    trained here gets a post-processor that starts texts with end-of-text, as mlxlab's training
    and generation do, so transformers and mlx-lm encode prompts to the same ids."""
    copied = [n for n in SIDE_FILES if (run_dir / n).is_file()]
    for name in copied:
        shutil.copyfile(run_dir / name, out / name)
    tok = Tokenizer.from_file(str(tokenizer_path))
    if "tokenizer_config.json" in copied:
        shutil.copyfile(tokenizer_path, out / "tokenizer.json")
        return
    if isinstance(model, BertClassifier):
        specials = {"cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]",
                    "unk_token": "[UNK]", "mask_token": "[MASK]"}
        specials = {k: v for k, v in specials.items() if tok.token_to_id(v) is not None}
    else:
        eos = tok.id_to_token(find_token_id(tok, EOT_TOKENS, "end-of-text"))
        pad = tok.id_to_token(find_token_id(tok, PAD_TOKENS + EOT_TOKENS, "padding"))
        if not start_ids(tok):
            tok.post_processor = processors.TemplateProcessing(
                single=f"{eos} $A", pair=f"{eos} $A $B", special_tokens=[(eos, tok.token_to_id(eos))]
            )
        specials = {"bos_token": eos, "eos_token": eos, "pad_token": pad}
        if getattr(tok.model, "unk_token", None):  # a remapped vocabulary's (export/remapped.py)
            specials["unk_token"] = tok.model.unk_token
    tok.save(str(out / "tokenizer.json"))
    _write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": int(model.max_seq_len),  # models/base.py: 512 unless the model's
        "clean_up_tokenization_spaces": False,
        **specials,
    })


def write_generation_config(config: dict, out: Path) -> None:
    if (out / "generation_config.json").exists() or config.get("model_type") == "bert":
        return
    _write_json(out / "generation_config.json", {
        "bos_token_id": config.get("bos_token_id"),
        "eos_token_id": config.get("eos_token_id"),
        "do_sample": False,
    })


def save_weights(weights: dict[str, mx.array], out: Path, fmt: str) -> None:
    mx.eval(weights)
    # transformers reads "pt"-format safetensors; mlx-lm writes "mlx" (both open either)
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": fmt})
