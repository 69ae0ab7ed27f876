"""Rounds of distillation (`trainer.distill.rounds=R`, born-again networks).

Round 1 distils the configured teachers into a fresh student; round r + 1 is taught by round r's
student (`round_teachers=chain`) or by the configured teachers and every student so far
(`round_teachers=ensemble`, weights fixed or learned: `teacher_weights`). Each round is an
ordinary training run (train.py's train with rounds=1) in `<run dir>/round_<r>`, a child of one
parent run that holds the per-round metrics (rounds/<metric> at step r) and the manifest
`distill_rounds.json`: every round's run folder, MLflow run id, teachers and best metrics.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from mlxlab.config import to_container
from mlxlab.errors import ConfigError
from mlxlab.tracking import tags as T

log = logging.getLogger("mlxlab")

MANIFEST = "distill_rounds.json"


def rounds_of(cfg: DictConfig) -> int:
    distill = cfg.trainer.get("distill") or {}
    rounds = distill.get("rounds", 1)
    rounds = 1 if rounds is None else rounds
    if not isinstance(rounds, int) or rounds < 1:
        raise ConfigError(f"trainer.distill.rounds must be an integer >= 1, got {rounds!r}")
    return rounds


def round_teachers(initial: list, students: list[str], mode: str) -> list:
    """The teachers of the next round, given the configured ones and the students so far."""
    if not students:
        return list(initial)
    if mode == "chain":
        return [{"run": students[-1]}]
    return [*initial, *({"run": s} for s in students)]


def round_config(cfg: DictConfig, r: int, teachers: list, run_dir: Path,
                 parent_run_id: str | None, name: str) -> DictConfig:
    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    with open_dict(out):
        out.trainer.distill.rounds = 1
        out.trainer.distill.teachers = teachers
        out.paths.output_dir = str(run_dir / f"round_{r}")
        if "run_name" in out.tracking:
            out.tracking.run_name = f"{name} round {r}"
        out.tags = {**(out.get("tags") or {}), T.DISTILL_ROUND: str(r)}
        if parent_run_id:
            out.tags[T.PARENT_RUN] = parent_run_id
    return out


def child_run_id(run_dir: Path) -> str | None:
    for state in sorted(run_dir.glob("checkpoints/*/state.json")):
        return json.loads(state.read_text()).get("run_id")
    return None


def train_rounds(cfg: DictConfig, train_one: Callable[[DictConfig], dict[str, float]],
                 parent: Any, tags: dict[str, str], name: str = "distill") -> dict[str, float]:
    """Train every round; returns the last round's best metrics."""
    distill = cfg.trainer.distill
    rounds, mode = rounds_of(cfg), distill.get("round_teachers", "chain")
    if mode not in ("chain", "ensemble"):
        raise ConfigError(f"trainer.distill.round_teachers must be chain or ensemble, got {mode!r}")
    if cfg.get("resume"):
        raise ConfigError("resume with trainer.distill.rounds > 1 is not supported: resume the "
                          "unfinished round's folder (<run dir>/round_<r>) with rounds=1")
    initial = to_container(distill).get("teachers") or []
    if not initial:
        raise ConfigError("trainer.distill.rounds needs trainer.distill.teachers for round 1")
    run_dir = Path(str(cfg.paths.output_dir))
    run_dir.mkdir(parents=True, exist_ok=True)
    parent.start(params=to_container(cfg), tags={**tags, T.DISTILL_ROUNDS: str(rounds)})
    manifest: dict[str, Any] = {"rounds": [], "round_teachers": mode,
                                "teacher_weights": distill.get("teacher_weights", "fixed"),
                                "parent_run_id": parent.run_id}
    students: list[str] = []
    status = "FAILED"
    try:
        metrics: dict[str, float] = {}
        for r in range(1, rounds + 1):
            teachers = round_teachers(initial, students, mode)
            log.info("distillation round %d/%d: teachers %s", r, rounds,
                     [t["run"] if isinstance(t, dict) else t for t in teachers])
            round_cfg = round_config(cfg, r, teachers, run_dir, parent.run_id, name)
            metrics = train_one(round_cfg)
            folder = Path(str(round_cfg.paths.output_dir))
            students.append(str(folder))
            manifest["rounds"].append({"round": r, "run_dir": str(folder),
                                       "run_id": child_run_id(folder), "teachers": teachers,
                                       "metrics": metrics})
            parent.log_metrics({f"rounds/{k}": float(v) for k, v in metrics.items()}, r)
            path = run_dir / MANIFEST
            path.write_text(json.dumps(manifest, indent=1) + "\n")  # after every round
            parent.log_artifact(str(path))
        status = "FINISHED"
        return metrics
    finally:
        parent.end(status)
