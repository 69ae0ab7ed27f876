"""The members the rest of mlxlab may ask of any model, with defaults (the model side of the
DataModule and Tracker contracts).

Every model mlxlab builds subclasses `Model`; the trainer refuses one that does not (a TypeError
naming this class), and then calls these members directly: no hasattr probing. A model
overrides what it has: a pretrained one its `checkpoint_init` and `hf_config`, a decoder its
`make_cache` and `max_seq_len`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlxlab.errors import ConfigError
from mlxlab.models.qat_settings import check_qat


@dataclass(frozen=True)
class HeadSplit:
    """A language model's logits in two parts: `hidden(input_ids, segment_ids)` its last hidden
    states (B, T, D), and `apply(head, h)` the output head, `head` the module holding its
    weights (its trainable parameters are the head's gradient's): model(ids) equals
    apply(head, hidden(ids, None))."""

    hidden: Callable[[mx.array, mx.array | None], mx.array]
    head: nn.Module
    apply: Callable[[nn.Module, mx.array], mx.array]


class Model(nn.Module):
    """An `nn.Module` whose `model(input_ids, attention_mask=None) -> logits` the trainer calls."""

    # The longest sequence the model takes (export's tokenizer_config model_max_length).
    max_seq_len: int = 512
    # Whether its forward pass can be traced by mx.compile (trainer.compile=true); config/fit.py
    # refuses a compiled run of a model that cannot.
    compiles: bool = True

    def __init__(self) -> None:
        super().__init__()
        # Every resolved size and choice (defaults filled in): what export describes. "_": a
        # Python dict beside the parameters, not one of them.
        self._architecture: dict[str, Any] = {}

    @classmethod
    def check_node(cls, node: Mapping[str, Any]) -> None:
        """What config.validate asks of the model node: the QAT settings of its lora node
        (models/qat_settings.py check_qat: every model's, whether or not its check_config reads the
        node), then check_config."""
        check_qat(node.get("lora") or {})
        cls.check_config(node)

    @classmethod
    def check_config(cls, node: Mapping[str, Any]) -> None:
        """The model node's settings (its keys, resolved), checked before anything is created
        (config.validate asks): one ConfigError line for one that cannot work. Default: the
        constructor checks them when the model is built."""

    @classmethod
    def check_packing(cls, node: Mapping[str, Any]) -> None:
        """data.pack=true with this model (its node, resolved): one ConfigError line unless the
        model keeps packed rows apart (`segment_ids` in its call: models/decoders/packing.py).
        Default: it does not."""
        raise ConfigError(f"data.pack=true: {cls.__name__} does not take packed rows (a decoder "
                          "does: model.pretrained=<folder> or the presets' Transformer); set "
                          "data.pack=false")

    @classmethod
    def check_tensor_parallel(cls, node: Mapping[str, Any]) -> None:
        """trainer.distributed.mode=tensor with this model (its node, resolved): one ConfigError
        line for what its split cannot keep, before anything is created. Default: nothing here
        (training/parallel/tensor.py refuses what has no recipe)."""

    @property
    def architecture(self) -> dict[str, Any]:
        return dict(self._architecture)

    def update_architecture(self, **changes: Any) -> None:
        """Sizes a model operation changed (training/model_ops.py: grown layers, a wider MLP)."""
        self._architecture.update(changes)

    @property
    def checkpoint_init(self) -> dict[str, Any]:
        """Constructor arguments a checkpoint keeps besides the config (state.json's model_init),
        so the model is rebuilt without the pretrained folder it came from."""
        return {}

    @property
    def base_source(self) -> dict[str, Any] | None:
        """Where the frozen weights come from, when building the model again from its config
        gives them bit for bit: {"pretrained", "revision", "folder"} (a checkpoint then holds
        only the trained parameters: training/checkpointing.py). None: every weight is the
        checkpoint's to keep (a model from scratch, or one whose frozen weights are random)."""
        return None

    @property
    def processor_folder(self) -> str | None:
        """The folder whose processor lays out pictures for this model (a vision-language
        model's pretrained folder); None: the model reads text only."""
        return None

    @property
    def hf_config(self) -> dict[str, Any] | None:
        """The config.json of the pretrained checkpoint this model started from, if any."""
        return None

    def blocks(self) -> list:
        """The repeated decoder blocks (what trainer.grad_checkpoint recomputes); [] for a model
        without them."""
        return []

    def head_split(self) -> HeadSplit | None:
        """This model's logits as its output head over its last hidden states (what
        objective.head_chunk applies a chunk of rows at a time); None where they are not split
        so (the default)."""
        return None

    def save_native(self, run_dir: Path) -> Path | None:
        """The model written in its own library's format into the run folder (a
        sentence-transformers folder for an embedder), at the end of a run that holds the best
        weights; returns where, or None for a model without such a format (the default)."""
        return None

    def make_cache(self) -> list | None:
        """Per-layer KV caches for token-by-token generation (`model(ids, cache=...)`); None:
        the model does not generate."""
        return None


class PretrainedModel(Model):
    """A model started from a pretrained folder through another library's model code (mlx-lm's
    decoders, mlx-vlm's vision-language models): its constructor sets the folder's config.json
    (`_hf_config`), the layers stored quantized (`_quantized_layers`: path -> group size and
    bits) and where the frozen weights come from (`_base`, see base_source)."""

    def __init__(self) -> None:
        super().__init__()
        self._hf_config: dict[str, Any] = {}
        self._quantized_layers: dict[str, Any] = {}
        self._base: dict[str, Any] | None = None

    @property
    def base_source(self) -> dict[str, Any] | None:
        return dict(self._base) if self._base else None

    @property
    def hf_config(self) -> dict[str, Any]:
        return dict(self._hf_config)

    @property
    def quantized(self) -> bool:
        """Whether some of its layers are quantized (QLoRA's base, or a quantized folder)."""
        return bool(self._quantized_layers)

    # The steps mlx_lm_decoder.prepare_for_training takes the loaded model through, each its own

    def quantize_at_load(self, bits: int | None) -> None:
        """model.quantize=`bits` (None: none) on its float layers, refusing a folder quantized
        already; then `_quantized_layers` says which layers are."""
        raise NotImplementedError

    def adapt(self, lora: Mapping | None, rebuilt: bool) -> str:
        """The model.lora node applied: adapters on its targets (what they reached said unless
        `rebuilt`: a checkpoint's rebuild), or every parameter trainable (rank 0); returns what
        trains, in words, for the log."""
        raise NotImplementedError

    def use_cpu_kernels(self) -> None:
        """On the CPU, its quantized layers and attention onto mlxlab's fused kernels."""
        raise NotImplementedError

    @property
    def described(self) -> str:
        """What the log calls it ("qwen3 decoder")."""
        raise NotImplementedError
