"""The plugin Hydra instantiates for `hydra/sweeper=mlxlab` (conf/hydra/sweeper/mlxlab.yaml).

Hydra builds sweepers only from classes defined under `hydra_plugins`, and imports every module
there whenever any Hydra app starts: this adapter imports nothing of mlxlab (nor MLX) until a
sweep actually uses it, then hands everything to mlxlab.sweeps.search.sweeper.Sweeper.
"""

from __future__ import annotations

import sys
from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class MlxlabSweeper(Sweeper):
    def __init__(self, **settings: Any) -> None:
        self.settings = settings
        self.impl: Any = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        from mlxlab.sweeps.search.sweeper import Sweeper as Impl

        self.impl = Impl(**self.settings)
        self.impl.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> Any:
        from mlxlab.errors import UserError

        try:
            return self.impl.sweep(arguments)
        except UserError as err:  # bad settings: one line, as mlxlab-train's own errors
            print(f"mlxlab: error: {err}", file=sys.stderr)
            sys.exit(2)
