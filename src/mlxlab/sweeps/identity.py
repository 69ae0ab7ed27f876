"""A sweep's identity: what the user asked, so the same command finds the sweep it continues.

The identity hashes the command line's overrides (sorted: their order changes nothing), the
sweeper's search space, the task name, the project root and the store. It leaves out what only
says how to launch (`hydra.*`: the launcher, its workers) and the keys that steer continuing
itself (`sweep.fresh`): the same sweep started with another launcher,
or with `sweep.fresh=true`, is still the same question. The sweep's parent run carries it as the
tag `mlxlab.sweep_identity`; `find_unfinished` looks it up at a grid's start.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mlxlab.tracking import tags as T
from mlxlab.tracking.mlflow.calls import retrying

# keys of the command line that steer the continuing, not what the sweep trains
STEERING = ("sweep.fresh",)


def override_key(override: str) -> str:
    return str(override).split("=", 1)[0].lstrip("+~")


def asked_overrides(config: DictConfig) -> list[str]:
    """The command line's overrides that say what the sweep trains, sorted."""
    found = OmegaConf.select(config, "hydra.overrides.task") or []
    return sorted(str(o) for o in found if override_key(o) not in STEERING)


def sweep_identity(config: DictConfig, store_uri: str) -> str:
    """A 16-hex-digit hash of what the user asked (see the module's docstring)."""
    params = OmegaConf.select(config, "hydra.sweeper.params")
    asked = {
        "overrides": asked_overrides(config),
        "params": OmegaConf.to_container(params, resolve=False) if params else None,
        "task": str(OmegaConf.select(config, "task_name", default="")),
        "root": str(OmegaConf.select(config, "paths.root_dir", default="")),
        "store": store_uri,
    }
    blob = json.dumps(asked, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def wants_fresh(config: DictConfig) -> bool:
    """`sweep.fresh=true`: a new sweep even when one with this identity is unfinished."""
    return bool(OmegaConf.select(config, "sweep.fresh", default=False))


@dataclass(frozen=True)
class FoundSweep:
    """The newest sweep with an identity, as the store holds it."""

    run: Any  # its parent run
    finished: bool  # FINISHED, with every job it counted still FINISHED in the store

    @property
    def run_id(self) -> str:
        return self.run.info.run_id

    @property
    def sweep_dir(self) -> str | None:
        return self.run.data.tags.get(T.SWEEP_DIR)


def find_sweep(client: Any, experiment_id: str, identity: str) -> FoundSweep | None:
    """The newest parent run tagged with `identity`, and whether its sweep is over: FINISHED
    with as many FINISHED jobs as it counted at its end (a job deleted since is missing)."""
    from mlxlab.sweeps.jobs import job_runs_of
    from mlxlab.sweeps.store import sweep_children

    found = retrying(
        client.search_runs,
        [experiment_id],
        filter_string=f"tags.`{T.SWEEP_IDENTITY}` = '{identity}'",
        max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    if not found:
        return None
    parent = found[0]
    finished = parent.info.status == "FINISHED"
    if finished:
        jobs = job_runs_of(sweep_children(client, parent.info.run_id))
        done = sum(r.info.status == "FINISHED" for r in jobs)
        finished = done == len(jobs) and str(done) == parent.data.tags.get(
            T.NUM_FINISHED, str(done)
        )
    return FoundSweep(parent, finished)
