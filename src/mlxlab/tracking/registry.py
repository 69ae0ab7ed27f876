"""The old home of the MLflow model, kept as a name only: models registered before it moved to
serving/ were pickled as `mlxlab.tracking.registry.MlxlabPyfunc` and unpickle through here.
Nothing in mlxlab imports this module; tracking/ itself stays free of data/, models/, training/
(the lookup below happens only when an old model is loaded)."""

from __future__ import annotations

from typing import Any

_MOVED = {"MlxlabPyfunc": "mlxlab.serving.pyfunc", "register_run": "mlxlab.serving.registry",
          "load_registered": "mlxlab.serving.registry"}


def __getattr__(name: str) -> Any:
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_MOVED[name]), name)
