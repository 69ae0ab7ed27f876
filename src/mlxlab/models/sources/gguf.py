"""A GGUF file (llama.cpp's format) as an mlx-lm model folder, from the file alone.

The file's metadata gives config.json (transformers' GGUF key table, so the keys are the hub's:
rope_theta, num_key_value_heads, ...), its tokenizer and chat template give tokenizer.json,
tokenizer_config.json and chat_template.jinja (transformers' own GGUF tokenizer conversion), and
its tensors give model.safetensors under the Hugging Face names mlx-lm loads:

- Q4_0, Q4_1, Q8_0: MLX quantized layers at group size 32, bit for bit (gguf_blocks.py): a QLoRA
  base with nothing dequantized;
- F32, F16, BF16: float, as stored;
- anything else (K-quants, IQ types): dequantized to float32 by gguf-py, with one log line saying
  which and the memory it costs; `model.quantize=4|8` re-quantizes those float layers.

Before anything is converted, the header is checked against the tensors (gguf_header.py: block
count, head counts, widths, vocabulary against the tensors' shapes): a file that contradicts
itself is one line naming it and what disagrees. The folder is written once per file content
(conversions.py: keyed by the file's sha256) under `<MLXLAB_CACHE_DIR>/models/gguf/`, into a
temporary folder that must load in mlx-lm (the model built from it, one forward pass) before it
is renamed into place and marked complete; one that does not load is removed, not kept. Only
architectures whose name mapping and layout fixes are tested are taken (`ARCHITECTURES`); others
are refused in one line before anything is written.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np

from mlxlab.errors import ConfigError
from mlxlab.models.sources.conversions import (
    conversion_folder,
    is_complete,
    new_temporary,
    publish,
    remove_stale_temporaries,
)
from mlxlab.models.sources.gguf_blocks import (
    AFFINE_TYPES,
    GROUP_SIZE,
    affine_from_blocks,
    permute_rows,
)
from mlxlab.models.sources.gguf_header import check_header, check_shapes, tensor_shapes
from mlxlab.models.sources.source import ModelSource
from mlxlab.runtime.files.checksum import file_sha256

log = logging.getLogger(__name__)

# GGUF architecture -> (mlx-lm model_type, what llama.cpp's converter changed that is undone here)
ARCHITECTURES = {
    "llama": ("llama", "permute_qk"),
    "qwen2": ("qwen2", None),
    "qwen3": ("qwen3", None),
    "gemma3": ("gemma3_text", "norm_plus_one"),
    "phi3": ("phi3", None),
}
FLOAT_TYPES = {"F32": np.float32, "F16": np.float16, "BF16": None}  # BF16: read as raw bits
PROBE_IDS = [[0, 1]]  # the forward pass a conversion must run before it is kept


def gguf_folder(path: Path, provenance: dict) -> ModelSource:
    """The cached folder of GGUF file `path` (written on the first call for its content), with
    its sha256."""
    digest = file_sha256(path)
    folder = conversion_folder(digest)
    provenance = {**provenance, "file": str(path.resolve()), "sha256": digest}
    if not is_complete(folder):
        for stale in remove_stale_temporaries(folder.parent):
            log.info("removed %s: an unfinished conversion whose writer is gone", stale)
        _convert(path, folder, provenance)
    return ModelSource(folder, provenance["kind"], provenance)


def read_gguf(path: Path) -> tuple[dict, list]:
    """(metadata {key: value}, tensors) of a GGUF file through gguf-py's reader (llama.cpp's own);
    a file that is not one is one ConfigError."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
        metadata = {key: field.contents() for key, field in reader.fields.items()}
    except Exception as e:  # a truncated or foreign file fails in many ways
        raise ConfigError(f"model.pretrained={path}: not a readable GGUF file ({type(e).__name__}: "
                          f"{str(e)[:120]}); give a .gguf file llama.cpp writes, or a model "
                          "folder") from None
    return metadata, list(reader.tensors)


def config_from_metadata(metadata: dict, shapes: dict[str, tuple[int, ...]], path: Path) -> dict:
    """config.json of the model: transformers' table of GGUF keys -> Hugging Face config keys
    (`shapes`: the file's tensor shapes, gguf_header.tensor_shapes)."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    arch = metadata.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ConfigError(f"model.pretrained={path}: GGUF architecture {arch!r} is not one mlxlab "
                          f"converts yet ({', '.join(sorted(ARCHITECTURES))}); give a Hugging Face "
                          "folder of the model instead")
    model_type, _ = ARCHITECTURES[arch]
    table = GGUF_CONFIG_MAPPING[arch]
    embedding_shape = shapes.get("token_embd.weight", ())
    config: dict = {"model_type": model_type}
    for key, value in metadata.items():
        if key.startswith(f"{arch}.") and table.get(key[len(arch) + 1:]):
            config[table[key[len(arch) + 1:]]] = value
    if "vocab_size" not in config:
        config["vocab_size"] = len(metadata["tokenizer.ggml.tokens"])
    if len(embedding_shape) == 2:  # a vocabulary padded past its tokens has the rows' size
        config["vocab_size"] = embedding_shape[0]
    config["tie_word_embeddings"] = "output.weight" not in shapes
    if f"{arch}.attention.key_length" in metadata:  # the head size where the file states it
        config["head_dim"] = int(metadata[f"{arch}.attention.key_length"])
    if model_type == "gemma3_text":  # what llama.cpp's Gemma 3 graph fixes rather than stores
        config.setdefault("query_pre_attn_scalar", config.get("head_dim"))
        config.setdefault("rope_local_base_freq", 10000.0)
        config.setdefault("sliding_window_pattern", 6)
    config["torch_dtype"] = "float32"
    for token in ("bos_token_id", "eos_token_id", "padding_token_id"):
        if f"tokenizer.ggml.{token}" in metadata:
            config[token.replace("padding", "pad")] = metadata[f"tokenizer.ggml.{token}"]
    return config


def _convert(path: Path, folder: Path, provenance: dict) -> None:
    plan = _plan(path)  # a file that contradicts itself is refused before any folder exists
    log.info("GGUF %s: converting to an mlx-lm folder in %s (once)", path.name, folder)
    tmp = new_temporary(folder)
    try:
        _write_folder(*plan, path, tmp)
        _verify(tmp, path)
        publish(tmp, folder, provenance)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def convert_into(path: Path, folder: Path) -> None:
    """The GGUF file `path` as an mlx-lm folder written into the existing folder `folder`,
    checked (header against tensors, a forward pass in mlx-lm) and not cached: what an export
    reads back from the file it wrote."""
    plan = _plan(path)
    _write_folder(*plan, path, folder)
    _verify(folder, path)


def _plan(path: Path) -> tuple[list, dict, dict, dict]:
    """(tensors, metadata, config, GGUF name -> Hugging Face name) of the file, its header
    checked against its tensors and against mlx-lm's model of its type; nothing written."""
    from mlxlab.models.mlx_lm_classes import model_classes

    metadata, tensors = read_gguf(path)
    shapes = tensor_shapes(tensors)
    config = config_from_metadata(metadata, shapes, path)
    check_header(metadata, shapes, path)
    model_class, args_class = model_classes(config, path)  # mlx-lm has the type: one line if not
    try:
        names, expected = _hf_names(metadata["general.architecture"], config, model_class,
                                    args_class)
    except Exception as e:  # noqa: BLE001 - mlx-lm's model refused the header's settings
        raise ConfigError(f"model.pretrained={path}: mlx-lm's {config['model_type']} model cannot "
                          f"be built from the GGUF header ({type(e).__name__}: {str(e)[:160]}); "
                          "the file is damaged or was written wrong") from None
    check_shapes(expected, names, shapes, metadata, path)
    return tensors, metadata, config, names


def _write_folder(tensors: list, metadata: dict, config: dict, names: dict[str, str],
                  path: Path, tmp: Path) -> None:
    """model.safetensors, config.json and the tokenizer of the file into `tmp` (the weights
    are let go on return, before the folder is loaded to verify it)."""
    import mlx.core as mx

    weights, quantization, dequantized = _tensors(tensors, metadata, config, names, path)
    if dequantized:
        types = ", ".join(f"{n} {t}" for t, n in sorted(dequantized["types"].items()))
        log.warning("GGUF %s: %s tensors dequantized to float32 (MLX has no layout for them): "
                    "%.0f MB in memory for %.0f MB in the file; model.quantize=4 or 8 "
                    "re-quantizes them", path.name, types, dequantized["float_bytes"] / 2**20,
                    dequantized["file_bytes"] / 2**20)
    if quantization:  # the most common width as the default, the others per layer
        widths = [q["bits"] for q in quantization.values()]
        bits = max(set(widths), key=widths.count)
        config["quantization"] = {"group_size": GROUP_SIZE, "bits": bits, "mode": "affine",
                                  **{k: q for k, q in quantization.items() if q["bits"] != bits}}
    mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    _write_tokenizer(metadata, tmp)


def _verify(tmp: Path, path: Path) -> None:
    """The converted folder loads in mlx-lm (its own loader, strict: every weight in place, of
    its shape) and runs a forward pass; else one ConfigError naming the file (the folder is
    then removed, never kept as complete)."""
    import mlx.core as mx
    from mlx_lm.utils import load_model

    from mlxlab.models.mlx_lm_classes import mlx_lm_version

    try:
        model, _ = load_model(tmp, lazy=True, strict=True)
        logits = model(mx.array(PROBE_IDS))
        mx.eval(logits)
    except Exception as e:  # noqa: BLE001 - whatever mlx-lm raises, the file is at fault
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"model.pretrained={path}: its conversion does not load in mlx-lm "
                          f"{mlx_lm_version()} ({first[:200]}); nothing was kept: give a GGUF "
                          "file llama.cpp loads, or a Hugging Face folder of the model") from None


def _hf_names(arch: str, config: dict, model_class: type,
              args_class: type) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    """({GGUF tensor name: Hugging Face name}, {Hugging Face name: shape}) for every parameter
    of the mlx-lm model the config builds (its names are the hub's), through gguf-py's own
    tensor name table."""
    import gguf
    from mlx.utils import tree_flatten

    model = model_class(args_class.from_dict(dict(config)))  # lazy: nothing is allocated
    arch_enum = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch]
    table = gguf.get_tensor_name_map(arch_enum, int(config["num_hidden_layers"]))
    names, shapes = {}, {}
    for hf_name, value in tree_flatten(model.parameters()):
        shapes[hf_name] = tuple(value.shape)
        base, _, suffix = hf_name.rpartition(".")
        gguf_name = table.get_name(base)
        if gguf_name is not None:
            names[f"{gguf_name}.{suffix}"] = hf_name
    return names, shapes


def _tensors(tensors: list, metadata: dict, config: dict, names: dict[str, str],
             path: Path) -> tuple[dict, dict, dict]:
    """(weights by Hugging Face name, per-layer quantization, what was dequantized)."""
    import gguf
    import mlx.core as mx

    fix = ARCHITECTURES[metadata["general.architecture"]][1]
    weights: dict = {}
    quantization: dict = {}
    dequantized = {"types": {}, "float_bytes": 0, "file_bytes": 0}
    unknown = [t.name for t in tensors if t.name not in names]
    if unknown:
        raise ConfigError(f"model.pretrained={path}: tensors {unknown[:3]} have no place in mlx-lm's "
                          f"{config['model_type']} model; the file does not match its "
                          "architecture's layout")
    for tensor in tensors:
        hf_name = names[tensor.name]
        kind = tensor.tensor_type.name
        raw = np.asarray(tensor.data)
        columns = int(tensor.shape[0])  # GGUF lists the fastest-moving dimension first
        if fix == "permute_qk" and kind != "F32" and raw.ndim == 2 and (
                ".attn_q." in tensor.name or ".attn_k." in tensor.name):
            heads = config["num_attention_heads" if ".attn_q." in tensor.name
                           else "num_key_value_heads"]
            raw = permute_rows(raw, int(heads))
        if kind in AFFINE_TYPES and raw.ndim == 2:
            wq, scales, biases = affine_from_blocks(raw, kind, columns)
            module = hf_name.rsplit(".", 1)[0]
            weights[hf_name] = mx.array(wq)
            weights[f"{module}.scales"] = mx.array(scales)
            weights[f"{module}.biases"] = mx.array(biases)
            quantization[module] = {"group_size": GROUP_SIZE, "bits": AFFINE_TYPES[kind][0],
                                    "mode": "affine"}
            continue
        if kind in FLOAT_TYPES:
            values = (mx.array(raw.view(np.uint16)).view(mx.bfloat16) if kind == "BF16"
                      else mx.array(raw))
        else:
            values = mx.array(gguf.quants.dequantize(raw, tensor.tensor_type).astype(np.float32))
            dequantized["types"][kind] = dequantized["types"].get(kind, 0) + 1
            dequantized["float_bytes"] += values.nbytes
            dequantized["file_bytes"] += raw.nbytes
        shape = tuple(int(d) for d in reversed(tensor.shape))
        values = values.reshape(shape) if values.size == int(np.prod(shape)) else values
        if fix == "permute_qk" and kind == "F32" and (".attn_q." in tensor.name
                                                      or ".attn_k." in tensor.name):
            heads = config["num_attention_heads" if ".attn_q." in tensor.name
                           else "num_key_value_heads"]
            values = mx.array(permute_rows(np.array(values), int(heads)))
        if fix == "norm_plus_one" and tensor.name.endswith("norm.weight"):
            values = values - 1  # llama.cpp stores Gemma's RMSNorm scale as 1 + weight
        weights[hf_name] = values
    return weights, quantization, dequantized if dequantized["types"] else {}


# the tokenizer_config.json entries a GGUF states, and the special tokens it names by id
TOKENIZER_KEYS = {"tokenizer.ggml.add_bos_token": "add_bos_token",
                  "tokenizer.ggml.add_eos_token": "add_eos_token"}
SPECIAL_TOKENS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id",
                  "unk_token": "unknown_token_id", "pad_token": "padding_token_id"}


def _write_tokenizer(metadata: dict, folder: Path) -> None:
    """tokenizer.json, tokenizer_config.json and chat_template.jinja from the file's tokenizer,
    built and saved by transformers (its GGUF tokenizer conversion, what
    AutoTokenizer(gguf_file=...) builds): the special tokens, whether BOS / EOS are added, and
    the chat template as the file states them."""
    from transformers import PreTrainedTokenizerFast
    try:  # where transformers keeps its GGUF tokenizer table since 5.2x
        from transformers.integrations.gguf import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer
    except ImportError:  # and before (mlxlab asks for transformers>=5.7)
        from transformers.integrations.ggml import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

    tokenizer_dict = {name: metadata[f"tokenizer.{key}"]
                      for key, name in GGUF_TOKENIZER_MAPPING["tokenizer"].items()
                      if f"tokenizer.{key}" in metadata}
    backend, extra = convert_gguf_tokenizer(metadata["general.architecture"], tokenizer_dict)
    tokens = tokenizer_dict["tokens"]
    config = {name: metadata[key] for key, name in TOKENIZER_KEYS.items() if key in metadata}
    if tokenizer_dict.get("tokenizer_type") == "llama":
        config.setdefault("add_bos_token", True)  # llama.cpp's default for a sentencepiece vocab
    for name, key in SPECIAL_TOKENS.items():
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        if token_id is not None:
            config[name] = tokens[token_id]
    template = metadata.get("tokenizer.chat_template")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **config, **extra,
                                        **({"chat_template": template} if template else {}))
    tokenizer.save_pretrained(str(folder))
