"""The old home of the MLflow model, kept as names only: models registered before it moved to
serving/ were pickled as `mlxlab.tracking.registry.MlxlabPyfunc` and unpickle through here (a
pickle names a class by module; MLflow's loader, not mlxlab, opens it, so the module must be
importable at this path).

The one arrow up from tracking/ in the house, written as a plain import so the contract sees it:
pyproject.toml's layers contract ignores exactly these two imports, and docs/architecture.md
lists them with this reason. Nothing in mlxlab imports this module.
"""

from mlxlab.serving.pyfunc import MlxlabPyfunc
from mlxlab.serving.registry import load_registered, register_run

__all__ = ["MlxlabPyfunc", "load_registered", "register_run"]
