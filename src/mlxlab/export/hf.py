"""A finished run as a Hugging Face folder: config.json, model.safetensors, tokenizer files.

A decoder fine-tuned from a pretrained folder (models/decoders/mlx_lm_decoder.py) keeps that
folder's config.json and its mlx-lm weight names, which are the Hugging Face ones but where mlx-lm's
sanitize rewrote them (MoE experts stacked, DeepSeek-V3's kv_b_proj split, ...), undone per
architecture (architectures.py: only the proven ones export); a decoder trained from scratch
(models/decoders/transformer.py) becomes LlamaForCausalLM / Qwen2ForCausalLM. BERT classifiers
become BertForSequenceClassification with id2label/label2id from the run's label values. The weights
are the model's parameters renamed and cast to one dtype.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from tokenizers import Tokenizer, processors

from mlxlab.data.chat import stop_ids
from mlxlab.data.tokenizer import PAD_TOKENS, end_of_text_ids, start_ids
from mlxlab.export.architectures import layout_of
from mlxlab.models.base import Model
from mlxlab.models.decoders.mlx_lm_decoder import MLXLMDecoder
from mlxlab.models.decoders.transformer import Transformer
from mlxlab.models.embedders.cross_encoder import CrossEncoderModel, torch_path
from mlxlab.models.encoders.bert import BertClassifier
from mlxlab.models.encoders.bert_hf import mlxlab_to_hf_name as bert_hf_name

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
# Gated decoder MLPs as a Llama config.json's hidden_act: transformers' LlamaMLP (and Qwen2's,
# Mistral's) computes down(act(gate(x)) * up(x)) with ACT2FN[hidden_act]; "gelu" is the exact GELU.
HF_ACTIVATIONS = {"swiglu": "silu", "geglu": "gelu"}
SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
              "chat_template.jinja", "chat_template.json")


# mlxlab's Transformer path inside a decoder layer -> the Hugging Face (and mlx-lm) Llama one.
_LAYER_NAMES = {
    "attention.query": "self_attn.q_proj",
    "attention.key": "self_attn.k_proj",
    "attention.value": "self_attn.v_proj",
    "attention.out": "self_attn.o_proj",
    "mlp.gate": "mlp.gate_proj",
    "mlp.up": "mlp.up_proj",
    "mlp.down": "mlp.down_proj",
    "attention_norm": "input_layernorm",
    "mlp_norm": "post_attention_layernorm",
}
_TOP_NAMES = {"embed_tokens": "model.embed_tokens", "norm": "model.norm", "lm_head": "lm_head"}
class ExportError(ValueError):
    """The run cannot be expressed in the asked format; the message says why and what to do."""


def transformer_hf_name(name: str) -> str:
    """A from-scratch Transformer's parameter -> its Hugging Face Llama name:
    'layers.0.attention.query.weight' -> 'model.layers.0.self_attn.q_proj.weight' (also for
    lora_a/lora_b and quantized scales/biases leaves)."""
    module, _, leaf = name.rpartition(".")
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", module)
    hf = (f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
          if m and m.group(2) in _LAYER_NAMES else _TOP_NAMES.get(module))
    if hf is None:
        raise ValueError(f"{name} has no Hugging Face Llama name; is this a decoder parameter?")
    return f"{hf}.{leaf}"


def decoder_name(model: nn.Module, name: str) -> str:
    """A decoder parameter's name in mlx-lm's layout (Hugging Face's for all but MoE experts)."""
    if isinstance(model, MLXLMDecoder):
        return name.removeprefix("lm.")
    return transformer_hf_name(name)


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def decoder_config(model: Model, tokenizer: Tokenizer, dtype: str,
                   keep_quantization: bool = False) -> dict:
    """config.json of a decoder: the pretrained checkpoint's own (round trip; its quantization
    entry kept only for a quantized mlx-lm folder), or a llama/qwen2 config describing a model
    trained from scratch here."""
    a = model.architecture
    if model.hf_config is not None:
        config = model.hf_config
        if not keep_quantization:
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
        eos = end_of_text_ids(tokenizer)[0]
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
    config = {
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
    if isinstance(model, CrossEncoderModel):  # what sentence-transformers' CrossEncoder reads
        config["sentence_transformers"] = {"activation_fn": torch_path(model.activation)}
        if len(labels) == 1:  # one relevance score, as CrossEncoder trains it
            config["problem_type"] = "regression"
    return config


def hf_weights(model: nn.Module, dtype: str, fmt: str = "hf") -> dict[str, mx.array]:
    """The model's parameters under Hugging Face names (fmt="hf") or mlx-lm's ("mlx-lm": MoE
    experts stay stacked), cast to `dtype` (LoRA fused before)."""
    cast = DTYPES[dtype]
    out = {}
    for name, value in tree_flatten(model.parameters()):
        ours = (decoder_name(model, name) if isinstance(model, (Transformer, MLXLMDecoder))
                else bert_hf_name(name))
        # packed quantized weights stay uint32
        out[ours] = value if value.dtype == mx.uint32 else value.astype(cast)
    if fmt != "hf" or not isinstance(model, MLXLMDecoder):
        return out
    return layout_of(model.architecture["model_type"]).to_hf(out, model.hf_config or {})


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
        eos_id = end_of_text_ids(tok, run_dir, model.hf_config)[0]  # the model's, else ours
        eos = tok.id_to_token(eos_id)
        pad = next((t for t in PAD_TOKENS if tok.token_to_id(t) is not None), eos)
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


def write_generation_config(config: dict, out: Path, tokenizer: Tokenizer, run_dir: Path) -> None:
    """generation_config.json (unless the pretrained folder's was copied): greedy, stopping on
    the model's own stop ids (data/chat.py stop_ids: its template's end of turn, its EOS ids),
    as `mlxlab generate` does, so transformers' generate ends a Gemma reply at <end_of_turn>."""
    if (out / "generation_config.json").exists() or config.get("model_type") == "bert":
        return
    stops = stop_ids(tokenizer, run_dir, config)
    _write_json(out / "generation_config.json", {
        "bos_token_id": config.get("bos_token_id"),
        "eos_token_id": stops[0] if len(stops) == 1 else stops,
        "do_sample": False,
    })


def save_weights(weights: dict[str, mx.array], out: Path, fmt: str) -> None:
    mx.eval(weights)
    # transformers reads "pt"-format safetensors; mlx-lm writes "mlx" (both open either)
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": fmt})
