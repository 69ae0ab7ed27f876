"""A draft model for speculative decoding, made from its target's pretrained folder: the decoder's
`model.keep_layers` (the folder's first blocks, its embeddings, final norm and head) and
`model.freeze_embeddings` (the vocabulary table and head kept as loaded while the blocks train).
What a draft is checked against and what it is worth is decoding/speculative.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import mlx.nn as nn

from mlxlab.errors import ConfigError

EMBEDDING_MODULES = ("embed_tokens", "lm_head")  # mlx-lm's names: the input table, an untied head


def check_freeze_embeddings(freeze: Any, lora: Mapping | None) -> None:
    """model.freeze_embeddings is a switch of full fine-tuning: under LoRA the embeddings are
    frozen anyway, so asking for it there would change nothing."""
    if not isinstance(freeze, bool):
        raise ConfigError(f"model.freeze_embeddings={freeze!r}: true or false")
    if freeze and int((lora or {}).get("rank", 0)):
        raise ConfigError("model.freeze_embeddings=true applies to full fine-tuning "
                          "(model.lora.rank=0); LoRA trains no embedding anyway: drop it")


def freeze_embeddings_and_head(lm: nn.Module) -> None:
    """Keep the token embeddings and the output head (tied or not) as loaded: a draft model
    predicts through its target's vocabulary table, and training 49k rows of it from a few
    thousand tokens only moves the logits of tokens the data never shows."""
    found = [m for name, m in lm.named_modules() if name.rsplit(".", 1)[-1] in EMBEDDING_MODULES]
    if not found:
        raise ConfigError("model.freeze_embeddings=true: this architecture has no module named "
                          f"{' or '.join(EMBEDDING_MODULES)} to freeze; leave it false")
    for module in found:
        module.freeze()


def layer_count(config: Mapping) -> int:
    return int(config.get("num_hidden_layers") or (config.get("text_config") or {}).get(
        "num_hidden_layers") or 0)


def check_keep_layers(keep: Any, config: Mapping, source: Any) -> None:
    total = layer_count(config)
    if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep < total:
        raise ConfigError(f"model.keep_layers={keep!r}: {source} has {total} decoder blocks; "
                          f"keep 1 to {total - 1} of them (a draft model), or null for all")


def keep_first_layers(lm: nn.Module, config: dict, keep: int, source: Any
                      ) -> tuple[nn.Module, dict]:
    """The model cut to its first `keep` decoder blocks (its embeddings, final norm and head
    kept): a draft initialised from its target, as speculative decoding's draft training starts
    (decoding/speculative.py). Its config says the new depth, so a checkpoint rebuilds it."""
    check_keep_layers(keep, config, source)
    lm.model.layers = lm.model.layers[:keep]
    config = dict(config)
    if "num_hidden_layers" in config:
        config["num_hidden_layers"] = keep
    else:
        config["text_config"] = {**config["text_config"], "num_hidden_layers": keep}
    for key in ("layer_types",):  # per-block settings follow the blocks kept
        if isinstance(config.get(key), list):
            config[key] = config[key][:keep]
    return lm, config
