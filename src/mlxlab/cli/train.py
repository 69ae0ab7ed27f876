"""`mlxlab train [overrides]`: the Hydra training app (mlxlab-train) under the mlxlab command."""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    from mlxlab.train import main as hydra_main

    # Hydra reads its overrides (and --help, --multirun, ...) from sys.argv
    sys.argv = ["mlxlab train", *argv]
    hydra_main()
    return 0
