"""A ModernBERT config.json as transformers reads it, checked before anything is built: each
layer's attention kind and rotary base (transformers 5 writes them as `layer_types` and
`rope_parameters`; older configs as global_attn_every_n_layers, global_rope_theta,
local_rope_theta), and what mlxlab's ModernBERT (modernbert_encoder.py, on mlx-embeddings)
computes as transformers does. Imports no mlx-embeddings: a folder is checked without it, and
`require_mlx_embeddings` is the one line naming the install."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mlxlab.errors import ConfigError

INSTALL = 'pip install "mlxlab[modernbert]"'
GLOBAL, SLIDING = "full_attention", "sliding_attention"
# transformers' activation names -> MLX's GELU `approx`: "gelu" is the exact (erf) one
GELU_APPROX = {"gelu": "none", "gelu_pytorch_tanh": "precise", "gelu_new": "precise"}


def require_mlx_embeddings() -> Any:
    """mlx-embeddings' ModernBERT module, or one ConfigError line naming the install."""
    try:
        from mlx_embeddings.models import modernbert
    except ModuleNotFoundError as err:
        if not str(err.name).startswith("mlx_embeddings"):
            raise
        raise ConfigError(f"a ModernBERT encoder runs on mlx-embeddings' MLX code: {INSTALL}") \
            from None
    return modernbert


def layer_types(config: Mapping) -> list[str]:
    """Each layer's attention, full or sliding, as transformers reads the config."""
    count = int(config["num_hidden_layers"])
    kinds = config.get("layer_types")
    if kinds:
        if len(kinds) != count or set(kinds) - {GLOBAL, SLIDING}:
            raise ConfigError(f"layer_types {kinds} does not give {GLOBAL} or {SLIDING} for each "
                              f"of the {count} layers")
        return list(kinds)
    every = int(config.get("global_attn_every_n_layers", 3))
    return [GLOBAL if i % every == 0 else SLIDING for i in range(count)]


def rope_bases(config: Mapping) -> dict[str, float]:
    """The rotary base of each attention kind (transformers 5's rope_parameters, else the
    older keys, else transformers' defaults)."""
    params = config.get("rope_parameters") or {}
    bases = {GLOBAL: float(config.get("global_rope_theta", 160000.0)),
             SLIDING: float(config.get("local_rope_theta") or 10000.0)}
    for kind in bases:
        entry = params.get(kind) or {}
        if entry.get("rope_type", "default") != "default":
            raise ConfigError(f"rope_parameters.{kind}.rope_type={entry['rope_type']!r}; mlxlab's "
                              "ModernBERT has the default rotary positions")
        bases[kind] = float(entry.get("rope_theta", bases[kind]))
    return bases


def check_modernbert_config(config: Mapping, where: object) -> None:
    """What mlx-embeddings' ModernBERT computes as transformers does (one line otherwise)."""
    act = config.get("hidden_activation", "gelu")
    if act not in GELU_APPROX:
        raise ConfigError(f"{where}: hidden_activation={act!r}; mlxlab's ModernBERT has "
                          f"{', '.join(GELU_APPROX)}")
    if int(config["hidden_size"]) % int(config["num_attention_heads"]):
        raise ConfigError(f"{where}: hidden_size is not a multiple of num_attention_heads")
    layer_types(config)
    rope_bases(config)
