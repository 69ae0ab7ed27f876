"""What a fit is given, checked once before it trains: a model of mlxlab, and a data module and a
tracker that implement their protocols; a part that does not fails here, naming what it lacks.
"""

from __future__ import annotations

from typing import Any

from mlxlab.data.base import DataModule
from mlxlab.models.base import Model
from mlxlab.tracking.base import Tracker


def check_parts(model: Any, data: Any, tracker: Any) -> None:
    """What a fit is given is a model, a data module and a tracker of mlxlab, or it fails here
    (once per fit), naming what is missing."""
    if not isinstance(model, Model):
        raise TypeError(f"{type(model).__name__} is not a model of mlxlab: subclass "
                        "mlxlab.models.base.Model (its optional members have defaults)")
    check_contract(data, DataModule, "data module")
    check_contract(tracker, Tracker, "tracker")


def check_contract(obj: Any, protocol: type, what: str) -> None:
    """A part that does not implement its protocol fails here, naming what it lacks."""
    if isinstance(obj, protocol):
        return
    members = [m for m in dir(protocol) if not m.startswith("_")]
    members += list(getattr(protocol, "__annotations__", {}))
    missing = sorted({m for m in members if not hasattr(obj, m)})
    raise TypeError(f"{type(obj).__name__} is not a {what} ({protocol.__module__}."
                    f"{protocol.__name__}): it lacks {missing}")
