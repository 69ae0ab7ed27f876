"""mlx-lm's model classes for a config.json: the one lookup the decoder and the GGUF converter
share (which architectures the installed mlx-lm has)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from mlxlab.errors import ConfigError


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
    try:
        return _get_classes(dict(config))
    except (ValueError, KeyError):
        raise ConfigError(
            f"{source}: model_type={config.get('model_type')!r} is not an architecture mlx-lm "
            f"{mlx_lm_version()} loads; give a folder of a type it supports (or a newer mlx-lm)"
        ) from None
