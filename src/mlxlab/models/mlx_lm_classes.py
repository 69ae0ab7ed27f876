"""mlx-lm's model classes for a config.json: the one lookup the decoder and the GGUF converter
share (which architectures the installed mlx-lm has), and the keys of a transformers 5
config.json that most of mlx-lm's argument classes do not read (rope_keys here; the hybrid
families' keys and weights: models/hf_normalise.py)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

from mlxlab.errors import ConfigError
from mlxlab.models.hf_normalise import family, mlx_lm_keys, mlx_lm_weights


def mlx_lm_version() -> str:
    import mlx_lm

    return mlx_lm.__version__


def model_classes(config: Mapping, source: str | Path) -> tuple[type, type]:
    """mlx-lm's (Model, ModelArgs) classes for a config.json; a model type this mlx-lm does not
    have is one line naming it and the installed version."""
    from mlx_lm.utils import _get_classes

    if config.get("model_file"):
        raise ConfigError(f"{source}/config.json asks to run custom model code ({config['model_file']}"
                          "); mlxlab loads only mlx-lm's own architectures")
    alias = family(config).classes  # a model_type mlx-lm names otherwise
    try:
        model_class, args_class = _get_classes(
            {**config, "model_type": alias} if alias else dict(config))
    except (ValueError, KeyError):
        raise ConfigError(
            f"{source}: model_type={config.get('model_type')!r} is not an architecture mlx-lm "
            f"{mlx_lm_version()} loads; give a folder of a type it supports (or a newer mlx-lm)"
        ) from None
    if family(config).weights is None:
        return model_class, args_class
    return _reading_transformers(model_class, dict(config)), args_class


def _reading_transformers(model_class: type, config: dict) -> type:
    """mlx-lm's model class whose sanitize first puts a transformers 5 folder's tensors in the
    names and shapes it expects (hf_normalise.mlx_lm_weights, read with the folder's config)."""
    def sanitize(self, weights: dict) -> dict:
        return super(reader, self).sanitize(mlx_lm_weights(weights, config))

    reader = type(model_class.__name__, (model_class,), {
        "sanitize": sanitize, "__module__": model_class.__module__,
        "__qualname__": model_class.__qualname__})
    return reader


def mlx_lm_config(config: Mapping, source: str | Path) -> dict:
    """The config.json mlx-lm builds the model from: a transformers 5 folder's keys put as
    mlx-lm reads them (hf_normalise's table for the hybrid families, rope_keys for the rest);
    the config itself where it has the hub's keys already."""
    keys = mlx_lm_keys(config)
    merged = {**config, **keys}
    return {**merged, **rope_keys(merged, model_classes(merged, source)[1])}


def build_lazy(config: Mapping, source: str | Path):
    """mlx-lm's model for a config.json, built without weights (MLX computes none of it)."""
    model_class, args_class = model_classes(config, source)
    return model_class(args_class.from_dict(mlx_lm_config(config, source)))


def rope_keys(config: Mapping, args_class: type) -> dict:
    """The hub's rope keys for a config.json that transformers 5's `save_pretrained` wrote
    (`rope_parameters: {rope_theta, rope_type, ...}`, no top-level `rope_theta`), for an
    mlx-lm argument class that reads only the hub's (llama's, qwen2's: `rope_theta`, default
    10000, and `rope_scaling`): without them such a folder (a model fine-tuned in transformers
    5) would load with the wrong rotary base, silently. Empty where the config has the hub's
    keys, the class reads `rope_parameters` itself, or the parameters are per layer type."""
    params = config.get("rope_parameters")
    fields = {f.name for f in dataclasses.fields(args_class)} if dataclasses.is_dataclass(
        args_class) else set()
    if (not isinstance(params, Mapping) or "rope_theta" in config or "rope_parameters" in fields
            or "rope_theta" not in params):
        return {}
    out = {"rope_theta": params["rope_theta"]}
    scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if scaling.get("rope_type", "default") != "default" and not config.get("rope_scaling"):
        out["rope_scaling"] = scaling
    if "partial_rotary_factor" in scaling and "partial_rotary_factor" not in config:
        out["partial_rotary_factor"] = scaling["partial_rotary_factor"]
    return out
