"""The one way a config node is checked: it becomes a frozen record, and the record checks its keys.

A config node (Hydra's plain mapping, or code's dict) is built into its record by `record`, which
names a key the record does not have in one line; the record's `__post_init__` then checks each
of its own keys once, with `check_number` and `check_choice`. Every failure is a ConfigError whose
message names the key and the fix, which mlxlab-train prints as one line. This module imports
only errors.py, so every floor (data/, models/, config/, training/) builds its records with it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

from mlxlab.errors import ConfigError

__all__ = ["check_choice", "check_fraction", "check_number", "record", "utf8_text"]

R = TypeVar("R")


def record(kind: type[R], value: Any, key: str, owner: str | None = None) -> R:
    """`value`, the config node `key`, as the frozen dataclass `kind`: a mapping is built (its
    `_`-keys, Hydra's `_target_` and friends, left out), a key `kind` does not have is one
    ConfigError naming it and the keys `kind` takes ("data.packing.sq_len is not a setting of
    data.packing: it takes [...]"; `owner` words the last part, e.g. "data=csv"). Anything else
    (a record already, or None where the caller gives None a meaning) comes back as it is."""
    if not isinstance(value, Mapping):
        return value
    names = [f.name for f in fields(kind) if f.init]
    given = {str(k): v for k, v in value.items() if not str(k).startswith("_")}
    unknown = [k for k in given if k not in names]
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]} is not a setting of {owner or key}: it takes "
                          f"{names}")
    return kind(**given)


def check_number(key: str, value: Any, kind: type, low: float | None = None) -> None:
    """`value` of config key `key` is a `kind` (int or float) >= `low`; else one ConfigError line
    naming the key and the fix."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(
            f"{key} must be a number, got {value!r}: fix the override, e.g. {key}=3e-4"
            if kind is float
            else f"{key} must be an integer, got {value!r}: fix the override, e.g. {key}=4"
        )
    if kind is int and float(value) != int(value):
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if low is not None and float(value) < low:
        raise ConfigError(f"{key} must be >= {low}, got {value!r}")


def check_fraction(key: str, value: Any) -> None:
    """`value` of config key `key` is a number strictly between 0 and 1 (a share of the rows)."""
    check_number(key, value, float, 0.0)
    if not 0.0 < float(value) < 1.0:
        raise ConfigError(f"{key} must be between 0 and 1, got {value}")


def check_choice(key: str, value: Any, allowed: tuple) -> None:
    """`value` of config key `key` is one of `allowed`; else one ConfigError line listing them."""
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not one of {list(allowed)}")


def utf8_text(path: str | Path) -> str:
    """The text of a file the user gave (a data or task file), read as UTF-8; a byte that is
    not UTF-8 is one ConfigError naming the file, the line and the fix, not a
    UnicodeDecodeError's position in bytes."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: byte 0x{data[e.start]:02x} is not UTF-8 ({e.reason}): "
                          "save the file as UTF-8, e.g. iconv -f latin1 -t utf-8") from None
