"""Hydra composing the command line, with its composition errors as one line each.

Hydra reports an error of its own (a key the config lacks) in several lines, with a hint about
HYDRA_FULL_ERROR; with that variable set while it composes, the error reaches `composing`,
which words it as one line. The job itself runs under Hydra's own reporting again.
"""

from __future__ import annotations

import contextlib
import difflib
import os
from collections.abc import Iterator

from hydra.errors import ConfigCompositionException, OverrideParseException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from mlxlab.errors import ConfigError

FULL_ERROR = "HYDRA_FULL_ERROR"
_full_error_was: list[str | None] = []


@contextlib.contextmanager
def composing() -> Iterator[None]:
    """Run the Hydra app with its composition errors raised here: an override of a key the
    config does not have is a ConfigError naming the nearest key (`trainer.max_epoch=3`: did
    you mean trainer.max_epochs?); a malformed override, its first line."""
    _full_error_was[:] = [os.environ.get(FULL_ERROR)]
    os.environ[FULL_ERROR] = "1"
    try:
        yield
    except ConfigCompositionException as err:
        raise ConfigError(unknown_key_line(err)) from None
    except OverrideParseException as err:
        first = str(err).strip().splitlines()[0]
        raise ConfigError(f"an override does not parse ({first}): write key=value, quoting a "
                          "value with spaces or brackets, e.g. 'key=[1,2]'") from None
    finally:
        composed()


def composed() -> None:
    """HYDRA_FULL_ERROR as the user had it (the job's errors are Hydra's to report)."""
    if _full_error_was:
        was = _full_error_was.pop()
        if was is None:
            os.environ.pop(FULL_ERROR, None)
        else:
            os.environ[FULL_ERROR] = was


def unknown_key_line(err: Exception) -> str:
    """One line for Hydra's composition error: a key the config does not have, with the nearest
    key of its node (OmegaConf's error holds the node); anything else, Hydra's first line."""
    first = str(err).strip().splitlines()[0]
    cause = err.__cause__
    if not isinstance(cause, OmegaConfBaseException):
        return first
    try:  # set where OmegaConf raised it with the key's place (a key missing from a node)
        key, node = cause.full_key, cause.parent_node
    except AttributeError:
        return first
    if not key or not isinstance(node, DictConfig):
        return first
    parent, _, name = str(key).rpartition(".")
    keys = [str(k) for k in node if not str(k).startswith("_") and str(k) != "hydra"]
    where = f"of {parent}" if parent else "of the config"
    near = difflib.get_close_matches(name, keys, n=1, cutoff=0.6)
    full = f"{parent}.{near[0]}" if parent and near else (near[0] if near else "")
    fix = (f"did you mean {full}?" if near else f"it has {sorted(keys)}")
    return (f"{key} is not a key {where}: {fix} (a new key is added with +{key}=...)")


