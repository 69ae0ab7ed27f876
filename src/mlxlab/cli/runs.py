"""`mlxlab runs <action> ...`: the MLflow store's runs.

    mlxlab runs merge SOURCE... [--into URI] [--dry-run]   copy other stores into the central one
    mlxlab runs hardest RUN [-n 20] [--epoch E]           a run's highest-loss training examples

Listing runs is `scripts/list_experiments.py` until it becomes `mlxlab runs list`.
"""

from __future__ import annotations

import sys

# action -> (module with main(argv) -> int, one-line help)
ACTIONS = {
    "merge": ("mlxlab.tracking.merge", "copy experiments, runs and models from other MLflow stores"),
    "hardest": ("mlxlab.cli.hardest", "the training examples with the highest loss (per_example_losses)"),
}


def main(argv: list[str]) -> int:
    import importlib

    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    action, rest = argv[0], argv[1:]
    if action not in ACTIONS:
        known = ", ".join(ACTIONS)
        print(f"mlxlab runs: unknown action {action!r}: use one of {known}", file=sys.stderr)
        return 2
    return int(importlib.import_module(ACTIONS[action][0]).main(rest) or 0)
