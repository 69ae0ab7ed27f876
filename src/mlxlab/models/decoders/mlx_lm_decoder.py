"""A pretrained decoder through mlx-lm's model code: any model (a local folder, a GGUF file, a hub
id: models/sources) whose config.json
`model_type` the installed mlx-lm loads (Llama, Mistral, Qwen2/3, Gemma 3, Phi-3, OLMo 2,
Granite, their MoE variants, ...), float or quantized as `mlx_lm.convert -q` writes it.

`MLXLMDecoder` is the thin adapter between mlx-lm's model and mlxlab: `model(input_ids,
attention_mask=None, cache=None) -> logits`, `make_cache()` (mlx-lm's prompt cache),
`hf_config`, `checkpoint_init`, `max_seq_len` and `architecture`. Nothing else in mlxlab knows
which architecture it holds. The mlx-lm model sits under `lm`, so its parameter names are
mlx-lm's (and so the Hugging Face ones, for most types) behind an `lm.` prefix.

`prepare_for_training` is the one place a loaded pretrained model (this decoder, and
models/vision/vision_language.py's models through their own steps) is made ready to train: quantized
at load (model.quantize), then LoRA / DoRA adapters (float, on a float or quantized base) or full
fine-tuning (rank 0, float bases only).
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlxlab.errors import ConfigError, MissingFileError
from mlxlab.models.adapters.lora import check_lora, check_reach, maybe_apply_lora, targeted_linears
from mlxlab.models.adapters.routed_experts import is_experts
from mlxlab.models.base import HeadSplit, PretrainedModel
from mlxlab.models.decoders.draft_layers import (
    check_freeze_embeddings,
    check_keep_layers,
    freeze_embeddings_and_head,
    keep_first_layers,
)
from mlxlab.models.decoders.gated_delta_swap import use_chunked_gated_delta
from mlxlab.models.decoders.mlx_lm_fused import use_fused_kernels
from mlxlab.models.decoders.packing import attention_segments, check_packable, sequence_mixers
from mlxlab.models.decoders.ssm_swap import use_ssm_scan
from mlxlab.models.hf import check_vocab, read_config
from mlxlab.models.mlx_lm_classes import build_lazy, mlx_lm_config, mlx_lm_version, model_classes
from mlxlab.models.quantized.quantized_cpu import use_fast_cpu_quantized
from mlxlab.models.sources import model_folder
from mlxlab.runtime.cluster import distributed

log = logging.getLogger(__name__)

QUANTIZE_BITS = (None, 4, 8)  # model.quantize
# model.head: lm = the decoder's next-token logits | score = one scalar a position, a linear
# `score` layer (no bias) on the last hidden states, as transformers' *ForSequenceClassification
# (a reward model: objectives/preference/reward.py reads it at a completion's last token)
HEADS = ("lm", "score")
GROUP_SIZE = 64  # mlx_lm.convert's default q_group_size
# mlxlab's projection names (conf/lora: targets) -> the module names mlx-lm's architectures use
# for them; a target that is already a module name (q_proj, gate_proj, ...) is taken as is.
# A hybrid's sequence mixers read their input through one fused projection, reached as attention's
# q/k/v are: a gated delta net's (Qwen3-Next in_proj_qkvz, Qwen3.5 in_proj_qkv; Kimi's and
# OLMo-Hybrid's name q/k/v_proj), Mamba's and LFM2's convolution's in_proj; their out_proj is "out"
MIXER_INPUTS = ("in_proj_qkvz", "in_proj_qkv", "in_proj")
TARGET_ALIASES = {
    "query": ("q_proj", "qkv_proj", "query_key_value", "Wqkv", *MIXER_INPUTS),
    "key": ("k_proj", "qkv_proj", "query_key_value", "Wqkv", *MIXER_INPUTS),
    "value": ("v_proj", "qkv_proj", "query_key_value", "Wqkv", *MIXER_INPUTS),
    "out": ("o_proj", "attention.dense", "out_proj"),
    # a MoE layer's routed experts (mlx-lm stacks them under switch_mlp), every projection
    "experts": ("switch_mlp",),
}


WEIGHTS = "model*.safetensors"  # the files mlx-lm's load_model reads


def model_source(source: str | Path, revision: str | None = None) -> tuple[Path, dict]:
    """The local folder a user's model string (model.pretrained, + model.revision) names
    (models/sources: a folder, a GGUF file, ollama:NAME, a hub id) and its config.json,
    checked before anything is built: its config.json names a model type this mlx-lm loads,
    and it has weights."""
    path = model_folder(source, revision)
    config = read_config(path)
    model_classes(config, path)
    if not any(path.glob(WEIGHTS)):
        raise MissingFileError(f"no {WEIGHTS} weights in {path}; a Hugging Face or mlx-lm model "
                               "folder has them (model.pretrained= names the folder)")
    return path, config


def load_folder(path: str | Path) -> tuple[nn.Module, dict]:
    """mlx-lm's model and config from a local folder, through mlx-lm's own loading (its weight
    names, sanitize and quantized layers), with the hub's rope keys where transformers 5 wrote
    only `rope_parameters` (mlx_lm_config); never a hub download."""
    from mlx_lm.utils import load_model

    path, config = model_source(path)
    try:
        # under a launcher, lazily: an fsdp or tensor rank then reads one whole tensor at a
        # time and keeps its slice (training/parallel/sharding.py), never the whole model
        return load_model(path, lazy=distributed.launched(), strict=True,
                          model_config=mlx_lm_config(config, path),
                          get_model_classes=lambda config: model_classes(config, path))
    except FileNotFoundError:
        raise MissingFileError(f"no {WEIGHTS} weights in {path}; a Hugging Face or "
                               "mlx-lm model folder has them") from None
    except ValueError as e:
        first = str(e).strip().splitlines()[0]
        raise ConfigError(f"{path}: mlx-lm {mlx_lm_version()} cannot load these weights "
                          f"({first[:200]})") from None


def build_from_config(config: Mapping, quantized_layers: Mapping | None,
                      weight_names: list[str] | None) -> nn.Module:
    """The same mlx-lm model without its folder (a checkpoint rebuilds it): the architecture from
    config.json, shaped by mlx-lm's `sanitize` as the folder's weights shaped it (Gemma 3 drops
    its lm_head when the folder has none: the names say so), the layers that were quantized
    quantized again as they were; the weights come from the checkpoint."""
    model = build_lazy(config, "the checkpoint's config")
    if weight_names and hasattr(model, "sanitize"):
        # the model's own (unevaluated) arrays under those names: a sanitize that looks at
        # shapes (LFM2's convolution kernels) sees the shapes it wrote
        own = dict(tree_flatten(model.parameters()))
        model.sanitize({name: own.get(name, mx.zeros((1,))) for name in weight_names})
    if quantized_layers:
        nn.quantize(model, class_predicate=lambda p, _: dict(quantized_layers[p])
                    if p in quantized_layers else False)
    return model


def quantize_as_convert(module: nn.Module, config: Mapping, bits: int,
                        group_size: int = GROUP_SIZE) -> dict:
    """Quantize `module` (an mlx-lm model) in place with mlx-lm's own quantize_model, what
    `mlx_lm.convert -q` runs (every Linear / Embedding whose input size is a multiple of
    group_size, per the architecture's quant_predicate); returns `config` with its
    "quantization" entry."""
    from mlx_lm.utils import quantize_model

    with contextlib.redirect_stdout(io.StringIO()):  # its "[INFO] Quantized" print
        _, config = quantize_model(module, dict(config), group_size, bits)
    return config


def quantized_layer_specs(model: nn.Module) -> dict[str, dict]:
    """{module path: {group_size, bits, mode}} of every quantized layer."""
    return {name: {"group_size": m.group_size, "bits": m.bits, "mode": m.mode}
            for name, m in model.named_modules() if "scales" in m}


def float_layers(model: nn.Module) -> list[str]:
    """The Linear / Embedding layers still in float (what model.quantize would quantize)."""
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear | nn.Embedding) and "scales" not in m]


def lora_targets(lora: Mapping | None) -> Mapping | None:
    """The lora node with mlxlab's projection names also spelled as mlx-lm's modules name them."""
    if not lora or not lora.get("targets"):
        return lora
    targets = []
    for t in lora["targets"]:
        targets += [t, *TARGET_ALIASES.get(t, ())]
        if t.startswith("experts."):  # Hugging Face's spelling of one expert projection
            targets.append(f"switch_mlp.{t.removeprefix('experts.')}")
    return {**lora, "targets": list(dict.fromkeys(targets))}


class MLXLMDecoder(PretrainedModel):
    """`model(input_ids, attention_mask=None, cache=None) -> (B, T, vocab_size)` logits of an
    mlx-lm model loaded from `pretrained` (a local folder), or rebuilt from `hf_config` (+
    `quantized_layers`) when a checkpoint supplies the weights (checkpoint_init).

    `attention_mask` is accepted for the common call and not needed: mlxlab's decoder batches
    are right-padded, so with causal attention no real position sees the padding after it.
    """

    def __init__(
        self,
        vocab_size: int,
        num_labels: int | None = None,  # accepted for the common constructor; unused
        pretrained: str | None = None,
        revision: str | None = None,
        lora: Mapping | None = None,
        quantize: int | None = None,
        dropout: float = 0.0,
        hf_config: Mapping | None = None,
        quantized_layers: Mapping | None = None,
        weight_names: list[str] | None = None,
        head: str = "lm",
        keep_layers: int | None = None,
        freeze_embeddings: bool = False,
    ):
        super().__init__()
        check_head(head)
        if dropout:
            raise ConfigError(f"model.dropout={dropout}: mlx-lm's decoders have no dropout; "
                              "leave it at 0")
        if pretrained:  # a folder, a GGUF file, ollama:NAME or a hub id (models/sources)
            folder = model_folder(pretrained, revision)
            lm, config = load_folder(folder)
            if keep_layers:  # a draft: the folder's embeddings, first blocks, norm and head
                lm, config = keep_first_layers(lm, config, keep_layers, pretrained)
            # every weight mlx-lm loads comes from the folder (strict), and quantizing it at
            # load is a function of those bytes: a rebuild gives the same base
            self._base = {"pretrained": str(pretrained), "revision": revision,
                          "folder": str(folder)}
        elif hf_config:
            lm = build_from_config(hf_config, quantized_layers, weight_names)
            config = dict(hf_config)
        else:
            raise ConfigError("model.pretrained=??? : name the model: a local folder, a .gguf "
                              "file, ollama:NAME[:TAG] or a hub id ORG/NAME")
        self.lm = lm
        use_chunked_gated_delta(lm)  # its gated-delta layers (if any) train in chunks
        use_ssm_scan(lm)  # its Mamba-2 layers (if any) scan through the kernel
        self._hf_config = dict(config)
        self.vocab_size = int(config.get("vocab_size")
                              or (config.get("text_config") or {}).get("vocab_size"))
        check_vocab(vocab_size, self.vocab_size, pretrained or "the checkpoint")
        self.max_seq_len = int(config.get("max_position_embeddings")
                               or config.get("max_sequence_length") or 4096)
        self._architecture = {
            "model_type": config.get("model_type"), "vocab_size": self.vocab_size,
            "num_layers": len(lm.layers), "hidden_size": config.get("hidden_size"),
            "max_seq_len": self.max_seq_len}
        self._quantized_layers = dict(quantized_layers or {})
        # mlx-lm's names of the folder's weights: what its sanitize saw (build_from_config)
        self._weight_names = sorted(n for n, _ in tree_flatten(lm.parameters()))
        self.head = head
        if head == "score":
            self._add_score_head(config)
            if lora:  # the new head trains in full beside the adapters
                lora = {**lora, "extra_trainable": [*(lora.get("extra_trainable") or ()),
                                                    "score"]}
        self._freeze_embeddings = freeze_embeddings
        prepare_for_training(self, quantize=quantize, lora=lora, rebuilt=not pretrained)

    def quantize_at_load(self, bits: int | None) -> None:
        """model.quantize: the float layers quantized as `mlx_lm.convert -q` does; layers stored
        quantized (a GGUF's blocks) stay; a folder quantized throughout is refused."""
        stored = quantized_layer_specs(self.lm)
        if bits and stored and not float_layers(self.lm):
            raise ConfigError("model.quantize is set but the folder is already quantized: "
                              "leave model.quantize=null to train it as it is")
        if bits:
            config = quantize_as_convert(self.lm, self._hf_config, int(bits))
            config["quantization"].update(
                (self._hf_config.get("quantization") or {}) if stored else {})
            self._hf_config = config
        self._quantized_layers = quantized_layer_specs(self.lm)

    def adapt(self, lora: Mapping | None, rebuilt: bool) -> str:
        """Adapters on model.lora.targets (which layers they reached said once), the embeddings
        and head frozen with model.freeze_embeddings; what trains, in words."""
        if maybe_apply_lora(self, lora_targets(lora)) and not rebuilt:
            check_reach(self.lm, lora.get("targets") or (), TARGET_ALIASES)
        if self._freeze_embeddings:
            check_freeze_embeddings(self._freeze_embeddings, lora)
            freeze_embeddings_and_head(self.lm)
        rank = int((lora or {}).get("rank", 0))
        base = (f"{self.quantized_bits()}-bit quantized" if self.quantized
                else str(_float_dtype(self)))
        if rank:
            return (f"{lora.get('kind', 'lora')} adapters (rank {rank}, float32) on the frozen "
                    f"{base} base")
        if self._freeze_embeddings:
            return f"every parameter but the embeddings and head ({base})"
        return f"every parameter ({base}, full fine-tuning)"

    def use_cpu_kernels(self) -> None:
        # On the CPU, quantized layers (under their adapters too) multiply through the fused
        # dequantize + float GEMM: MLX's own quantized matmul runs ~30x slower there.
        fast = use_fast_cpu_quantized(self.lm) if self.quantized else 0
        if fast:
            log.debug("%d quantized layers multiply through the CPU's fused dequantize + GEMM",
                      fast)
        # On the CPU, attention, SwiGLU, RMSNorm, RoPE and a hybrid's short convolutions and
        # their SiLU take mlxlab's fused kernels (each call checks that they apply, else runs
        # mlx-lm's own code: Metal, CUDA, generation, kernels off).
        log.debug("%d attention / SwiGLU / RMSNorm / RoPE / convolution / SiLU routes to the "
                  "fused CPU kernels", use_fused_kernels(self.lm))

    @property
    def described(self) -> str:
        return f"{self.architecture['model_type']} decoder"

    def _add_score_head(self, config: Mapping) -> None:
        """`score`: hidden_size -> 1 without bias, drawn as transformers initialises it
        (normal, std = the config's initializer_range); it reads mlx-lm's `model` (the decoder
        stack and its final norm), which every architecture that has one returns hidden
        states from."""
        if "model" not in self.lm:
            raise ConfigError(f"model.head=score reads the hidden states of mlx-lm's `model` "
                              f"module, which {config.get('model_type')} does not have: use a "
                              "Llama-like decoder (llama, qwen2, qwen3, mistral, ...)")
        hidden = int(config.get("hidden_size") or (config.get("text_config") or {})["hidden_size"])
        std = float(config.get("initializer_range") or 0.02)
        self.score = nn.Linear(hidden, 1, bias=False)
        self.score.weight = mx.random.normal((1, hidden)) * std
        self._architecture["head"] = "score"

    @classmethod
    def check_config(cls, node: Mapping[str, Any]) -> None:
        """Everything the model node can get wrong, before anything is created: the folder
        (model_source), dropout, quantize, the lora node, and that lora targets name layers of
        this architecture (asked of the model built lazily: MLX computes no weight of it)."""
        if node.get("dropout"):
            raise ConfigError(f"model.dropout={node['dropout']}: mlx-lm's decoders have no "
                              "dropout; leave it at 0")
        check_quantize(node.get("quantize"))
        check_head(node.get("head", "lm"))
        lora = node.get("lora")
        check_lora(lora)
        check_freeze_embeddings(node.get("freeze_embeddings", False), lora)
        if not node.get("pretrained"):
            return
        path, config = model_source(node["pretrained"], node.get("revision"))
        if node.get("keep_layers") is not None:
            check_keep_layers(node["keep_layers"], config, node["pretrained"])
        if lora and lora.get("rank") and lora.get("targets"):
            targeted_linears(build_lazy(config, path), lora_targets(lora)["targets"])

    @classmethod
    def check_tensor_parallel(cls, node: Mapping[str, Any]) -> None:
        """A MoE's routed experts (mlx-lm's SwitchLinear, asked of the model built lazily) are
        sliced by mlx-lm's `shard` in place, keeping their type: the checkpoint layout would
        take each rank's slice for the whole weight and the gradient clip would count each
        slice once, so tensor parallel is refused for them."""
        if not node.get("pretrained"):
            return  # check_config's line
        path, config = model_source(node["pretrained"], node.get("revision"))
        lm = build_lazy(config, path)
        if any(is_experts(m) for _, m in lm.named_modules()):
            raise ConfigError(f"trainer.distributed.mode=tensor: this {config.get('model_type')} "
                              "model's routed experts are split in a way its checkpoints and "
                              "gradient clip do not follow; use trainer.distributed.mode=fsdp "
                              "or data parallel (auto)")

    @classmethod
    def check_packing(cls, node: Mapping[str, Any]) -> None:
        """data.pack=true: the architecture keeps packed rows apart (models/decoders/packing.py), or
        one line why not, before anything is created: a packed forward pass is traced on the model
        built lazily from its config.json (MLX computes none of it)."""
        path, config = model_source(node["pretrained"], node.get("revision"))
        lm = build_lazy(config, path)
        use_fused_kernels(lm)  # mlx-lm's masks go through packed_mask
        use_chunked_gated_delta(lm)  # a hybrid's rules and scans as training runs them
        use_ssm_scan(lm)
        lm.train()
        model_type = str(config.get("model_type"))
        check_packable(lm, model_type)
        ids = mx.zeros((1, 4), mx.int32)
        with attention_segments(mx.array([[1, 1, 2, 2]]), sequence_mixers(lm.layers), model_type):
            lm(ids)  # a graph only: never evaluated

    @property
    def layers(self) -> list:
        """The decoder blocks (mlx-lm's `model.layers`; export counts them)."""
        return self.lm.layers

    def blocks(self) -> list:
        return list(self.lm.layers)

    @property
    def checkpoint_init(self) -> dict[str, Any]:
        return {"hf_config": dict(self._hf_config),
                "quantized_layers": dict(self._quantized_layers),
                "weight_names": list(self._weight_names)}

    def quantized_bits(self) -> str:
        """The bit widths of the quantized layers, e.g. "4" (mixed: "4/8")."""
        return "/".join(str(b) for b in sorted({s["bits"] for s in self._quantized_layers.values()}))

    def make_cache(self) -> list:
        from mlx_lm.models.cache import make_prompt_cache

        return make_prompt_cache(self.lm)

    def __call__(self, input_ids: mx.array, attention_mask: mx.array | None = None,
                 cache: list | None = None, segment_ids: mx.array | None = None) -> mx.array:
        """`segment_ids` (B, T): a packed batch's rows, each attending only to itself
        (models/decoders/packing.py); refused for a model whose layers cannot keep them apart."""
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, seq_len), got shape {input_ids.shape}")
        if segment_ids is not None:
            model_type = str(self._hf_config.get("model_type"))
            check_packable(self.lm, model_type)
            with attention_segments(segment_ids, sequence_mixers(self.lm.layers), model_type):
                return self._forward(input_ids, cache)
        return self._forward(input_ids, cache)

    def head_split(self) -> HeadSplit | None:
        """mlx-lm's decoder stack and final norm (`model`, under `language_model` for a
        multimodal checkpoint's text) and its `lm_head`, or the embeddings' `as_linear` where
        they are tied; None for a score head or a model without that layout. Whether its call
        is exactly that (no logit scaling or capping) is checked by the caller."""
        text = self.lm.get("language_model", self.lm)
        if self.head != "lm" or "model" not in text or "embed_tokens" not in text["model"]:
            return None

        def hidden(input_ids: mx.array, segment_ids: mx.array | None) -> mx.array:
            if segment_ids is None:
                return text["model"](input_ids)
            check_packable(self.lm, str(self._hf_config.get("model_type")))
            with attention_segments(segment_ids, sequence_mixers(self.lm.layers),
                                    str(self._hf_config.get("model_type"))):
                return text["model"](input_ids)

        if "lm_head" in text:
            return HeadSplit(hidden, text["lm_head"], lambda head, h: head(h))
        return HeadSplit(hidden, text["model"]["embed_tokens"],
                         lambda head, h: head.as_linear(h))

    def _forward(self, input_ids: mx.array, cache: list | None) -> mx.array:
        if self.head == "score":  # (B, T, 1): a score at every position
            return self.score(self.lm.model(input_ids, cache=cache))
        return self.lm(input_ids, cache=cache)


def prepare_for_training(model: PretrainedModel, quantize: int | None, lora: Mapping | None,
                         rebuilt: bool = False) -> None:
    """Everything that makes a loaded pretrained model ready to train, in one place for the text
    decoders here and the vision-language models (models/vision/vision_language.py), each taking its
    own steps (PretrainedModel's quantize_at_load, adapt, use_cpu_kernels): quantization at load
    (model.quantize; a quantized folder stays quantized), then LoRA / DoRA adapters in float32
    on the (possibly quantized) base, or full fine-tuning (rank 0) of a float model. Logs what
    is trained, in which precision, and the trainable / total parameter counts, once (not when
    a checkpoint rebuilds the model)."""
    from mlxlab.models.parameters import num_parameters

    check_quantize(quantize)
    if not rebuilt:  # a rebuild's layers were quantized as its checkpoint's were
        model.quantize_at_load(quantize)
    rank = int((lora or {}).get("rank", 0))
    if model.quantized and lora is not None and rank == 0:  # (None: not trained here)
        raise ConfigError("full fine-tuning (model.lora.rank=0) needs a float base and this one "
                          "is quantized: train LoRA adapters (model.lora.rank=8) or give a float "
                          "folder")
    trains = model.adapt(lora, rebuilt)
    model.use_cpu_kernels()
    if rebuilt or lora is None:  # a checkpoint's rebuild, a teacher or a model to score
        return
    log.info("%s: trains %s; %s trainable / %s total parameters", model.described, trains,
             f"{num_parameters(model, trainable_only=True):,}", f"{num_parameters(model):,}")


def check_head(head: Any) -> None:
    if head not in HEADS:
        raise ConfigError(f"model.head={head!r}: use lm (next-token logits) or score (a reward "
                          "model's scalar, objective=reward)")


def check_quantize(quantize: Any) -> None:
    if quantize not in QUANTIZE_BITS or isinstance(quantize, bool):
        raise ConfigError(f"model.quantize={quantize}: use 4, 8 or null")


def _float_dtype(model: MLXLMDecoder) -> str:
    dtypes = {v.dtype for _, v in tree_flatten(model.lm.parameters()) if mx.issubdtype(
        v.dtype, mx.floating)}
    return str(max(dtypes, key=lambda d: d.size) if dtypes else mx.float32).rsplit(".", 1)[-1]
