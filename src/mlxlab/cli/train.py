"""`mlxlab train [overrides]`: mlxlab-train under the mlxlab command (its supervising parent, which
runs the Hydra training app as its child: runtime/supervision/supervise.py)."""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    from mlxlab.train import main as train_main

    # Hydra reads its overrides (and --help, --multirun, ...) from sys.argv
    sys.argv = ["mlxlab train", *argv]
    train_main()
    return 0
