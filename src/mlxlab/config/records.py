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

__all__ = ["check_arguments", "check_choice", "check_fraction", "check_number", "check_switches",
           "record",
           "utf8_text"]

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
    built = kind(**given)
    check_switches(built, key)
    return built


def check_switches(settings: Any, key: str) -> None:
    """Each key the record `settings` declares `bool` holds true or false (or null where the
    record allows None): `compile=maybe` would be truthy and run as if true, a setting silently
    read as something the user did not write. Records call it from their `__post_init__`."""
    for f in fields(settings):
        annotation = str(f.type).replace(" ", "")
        if annotation in ("bool", "bool|None"):
            value = getattr(settings, f.name)
            if not isinstance(value, bool) and not (value is None and annotation != "bool"):
                raise ConfigError(f"{key}.{f.name} must be true or false, got {value!r}: fix the "
                                  f"override, e.g. {key}.{f.name}=false")


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


# The annotations check_arguments compares a value with; others (a Sequence, a class) are left
# to the callee.
_PLAIN = {int: "an integer", float: "a number", str: "text", bool: "true or false"}


def _fits(value: Any, hint: Any) -> bool | None:
    """Whether `value` fits the annotation `hint` (None: not one of _PLAIN or their unions)."""
    import types
    import typing

    options = (typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType)
               else (hint,))
    if not all(o in _PLAIN or o is type(None) for o in options):
        return None
    for o in options:
        if o is type(None) and value is None:
            return True
        if o is bool and isinstance(value, bool):
            return True
        if o in (int, float) and isinstance(value, (int, float)) and not isinstance(value, bool) \
                and (o is float or float(value) == int(value)):
            return True
        if o is str and isinstance(value, str):
            return True
    return False


def check_arguments(key: str, target: str, factory: Any, arguments: Mapping[str, Any],
                    given: bool = True, also: tuple[str, ...] = ()) -> None:
    """`arguments`, the keys a config node `key` gives `factory` (its `_target_`), are keys it
    takes, of the plain types its annotations name, with every required one there (`given`:
    the node is all its arguments; `also`: keys the node has beside them, e.g. a reward's
    weight); else one ConfigError naming the key, what it takes and the nearest name ("objective.rewards[0].rn is not an argument of ...LearnedReward: did you mean
    run?")."""
    import difflib
    import inspect
    import typing

    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # no introspectable signature: the call will tell
        return
    takes = [n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    takes += list(also)
    arguments = {k: v for k, v in arguments.items() if k not in also}
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        for name in arguments:
            if name not in params:
                near = difflib.get_close_matches(str(name), takes, 1)
                hint = f"did you mean {near[0]}?" if near else f"it takes {takes}"
                raise ConfigError(f"{key}.{name} is not an argument of {target}: {hint}")
    try:
        hints = typing.get_type_hints(factory.__init__ if inspect.isclass(factory) else factory)
    except Exception:  # noqa: BLE001 - an annotation that does not resolve: not checked
        hints = {}
    for name, value in arguments.items():
        if name in hints and _fits(value, hints[name]) is False:
            kinds = " or ".join(_PLAIN.get(o, "null") for o in typing.get_args(hints[name])
                                or (hints[name],))
            raise ConfigError(f"{key}.{name}={value!r} must be {kinds} ({target})")
    if given:
        missing = [n for n, p in params.items() if p.default is p.empty and n not in arguments
                   and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        if missing:
            raise ConfigError(f"{key} lacks {', '.join(missing)}: {target} needs it, e.g. "
                              f"{key}={{_target_: {target}, {missing[0]}: ...}}")
