"""`mlxlab runs <action> ...`: the MLflow store's runs.

    mlxlab runs list [--experiment NAME] [--sweep RUN_ID|latest] [--last]   experiments and runs
    mlxlab runs show RUN_ID|RUN_DIR          one run: metrics (best | last), params, checkpoints
    mlxlab runs compare latest [--baseline g1]  configs of a sweep: differences, tests, verdict
    mlxlab runs compare RUN RUN...           runs side by side: metrics and differing params
    mlxlab runs merge SOURCE... [--into URI] [--dry-run]   copy other stores into the central one
    mlxlab runs hardest RUN [-n 20] [--epoch E]           a run's highest-loss training examples

`mlxlab runs <action> --help` for its arguments.
"""

from __future__ import annotations

import functools
import importlib
import sys

# action -> (module with main(argv) -> int, keyword arguments, one-line help)
ACTIONS = {
    "list": ("mlxlab.cli.runs_list", {}, "experiments and recent runs, or one sweep's table"),
    "show": ("mlxlab.cli.runs_show", {"action": "show"}, "one run: metrics, params, checkpoints"),
    "compare": ("mlxlab.cli.runs_compare", {}, "configs compared (intervals, tests), or runs"),
    "merge": ("mlxlab.tracking.mlflow.merge", {}, "copy experiments, runs and models from other stores"),
    "hardest": ("mlxlab.cli.hardest", {}, "the training examples with the highest loss"),
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    action, rest = argv[0], argv[1:]
    if action not in ACTIONS:
        known = ", ".join(ACTIONS)
        print(f"mlxlab runs: unknown action {action!r}: use one of {known}", file=sys.stderr)
        return 2
    module, kwargs, _ = ACTIONS[action]
    entry = functools.partial(importlib.import_module(module).main, **kwargs)
    return int(entry(rest) or 0)
