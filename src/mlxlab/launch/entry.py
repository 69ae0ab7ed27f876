"""mlxlab-train's entry: the command line checked, then the Hydra app, under a supervising
parent that restarts the run at half the micro-batch when it runs out of memory
(runtime/supervision/supervise.py), and the exit status.

The parent imports neither Hydra, MLX nor the config (~0.8 s of wall time on a loaded 2-core
machine, docs/benchmarks.md): what only the child needs is imported where the child reaches it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from mlxlab.errors import ConfigError, UserError
from mlxlab.runtime import memory, memory_limits
from mlxlab.runtime.supervision import supervise


def main(job: Callable, supervised: bool = True) -> None:
    """Check the command line, then run `job` (one run, or each job of a sweep) in the Hydra
    app: in a supervised child (`supervised` and wanted), else in this process."""
    if supervised and supervise.wanted():  # the child checks, composes and trains
        sys.exit(supervise.main(sys.argv[1:], mark_killed=mark_run_killed))
    # the training process, before its threads: under `ulimit -v` few malloc arenas, each of
    # which reserves 64 MiB of the limited address space (runtime/memory.py)
    memory.fewer_arenas_under_limit(memory_limits.address_space_limit())
    from mlxlab.launch.argv import check_group_choices, check_misplaced_keys

    try:
        check_group_choices(sys.argv[1:])
        check_misplaced_keys(sys.argv[1:])
    except ConfigError as err:
        leave(2, err)
    supervise.as_typed()  # a supervised child: the entry point the user typed, for the tags
    from mlxlab.tracking.mlflow import background

    if background.tracks_in_a_child(sys.argv[1:]):
        background.prestart()  # its imports overlap Hydra's composing and ours
    from mlxlab.launch.composing import composing

    try:
        with composing():
            hydra_main(job)
    except UserError as err:  # an override Hydra could not compose, as one line
        leave(2, err)
    # a multirun's callback ran when its module is loaded; a single run (or --help) never
    # pays for its import here
    sweeps = sys.modules.get("mlxlab.sweeps.callback")
    failure = sweeps.sweep_failure() if sweeps is not None else None
    if failure:  # a sweep whose parent run did not finish does not exit 0
        leave(1, failure)


def hydra_main(job: Callable) -> None:
    """The Hydra app: composes the config from sys.argv and runs `job` (one run, or each job
    of a sweep); Hydra names the app after `job`'s module (mlxlab.train: `train`)."""
    import hydra

    from mlxlab.config import config_dir

    hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")(job)()


def mark_run_killed(uri: str, run_id: str, reason: str) -> None:
    """The supervising parent ended a stalled child: its MLflow run KILLED (imported only then:
    the parent stays without MLflow)."""
    from mlxlab.tracking.mlflow.stale import mark_run_killed as mark

    mark(uri, run_id, reason)


def leave(code: int, err: Exception | str) -> None:
    print(f"mlxlab: error: {err}", file=sys.stderr)
    sys.exit(code)
