"""Old module paths of modules that moved, kept as names: what outside mlxlab still names them
keeps working, and no module of mlxlab imports through them.

Who still names an old path: a model registered before serving/ existed (cloudpickle stored its
class as `mlxlab.tracking.registry.MlxlabPyfunc`, and MLflow's loader, not mlxlab, unpickles it),
a user's hydra config copied before a sweep's files moved to sweeps/ (a callback `_target_` of
`mlxlab.tracking.mlflow.hydra_callbacks.MlflowSweepCallback`, or `mlxlab.search.checks.SweepChecks`
from before the search moved to sweeps/search/), a script importing a query.

Why a table and not a module left at each old path: such a module re-exports from where the code
went, which is above it (tracking/registry.py -> serving/, tracking/hydra_callbacks.py ->
sweeps/): an arrow up in the house. Here an old name is a module made on first import whose
attributes are read, when asked, from its new home (PEP 562 `__getattr__`), so the old path
imports nothing until a name is used. mlxlab/__init__.py installs the finder.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
from typing import Any

# old dotted path -> where its names live now (searched in order)
MOVED: dict[str, tuple[str, ...]] = {
    "mlxlab.tracking.registry": ("mlxlab.serving.registry", "mlxlab.serving.pyfunc"),
    "mlxlab.tracking.hydra_callbacks": ("mlxlab.sweeps.callback",),
    "mlxlab.tracking.mlflow.hydra_callbacks": ("mlxlab.sweeps.callback",),
    "mlxlab.tracking.sweep_folder": ("mlxlab.sweeps.folder",),
    "mlxlab.tracking.mlflow.sweeps": ("mlxlab.sweeps.store",),
    "mlxlab.tracking.mlflow.replicates": ("mlxlab.sweeps.groups",),
    "mlxlab.tracking.mlflow.comparisons": ("mlxlab.sweeps.compare",),
    # the Optuna search moved into the sweep's room (a user's config names the checks callbacks)
    "mlxlab.search": ("mlxlab.sweeps.search",),
    "mlxlab.search.sweeper": ("mlxlab.sweeps.search.sweeper",),
    "mlxlab.search.study": ("mlxlab.sweeps.search.study",),
    "mlxlab.search.space": ("mlxlab.sweeps.search.space",),
    "mlxlab.search.trial_link": ("mlxlab.sweeps.search.trial_link",),
    "mlxlab.search.pruning": ("mlxlab.sweeps.search.pruning",),
    "mlxlab.search.checks": ("mlxlab.sweeps.checks",),
    # the objectives left training/ for a room of their own (issue 55): a script importing the
    # losses or metrics, a config naming a loss's module
    "mlxlab.training.losses": ("mlxlab.objectives.losses",),
    "mlxlab.training.metrics": ("mlxlab.objectives.metrics",),
    "mlxlab.training.evaluate": ("mlxlab.objectives.evaluation",),
    "mlxlab.training.distill": ("mlxlab.objectives.distill",),
    "mlxlab.training.teacher_weights": ("mlxlab.objectives.teacher_weights",),
    "mlxlab.training.preference": ("mlxlab.objectives.preference",),
    "mlxlab.training.preference_losses": ("mlxlab.objectives.preference_losses",),
}


def alias_module(name: str, homes: tuple[str, ...]) -> types.ModuleType:
    """A module named `name` whose attributes are the first of `homes` that has them."""
    module = types.ModuleType(name, f"Old path of {', '.join(homes)} (mlxlab/moved.py).")

    def __getattr__(attr: str) -> Any:
        for home in homes:
            found = vars(importlib.import_module(home))
            if attr in found:
                return found[attr]
        raise AttributeError(f"module {name!r} (moved to {homes[0]}) has no attribute {attr!r}")

    module.__getattr__ = __getattr__  # type: ignore[method-assign]
    if any(old.startswith(name + ".") for old in MOVED):
        module.__path__ = []  # a package: Python imports `name.child` only below one
    return module


class MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers only for the paths in MOVED."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: Any) -> types.ModuleType:
        return alias_module(spec.name, MOVED[spec.name])

    def exec_module(self, module: types.ModuleType) -> None:
        """Nothing to run: the names are read from the new home when asked."""


def install() -> None:
    """Put the finder first on sys.meta_path, once."""
    if not any(isinstance(f, MovedFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, MovedFinder())
