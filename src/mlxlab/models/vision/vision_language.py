"""A pretrained vision-language model through mlx-vlm's model code: any folder (or hub id,
or 4-bit mlx-community folder) whose config.json `model_type` the installed mlx-vlm loads
(SmolVLM / Idefics3, Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Gemma 3, PaliGemma, LLaVA, Mistral 3, ...).

`VisionLanguageModel` is the thin adapter between mlx-vlm's model and mlxlab, as
`MLXLMDecoder` is for mlx-lm: `model(input_ids, pixel_values=..., ...) -> logits`, where the
image inputs are the batch's `pixel_*` / `image_*` arrays exactly as the model's processor
made them (data/vision_chat.py); mlx-vlm's forward places the image features at the image
placeholder tokens. The mlx-vlm model sits under `vlm`, so parameter names are mlx-vlm's (the
hub's, for most families) behind a `vlm.` prefix.

What trains (`model.lora`): adapters on the language model's `targets` (mlxlab's projection
names, as for text decoders), and with `model.lora.modules` also the projector (trained in
full: a few million parameters, the LLaVA recipe) and adapters on the vision tower's attention.
`model.quantize=4|8` quantizes the language model at load (QLoRA); a quantized folder stays
quantized. On the CPU its quantized layers multiply through mlxlab's fused dequantize + float
GEMM (models/quantized/quantized_cpu.py), as a text decoder's do. Rank 0 trains every parameter of a
float model.

mlx-vlm's image merge indexes on the host (numpy), which `mx.compile` cannot trace: a vision
model's step runs uncompiled (`compiles = False`; config/fit.py refuses trainer.compile=true).
mlx-vlm is an optional extra (`pip install 'mlxlab[vision]'`), imported when a model is built.
"""

from __future__ import annotations

import functools
import importlib
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from mlxlab.config.vision_families import VisionFamily, family_ways
from mlxlab.errors import ConfigError, MissingFileError
from mlxlab.models.adapters.lora import apply_lora, check_lora, check_reach, targeted_linears
from mlxlab.models.base import PretrainedModel
from mlxlab.models.decoders.mlx_lm_decoder import check_quantize, lora_targets, prepare_for_training
from mlxlab.models.hf import read_config
from mlxlab.models.quantized.quantized_cpu import use_fast_cpu_quantized
from mlxlab.models.sources import model_folder

log = logging.getLogger(__name__)

INSTALL = "pip install 'mlxlab[vision]'"
# model.lora.modules: the parts of a vision-language model that train, each the attribute names
# mlx-vlm's families give it (the first one a model has is the part)
PARTS = {
    "language_model": ("language_model",),
    "projector": ("multi_modal_projector", "connector", "mm_projector", "aligner"),
    "vision_tower": ("vision_tower", "vision_model", "vision_encoder"),
}
DEFAULT_PARTS = ("language_model",)
# the vision towers' attention projections (SigLIP / CLIP: q/k/v/out_proj; Qwen's: qkv, proj)
VISION_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "qkv", "proj")
GROUP_SIZE = 64


def mlx_vlm():
    """mlx-vlm's utils module, or one line saying how to install it."""
    try:
        return importlib.import_module("mlx_vlm.utils")
    except ImportError:
        raise ConfigError(f"vision-language models need mlx-vlm: {INSTALL}") from None


def is_vision_config(config: Mapping) -> bool:
    """Whether a config.json describes a vision-language model (its vision settings)."""
    return "vision_config" in config or "vision_tower" in config


def family_module(config: Mapping, where: str | Path) -> Any:
    """mlx-vlm's module for this config's `model_type`, or one line naming the type and the
    families this mlx-vlm has."""
    utils = mlx_vlm()
    model_type = utils.get_model_type(dict(config))
    if model_type is None:
        raise ConfigError(f"{where}/config.json has no model_type: it is no Hugging Face model "
                          "folder")
    try:
        return importlib.import_module(f"mlx_vlm.models.{model_type}")
    except ImportError:
        import mlx_vlm.models as models

        have = sorted(p.name for p in Path(models.__file__).parent.iterdir()
                      if p.is_dir() and (p / "config.py").exists())
        raise ConfigError(f"{where}: model_type {model_type!r} is not a vision-language family "
                          f"mlx-vlm {version()} loads (it has {len(have)}: "
                          f"{', '.join(have[:12])}, ...); use one of them") from None


def version() -> str:
    from importlib.metadata import version as installed

    return installed("mlx-vlm")


def model_source(source: str | Path, revision: str | None = None) -> tuple[Path, dict]:
    """The local folder `model.pretrained` names and its config.json, checked before anything
    is built: a vision-language family mlx-vlm loads, with weights."""
    path = model_folder(source, revision)
    config = read_config(path)
    if not is_vision_config(config):
        raise ConfigError(f"{source} is a text model ({config.get('model_type')}, no "
                          "vision_config): use model=hf_decoder for it")
    family_module(config, path)
    if not any(path.glob("*.safetensors")):
        raise MissingFileError(f"no *.safetensors weights in {path}; a Hugging Face or "
                               "mlx-vlm model folder has them")
    return path, config


def build(config: Mapping) -> nn.Module:
    """mlx-vlm's model of `config` with its weights uncomputed (for checks, and for a
    checkpoint's rebuild), the way mlx-vlm's load_model builds it."""
    utils = mlx_vlm()
    config = {**config}
    config.setdefault("text_config", config.pop("llm_config", {}))
    config.setdefault("vision_config", {})
    config.setdefault("audio_config", {})
    family = family_module(config, "the checkpoint's config")
    # from_dict may complete `config` in place (Qwen2/2.5-VL copy their top-level text settings
    # into text_config), which the module configs below read: it gets the dict, not a copy
    model_config = family.ModelConfig.from_dict(config)
    model_config = utils.update_module_configs(model_config, family, config,
                                               ["text", "vision", "perceiver", "projector",
                                                "audio"])
    return family.Model(model_config)


def fix_config(vlm: nn.Module, config: Mapping) -> None:
    """Where mlx-vlm reads a setting Hugging Face's config.json does not hold (or holds where
    mlx-vlm does not look), the setting transformers means, as the family's row says
    (config/vision_families.py).
    - Gemma 3 (and PaliGemma): mlx-vlm scales image features by a top-level `hidden_size`
      that transformers' config does not write; its default, 2048, would stand in for the
      language model's width (images at 1.12x their scale at Gemma 3 4B's width).
    - LLaVA, PaliGemma: the language model's rope base and RMSNorm eps as transformers reads
      them: transformers 5 writes the base under `rope_parameters`, where mlx-vlm's text
      config does not look (it keeps its default, 10000)."""
    family = family_ways(config.get("model_type"))
    if family.image_scale_from_text_width and "hidden_size" not in config:
        vlm.config.hidden_size = vlm.config.text_config.hidden_size
    if family.text_defaults_from_transformers:
        _text_settings(vlm.language_model, config.get("text_config") or {})


def _text_settings(language_model: nn.Module, text: Mapping) -> None:
    """The rope base and RMSNorm eps of `text` (transformers' reading) on the language model's
    RoPE and RMSNorm modules, where mlx-vlm built them otherwise."""
    base = text.get("rope_theta", (text.get("rope_parameters") or {}).get("rope_theta"))
    eps = text.get("rms_norm_eps")
    settings = language_model.config
    for _, module in language_model.named_modules():
        if base is not None and isinstance(module, nn.RoPE):
            module.base = float(base)
        elif eps is not None and type(module).__name__.endswith("RMSNorm"):
            module.eps = float(eps)
    if base is not None:
        settings.rope_theta = float(base)
    if eps is not None:
        settings.rms_norm_eps = float(eps)


def mlx_vlm_config(config: Mapping) -> dict:
    """config.json as mlx-vlm 0.7 reads it (an export's): for a family whose text settings
    fix_config reads as transformers does, the rope base written where mlx-vlm looks (the
    text settings' `rope_theta`, not only transformers 5's `rope_parameters`)."""
    config = dict(config)
    text = dict(config.get("text_config") or {})
    if family_ways(config.get("model_type")).text_defaults_from_transformers \
            and "rope_theta" not in text and "rope_theta" in (text.get("rope_parameters") or {}):
        config["text_config"] = {**text, "rope_theta": text["rope_parameters"]["rope_theta"]}
    return config


def part(vlm: nn.Module, name: str) -> tuple[str, nn.Module] | None:
    """(attribute, module) of a part (PARTS) of mlx-vlm's model, or None where it has none."""
    for attribute in PARTS[name]:
        module = vlm
        for piece in attribute.split("."):
            module = module.get(piece) if isinstance(module, dict | nn.Module) else None
        if isinstance(module, nn.Module):
            return attribute, module
    return None


def check_modules(modules: Any) -> tuple[str, ...]:
    if modules is None:
        return DEFAULT_PARTS
    if isinstance(modules, str) or not all(m in PARTS for m in modules):
        raise ConfigError(f"model.lora.modules={modules!r}: a list of {list(PARTS)} (the "
                          "parts that train; default [language_model])")
    return tuple(modules)


class VisionLanguageModel(PretrainedModel):
    """`model(input_ids, attention_mask=None, cache=None, **image_inputs) -> (B, T, vocab)`
    logits of an mlx-vlm model loaded from `pretrained`, or rebuilt from `hf_config` when a
    checkpoint supplies the weights."""

    compiles = False  # mlx-vlm's image merge reads array values on the host (module docstring)

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
    ):
        super().__init__()
        check_quantize(quantize)
        if dropout:
            raise ConfigError(f"model.dropout={dropout}: mlx-vlm's models have no dropout; "
                              "leave it at 0")
        if pretrained:
            folder, config = model_source(pretrained, revision)
            vlm = mlx_vlm().load_model(folder, lazy=True)  # read weight by weight: below
            self._base = {"pretrained": str(pretrained), "revision": revision,
                          "folder": str(folder)}
        elif hf_config:
            config = dict(hf_config)
            vlm = build(config)
            if quantized_layers:
                nn.quantize(vlm, class_predicate=lambda p, _: dict(quantized_layers[p])
                            if p in quantized_layers else False)
        else:
            raise ConfigError("model.pretrained=??? : name the vision-language model: a local "
                              "folder or a hub id ORG/NAME")
        self.vlm = vlm
        self._family: VisionFamily = family_ways(config.get("model_type"))
        fix_config(vlm, config)
        if self._family.batched_merge:
            use_batched_merge(vlm)
        self._hf_config = dict(config)
        text = config.get("text_config") or {}
        self.vocab_size = int(text.get("vocab_size") or config.get("vocab_size"))
        if vocab_size and vocab_size > self.vocab_size:
            raise ConfigError(f"the tokenizer has {vocab_size} tokens and the model's "
                              f"embedding {self.vocab_size}: give the model's own tokenizer")
        self.max_seq_len = int(text.get("max_position_embeddings")
                               or config.get("max_position_embeddings") or 4096)
        self._architecture = {
            "model_type": config.get("model_type"), "vocab_size": self.vocab_size,
            "num_layers": len(self.layers), "hidden_size": text.get("hidden_size",
                                                                    config.get("hidden_size")),
            "max_seq_len": self.max_seq_len, "vision": True}
        self._quantized_layers = dict(quantized_layers or {})
        # the decoder's preparation, with this model's own steps (below); a checkpoint's
        # rebuild has its layers quantized as they were and gets its adapters on them
        prepare_for_training(self, quantize, lora, rebuilt=not pretrained)
        if pretrained:
            # one weight at a time: with model.quantize each float weight is read, quantized
            # and let go (MLX's buffer cache too) before the next, so the float checkpoint is
            # never whole in memory
            for _, value in tree_flatten(self.vlm.parameters()):
                mx.eval(value)
                mx.clear_cache()

    def quantize_at_load(self, bits: int | None) -> None:
        """model.quantize: the language model's Linear and Embedding layers whose input is a
        multiple of the group size; a folder quantized already is refused."""
        if bits and self._quantized():
            raise ConfigError("model.quantize is set but the folder is already quantized: "
                              "leave model.quantize=null to train it as it is")
        if bits:
            nn.quantize(self.vlm.language_model, group_size=GROUP_SIZE, bits=int(bits),
                        class_predicate=lambda _, m: isinstance(m, nn.Linear | nn.Embedding)
                        and m.weight.shape[-1] % GROUP_SIZE == 0)
        self._quantized_layers = self._quantized()

    def adapt(self, lora: Mapping | None, rebuilt: bool) -> str:
        """Adapters on the parts model.lora.modules names (module docstring), or every
        parameter trainable (rank 0); what trains, in words."""
        if lora is None:  # a model to score or generate from
            return "nothing"
        lora = dict(lora)
        parts = check_modules(lora.pop("modules", None))
        check_lora(lora)
        rank = int(lora.get("rank", 0))
        if rank == 0:
            self.unfreeze()
            return "every parameter (full fine-tuning)"
        self.freeze()
        self._adapt(lora, parts, said=not rebuilt)
        return f"{lora.get('kind', 'lora')} adapters (rank {rank}) on {', '.join(parts)}"

    def use_cpu_kernels(self) -> None:
        # On the CPU, quantized layers (under their adapters too) multiply through the fused
        # dequantize + float GEMM: MLX's own quantized matmul runs ~30x slower there.
        if self._quantized_layers:
            use_fast_cpu_quantized(self.vlm)
        use_fused_vision_attention(self.vlm)

    @property
    def described(self) -> str:
        return f"{self._architecture['model_type']} vision-language model (mlx-vlm {version()})"

    def _adapt(self, lora: Mapping, parts: tuple[str, ...], said: bool) -> None:
        settings = {"rank": int(lora["rank"]), "alpha": float(lora.get("alpha", 16.0)),
                    "dropout": float(lora.get("dropout", 0.0)),
                    "kind": str(lora.get("kind", "lora"))}
        targets = lora_targets(lora)["targets"] if lora.get("targets") else ["query", "value"]
        for name in parts:
            found = part(self.vlm, name)
            if found is None:
                raise ConfigError(f"model.lora.modules names {name}, which this "
                                  f"{self._architecture['model_type']} model has no module "
                                  f"for (it has {sorted(k for k, _ in self.vlm.children().items())})")
            _, module = found
            if name == "language_model":
                apply_lora(module, targets=targets, **settings)
                if said:  # once: not again when a checkpoint rebuilds the model
                    check_reach(module, targets)
            elif name == "vision_tower":
                apply_lora(module, targets=VISION_TARGETS, **settings)
            else:  # the projector: small, trained in full
                module.unfreeze()

    def _quantized(self) -> dict[str, dict]:
        return {name: {"group_size": m.group_size, "bits": m.bits, "mode": m.mode}
                for name, m in self.vlm.named_modules() if "scales" in m}

    @classmethod
    def check_config(cls, node: Mapping[str, Any]) -> None:
        """Everything the model node can get wrong, before anything is created: mlx-vlm
        installed, the folder a family it loads, quantize, the lora node and that its targets
        and modules name parts of this model (asked of the model built lazily)."""
        if node.get("dropout"):
            raise ConfigError(f"model.dropout={node['dropout']}: mlx-vlm's models have no "
                              "dropout; leave it at 0")
        check_quantize(node.get("quantize"))
        lora = dict(node.get("lora") or {})
        parts = check_modules(lora.pop("modules", None))
        check_lora(lora)
        if lora.get("qat_bits"):
            raise ConfigError(f"model.lora.qat_bits={lora['qat_bits']}: vision-language models "
                              "train plain LoRA (mlx-vlm's layers): set model.lora.qat_bits=0")
        if not node.get("pretrained"):
            return
        _, config = model_source(node["pretrained"], node.get("revision"))
        if lora.get("rank"):
            vlm = build(config)
            for name in parts:
                found = part(vlm, name)
                if found is None:
                    raise ConfigError(f"model.lora.modules names {name}, which this "
                                      f"{config.get('model_type')} model has no module for")
                if name == "language_model" and lora.get("targets"):
                    targeted_linears(found[1], lora_targets(lora)["targets"])

    @classmethod
    def check_packing(cls, node: Mapping[str, Any]) -> None:
        raise ConfigError("data.pack=true: a vision-language model's rows carry their own "
                          "images, which mlx-vlm's forward cannot keep apart in one packed "
                          "sequence; set data.pack=false")

    @property
    def layers(self) -> list:
        """The language model's decoder blocks."""
        return list(self.vlm.language_model.layers)

    def blocks(self) -> list:
        return self.layers

    @property
    def checkpoint_init(self) -> dict[str, Any]:
        return {"hf_config": dict(self._hf_config),
                "quantized_layers": dict(self._quantized_layers)}

    @property
    def processor_folder(self) -> str | None:
        """The pretrained folder whose processor lays out image prompts (generation)."""
        return (self._base or {}).get("folder")

    def make_cache(self) -> list:
        """mlx-vlm's per-layer caches for the language model."""
        from mlx_vlm.models.cache import make_prompt_cache

        return make_prompt_cache(self.vlm.language_model)

    def __call__(self, input_ids: mx.array, attention_mask: mx.array | None = None,
                 cache: list | None = None, segment_ids: mx.array | None = None,
                 **image_inputs: mx.array) -> mx.array:
        """Logits; `image_inputs` are the processor's arrays (`pixel_values`, and
        `pixel_attention_mask` or `image_grid_thw` where the family has them), and for a
        family whose prefix attends both ways (PaliGemma) `token_type_ids` (0: the prefix, 1:
        the answer and the padding after it). Rows are right-padded (data/vision_chat.py), so
        causal attention needs no mask."""
        if segment_ids is not None:
            raise ConfigError("a vision-language model takes no packed rows; set "
                              "data.pack=false")
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, seq_len), got shape {input_ids.shape}")
        pixel_values = image_inputs.pop("pixel_values", None)
        token_type_ids = image_inputs.pop("token_type_ids", None)
        if not cache or not cache[0].offset:
            self._start_sequence()
        blocks = self._blocks(input_ids, token_type_ids) if pixel_values is not None else None
        if blocks is not None:
            return self._images_in_blocks(input_ids, pixel_values, blocks, cache)
        out = self.vlm(input_ids, pixel_values, mask=None, cache=cache, **image_inputs)
        return out.logits

    def _start_sequence(self) -> None:
        """Forget the previous sequence's image positions: a row or prompt without images
        after one with them would otherwise take that one's M-RoPE positions."""
        language_model = self.vlm.language_model
        for name in self._family.prompt_positions:
            if name in language_model:  # an nn.Module holds its array-valued members as a dict
                setattr(language_model, name, None)

    def _blocks(self, input_ids: mx.array, token_type_ids: mx.array | None) -> mx.array | None:
        """(B, T) block ids of the family's tokens that attend to one another both ways
        (transformers' blocks; 0: causal only), or None where the family has none.
        - "images" (Gemma 3): each image's run of image tokens numbered from 1;
        - "prefix" (PaliGemma, where its config attends both ways): the row's prefix (token
          type 0: its images and prompt; without token types every token but the batch's
          padding, as transformers reads a prompt) as block 1; the answer causal."""
        kind = self._family.blocks
        if kind == "images":
            image = input_ids == self.vlm.config.image_token_index
            # a run starts where an image token follows a token that is not one
            starts = image & ~mx.concatenate([mx.zeros_like(image[:, :1]), image[:, :-1]],
                                             axis=1)
            return mx.where(image, mx.cumsum(starts.astype(mx.int32), axis=1), 0)
        if kind == "prefix" and self.vlm.language_model.config.use_bidirectional_attention:
            prefix = (token_type_ids == 0) if token_type_ids is not None else \
                input_ids != self.vlm.config.pad_token_id
            return prefix.astype(mx.int32)
        return None

    def _images_in_blocks(self, input_ids: mx.array, pixel_values: mx.array, blocks: mx.array,
                          cache: list | None) -> mx.array:
        """mlx-vlm's image merge, then its language model under transformers' mask: causal,
        and the tokens of one block (_blocks) see one another both ways. (mlx-vlm's own
        forward hands Gemma 3's language model the rows' padding mask in place of the causal
        one, and PaliGemma's no mask: every token, padding too, both ways.)"""
        ones = mx.ones(input_ids.shape, mx.int32)
        embeds = self.vlm.get_input_embeddings(input_ids, pixel_values, mask=ones).inputs_embeds
        t = input_ids.shape[1]
        causal = mx.arange(t)[:, None] >= mx.arange(t)[None, :]
        same = (blocks[:, :, None] == blocks[:, None, :]) & (blocks[:, :, None] > 0)
        window = vars(self.vlm.language_model.config).get("sliding_window")
        if window and t > window:
            raise ConfigError(f"a {self._family.name} row with images of {t} tokens is longer "
                              f"than its sliding window ({window}); lower data.max_length to "
                              f"{window}")
        mask = (causal[None] | same)[:, None]
        out = self.vlm.language_model(inputs=input_ids, inputs_embeds=embeds, mask=mask,
                                      cache=cache)
        return out.logits


@functools.cache
def _fused_vision_attention() -> type:
    """mlx-vlm's VisionAttention (the SigLIP / CLIP towers of SmolVLM, Idefics3, Gemma 3,
    PaliGemma, ...) with its attention through kernels.attention: MLX's CPU SDPA over a tower's
    1024 patches spends twice the fused kernel's time in its single-threaded softmax, and the
    frozen tower's forward is most of a LoRA step on the language model (docs/benchmarks.md,
    "Vision-language fine-tuning beside mlx-vlm's trainer"). Elsewhere (another device or
    dtype, a mask the kernel does not take) kernels.attention is MLX's SDPA."""
    from mlx_vlm.models.attention import VisionAttention

    from mlxlab import kernels

    class FusedVisionAttention(VisionAttention):
        def __call__(self, x: mx.array, mask: mx.array | None = None) -> mx.array:
            b, length, _ = x.shape
            q, k, v = (p(x).reshape(b, length, self.num_heads, -1).transpose(0, 2, 1, 3)
                       for p in (self.q_proj, self.k_proj, self.v_proj))
            out = kernels.attention(q, k, v, self.scale, mask)
            return self.out_proj(out.transpose(0, 2, 1, 3).reshape(b, length, -1))

    return FusedVisionAttention


def use_fused_vision_attention(vlm: nn.Module) -> int:
    """Switch the model's mlx-vlm VisionAttention modules (exact type) to the fused class above
    in place (the same parameters and names); returns how many were switched."""
    fused = _fused_vision_attention()
    switched = 0
    for _, module in vlm.named_modules():
        if type(module) is fused.__base__:
            module.__class__ = fused
            switched += 1
    return switched


def scatter_images(embeds: mx.array, input_ids: mx.array, image_token: int,
                   features: mx.array) -> mx.array:
    """`embeds` (B, T, D) with the image tokens' rows taken, in row-major order (row by row,
    left to right), from `features` (images, tokens, D) in the batch's image order: each
    row's images at its own image tokens, whatever the other rows hold."""
    flat = embeds.reshape(-1, embeds.shape[-1])
    where = np.flatnonzero(np.array(input_ids).reshape(-1) == image_token)
    features = features.reshape(-1, features.shape[-1]).astype(embeds.dtype)
    if features.shape[0] != where.size:
        raise ValueError(f"{where.size} image tokens in the batch's ids and {features.shape[0]} "
                         "image features: the ids and pixel arrays are not one batch's")
    flat[mx.array(where, mx.uint32)] = features
    return flat.reshape(embeds.shape)


@functools.cache
def _batched_merge(base: type) -> type:
    """mlx-vlm's LLaVA / PaliGemma model with its image merge taking a batch: mlx-vlm's puts
    the image features at the first row's image positions in every row (LLaVA), or the first
    image's at each row's first positions (PaliGemma); here each row's images go to its own image tokens
    (scatter_images), and rows without images keep their text."""
    from mlx_vlm.models.base import InputEmbeddingsFeatures

    module = base.__module__.rsplit(".", 1)[0].rsplit(".", 1)[-1]

    class LlavaBatched(base):
        def _merge_input_ids_with_image_features(self, image_features: mx.array,
                                                 inputs_embeds: mx.array,
                                                 input_ids: mx.array) -> mx.array:
            return scatter_images(inputs_embeds, input_ids, self.config.image_token_index,
                                  image_features)

    class PaliGemmaBatched(base):
        def get_input_embeddings(self, input_ids: mx.array | None = None,
                                 pixel_values: mx.array | None = None,
                                 mask: mx.array | None = None, **kwargs: Any) -> Any:
            """Every image's features (mlx-vlm's tower returns the first image's as its
            output; its last hidden states hold them all), scaled down by the width the
            language model scales its embeddings up by, at the image tokens (the mask:
            VisionLanguageModel._blocks)."""
            if pixel_values is None:
                return super().get_input_embeddings(input_ids, None, mask, **kwargs)
            embeds = self.language_model.model.embed_tokens(input_ids)
            tower = self.vision_tower.vision_model
            *_, states = tower(pixel_values.transpose(0, 2, 3, 1).astype(embeds.dtype),
                               output_hidden_states=True)
            features = self.multi_modal_projector(tower.post_layernorm(states[-1]))
            scaled = features / (self.config.hidden_size ** 0.5)
            merged = scatter_images(embeds, input_ids, self.config.image_token_index, scaled)
            return InputEmbeddingsFeatures(inputs_embeds=merged)

    batched = {"llava": LlavaBatched, "paligemma": PaliGemmaBatched}[module]
    batched.__name__ = batched.__qualname__ = f"{base.__name__}Batched"
    return batched


def use_batched_merge(vlm: nn.Module) -> None:
    """Switch mlx-vlm's model to its batched-merge class above, in place (the same parameters
    and names)."""
    vlm.__class__ = _batched_merge(type(vlm))


def trainable_summary(model: nn.Module) -> dict[str, int]:
    """Trainable parameters under each top part of mlx-vlm's model (the log and tests)."""
    counts: dict[str, int] = {}
    for name, value in tree_flatten(model.trainable_parameters()):
        key = name.split(".")[1] if name.startswith("vlm.") else name.split(".")[0]
        counts[key] = counts.get(key, 0) + value.size
    return counts
