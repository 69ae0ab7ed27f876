"""Rounds of distillation (`objective=distill objective.rounds=R`, born-again networks).

Round 1 distils the configured teachers into a fresh student; round r + 1 is taught by round r's
student (`round_teachers=chain`) or by the configured teachers and every student so far
(`round_teachers=ensemble`, weights fixed or learned: `teacher_weights`). Each round is an
ordinary training run (train.py's train_run, rounds=1) in `<run dir>/round_<r>`, a child of one
parent run (sweeps/parent.py, as a sweep's jobs are of theirs; launch/app.py's driver_for picks
this driver) that holds the per-round metrics (rounds/<metric> at step r) and the manifest
`distill_rounds.json`: every finished round's run folder, MLflow run id, teachers and best
metrics, and the round under way (`running`: its folder and the checkpoint folder it resumed).

`resume=<run dir>|auto` continues such a run in the new run folder: finished rounds are skipped
(their students stay where they are and still teach), the round under way resumes from its newest
checkpoint like any run, the rest are trained, and the parent and child MLflow runs are the same
ones. The manifest is replaced atomically at each round's start and end, so a SIGKILL anywhere
leaves one that resumes; a round that finished (its child run FINISHED) just before the kill is
taken from the store instead of being trained again.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from mlxlab.checkpoint.atomic import fsync_path
from mlxlab.config import checked_parts, config_hash, to_container, validate
from mlxlab.errors import ConfigError
from mlxlab.launch.wiring import build_tracker
from mlxlab.models.sources import source_of
from mlxlab.runs import newest_committed
from mlxlab.sweeps.folder import swept_keys_here
from mlxlab.sweeps.parent import ParentOfRuns
from mlxlab.tracking import tags as T
from mlxlab.tracking.base import Tracker
from mlxlab.tracking.mlflow import tracked_store
from mlxlab.tracking.run_info import hydra_context, run_name, run_tags
from mlxlab.training.trainer import TrainingInterrupted

log = logging.getLogger("mlxlab")

MANIFEST = "distill_rounds.json"


def rounds_of(cfg: DictConfig) -> int:
    """objective.rounds: 1 for an objective without rounds (DistillConfig checks the value when
    config.validate builds the objective node)."""
    rounds = (cfg.get("objective") or {}).get("rounds", 1)
    return 1 if rounds is None else rounds


def train_in_rounds(cfg: DictConfig, train_one: Callable[[DictConfig], dict[str, float]]
                    ) -> dict[str, float]:
    """objective.rounds > 1: one parent run (the `tracking` node's tracker, named as the run),
    each round `train_one` with rounds=1 as its child run."""
    if checked_parts() is None:  # (the Hydra app's run: its callback validated it)
        validate(cfg)
    source_of(cfg.model)  # the model the user named, fetched (or refused) before any manifest
    run_dir, choices, _ = hydra_context(cfg)
    name = run_name(cfg, swept_keys_here())
    parent = build_tracker(cfg, name)
    parent.probe()  # a store that does not answer fails here, before any manifest
    return train_rounds(cfg, train_one, parent, run_tags(cfg, choices, config_hash(cfg), run_dir),
                        name)


def round_teachers(initial: list, students: list[str], mode: str) -> list:
    """The teachers of the next round, given the configured ones and the students so far."""
    if not students:
        return list(initial)
    if mode == "chain":
        return [{"run": students[-1]}]
    return [*initial, *({"run": s} for s in students)]


def round_config(cfg: DictConfig, r: int, teachers: list, run_dir: Path, parent_tags: dict,
                 name: str, resume: str | None = None) -> DictConfig:
    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    with open_dict(out):
        out.objective.rounds = 1
        out.objective.teachers = teachers
        out.paths.output_dir = str(run_dir / f"round_{r}")
        out.resume = resume  # never the parent's resume=auto: a round resumes its own folder
        if "run_name" in out.tracking:
            out.tracking.run_name = f"{name} round {r}"
        out.tags = {**(out.get("tags") or {}), T.DISTILL_ROUND: str(r), **parent_tags}
    return out


def child_run_id(run_dir: Path) -> str | None:
    """The MLflow run id of a round's folder, from its newest committed checkpoint (a killed
    round's folder may hold a half-written one)."""
    newest = newest_committed(run_dir)
    return newest[2] if newest else None


def write_manifest(path: Path, manifest: dict) -> None:
    """Replace `path` atomically (temp file, fsync, rename, fsync of the folder): a kill leaves
    the old manifest or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)


def find_manifest(cfg: DictConfig, run_dir: Path) -> Path | None:
    """The manifest `resume=` continues: `<path>/distill_rounds.json` (path = the parent run
    folder or one of its round_<r> folders), or with resume=auto this task's newest one."""
    resume = str(cfg.resume)
    if "://" in resume:
        raise ConfigError(f"resume={resume}: rounds of distillation resume from a local run folder "
                          "only: download it and pass resume=<its folder>")
    if resume == "auto":
        root = Path(str(cfg.paths.root_dir))
        found = [p for base in (root / "outputs" / cfg.task_name, root / "multirun" / cfg.task_name)
                 if base.is_dir() for p in base.glob(f"**/{MANIFEST}")]
        found += [p for p in [run_dir / MANIFEST] if p.is_file() and p not in found]
        if not found:
            log.warning("resume=auto: no earlier rounds of task %r have a %s; starting fresh",
                        cfg.task_name, MANIFEST)
            return None
        newest = max(found, key=lambda p: p.stat().st_mtime)
        log.info("resume=auto: continuing the rounds of %s", newest.parent)
        return newest
    path = Path(resume).expanduser()
    for folder in (path, path.parent):
        if (folder / MANIFEST).is_file():
            return folder / MANIFEST
    raise ConfigError(f"resume={resume}: no {MANIFEST} there or in its parent folder: pass the run "
                      "folder of an objective.rounds run (outputs/<task>/<time>), or "
                      "resume=auto")


def read_manifest(path: Path) -> dict:
    """The manifest at `path`; one line (ConfigError) for a file that is not one (a manifest
    written by hand, or by a version that did not replace it atomically, may be cut short)."""
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"resume: {path} cannot be read ({e}): pass another run folder, or "
                          "leave out resume= to start new rounds") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("rounds", []), list):
        raise ConfigError(f"resume: {path} is not a {MANIFEST} (no rounds list): pass another run "
                          "folder, or leave out resume= to start new rounds")
    manifest.setdefault("rounds", [])
    return manifest


def override_text(value: Any) -> str:
    """`value` as a Hydra command-line override value: chain, 2, [{run: '/a/b'}]."""
    if value is None:  # Hydra reads None as the string "None"
        return "null"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {override_text(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(override_text(v) for v in value) + "]"
    if isinstance(value, str) and not value.replace("_", "").isalnum():
        return repr(value)
    return str(value)


def check_same_rounds(manifest: dict, source: Path, wanted: dict[str, Any]) -> None:
    """A resume continues the rounds it was started with: one line naming what differs."""
    for key, value in wanted.items():
        old = manifest.get(key)
        if old is not None and old != value:
            option = "objective." + ("rounds" if key == "num_rounds" else key)
            raise ConfigError(
                f"resume={source.parent}: that run has {option}={override_text(old)} (its "
                f"{MANIFEST}), this config {override_text(value)}: pass "
                f"\"{option}={override_text(old)}\" to resume it, or leave out resume= to start "
                "new rounds")


def resume_source(running: dict | None, r: int, folder: Path) -> str | None:
    """The folder round `r` resumes from: of the folder it trains in now and the one it resumed
    from before, the one with the newest committed checkpoint (a round resumed into a new folder
    holds a copy of its source's best/ before its own first checkpoint); None = start it fresh."""
    if not running or running.get("round") != r:
        return None
    found = []
    for rank, where in enumerate(running.get(k) for k in ("resumed_from", "run_dir")):
        newest = newest_committed(Path(where)) if where else None
        if newest is not None:
            found.append((newest[0], rank, where))  # a tie goes to the newer folder
    return max(found)[2] if found else None


def train_rounds(cfg: DictConfig, train_one: Callable[[DictConfig], dict[str, float]],
                 tracker: Tracker, tags: dict[str, str], name: str = "distill") -> dict[str, float]:
    """Train every round (or, with resume=, the rounds not finished) as the children of the
    parent run `tracker` records; returns the last round's best metrics."""
    distill = cfg.objective
    rounds, mode = rounds_of(cfg), distill.get("round_teachers", "chain")
    initial = to_container(distill).get("teachers") or []
    if not initial:
        raise ConfigError("objective.rounds needs objective.teachers for round 1")
    if (cfg.tracking.get("csv") or {}).get("dir"):  # the parent and each round are runs
        raise ConfigError("objective.rounds: tracking.csv.dir names one folder for the parent "
                          "and every round, whose rows would mix (and a resume rewinds it): leave "
                          "it null, each run writes <its run dir>/tracking")
    run_dir = Path(str(cfg.paths.output_dir))
    manifest: dict[str, Any] = {"num_rounds": rounds, "round_teachers": mode,
                                "teacher_weights": distill.get("teacher_weights", "fixed"),
                                "teachers": initial}
    source = find_manifest(cfg, run_dir) if cfg.get("resume") else None
    previous = read_manifest(source) if source else {}
    if source:
        check_same_rounds(previous, source, manifest)
    finished: list[dict] = list(previous.get("rounds", []))
    manifest.update(parent_run_id=previous.get("parent_run_id"), rounds=finished,
                    running=previous.get("running"))
    path = run_dir / MANIFEST
    run_dir.mkdir(parents=True, exist_ok=True)
    write_manifest(path, manifest)  # before the parent run exists: resume= always finds one
    parent = ParentOfRuns(tracker, tracked_store(cfg.tracking))
    # a resumed parent is the killed one's run (or, in a file tracker, a copy of its record)
    # with the rounds/* values of its finished rounds only: the others are logged again below
    parent.start(to_container(cfg), {**tags, T.DISTILL_ROUNDS: str(rounds)},
                 manifest["parent_run_id"], (source.parent, len(finished)) if source else None)
    manifest["parent_run_id"] = parent.run_id
    write_manifest(path, manifest)
    if finished:
        log.info("resume: rounds %s of %d are finished; their students stay in %s",
                 [e["round"] for e in finished], rounds, [e["run_dir"] for e in finished])
    status = "FAILED"
    try:
        for r in range(len(finished) + 1, rounds + 1):
            teachers = round_teachers(initial, [e["run_dir"] for e in finished], mode)
            log.info("distillation round %d/%d: teachers %s", r, rounds,
                     [t["run"] if isinstance(t, dict) else t for t in teachers])
            resume = resume_source(previous.get("running"), r, run_dir / f"round_{r}")
            round_cfg = round_config(cfg, r, teachers, run_dir, parent.child_tags(), name, resume)
            folder = Path(str(round_cfg.paths.output_dir))
            metrics = parent.finished_child(child_run_id(Path(resume)) if resume else None)
            if metrics is not None:  # it finished; the kill came before the manifest said so
                folder = Path(resume)
                log.info("round %d finished in %s before the last run stopped", r, folder)
            else:
                manifest["running"] = {"round": r, "run_dir": str(folder), "resumed_from": resume}
                write_manifest(path, manifest)  # a kill from here on resumes this round
                metrics = train_one(round_cfg)
            parent.log_child(r, metrics, "rounds/")  # before the manifest counts it finished
            finished.append({"round": r, "run_dir": str(folder), "run_id": child_run_id(folder),
                             "teachers": teachers, "metrics": metrics})
            manifest["running"] = None
            write_manifest(path, manifest)
            parent.log_artifact(str(path))
        status = "FINISHED"
        return finished[-1]["metrics"]
    except (TrainingInterrupted, KeyboardInterrupt):  # SIGTERM/SIGINT: resume continues it
        status = "KILLED"
        raise
    finally:
        parent.end(status)
