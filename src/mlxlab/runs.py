"""Finished runs as inputs: resume sources, distillation teachers, models for generate/predict.

A run directory holds `.hydra/config.yaml`, `tokenizer.json` and `checkpoints/` (see
training/checkpoint/); every checkpoint's state.json carries the resolved config and the
model's constructor inputs, so a model can be rebuilt from the checkpoint alone.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from omegaconf import DictConfig

from mlxlab.errors import ConfigError, MissingFileError

# A finished run's model: training/run_model.py (the trainer loads teachers there); named here
# too because inference, export and users reach finished runs through this module.
from mlxlab.training.run_model import (  # noqa: F401
    CHECKPOINT_CHOICES,
    choose_checkpoint,
    load_run_model,
    load_teachers,
)

log = logging.getLogger(__name__)


def newest_committed(run: Path) -> tuple[int, Path, str | None] | None:
    """(step, checkpoint, MLflow run id) of the run folder's committed checkpoint with the highest
    step, best/ included; a step_* checkpoint wins a tie with best/ (best/ is a copy of one)."""
    from mlxlab.training.checkpoint import (
        BEST,
        CheckpointError,
        CheckpointState,
        check_committed,
        step_of,
    )

    found = []
    for ckpt in (run / "checkpoints").glob("*"):
        if check_committed(ckpt, full=False) is not None:
            continue
        try:
            state = CheckpointState.read(ckpt)
        except (OSError, CheckpointError, TypeError):
            continue
        step = state.step if ckpt.name == BEST else step_of(ckpt)
        if step >= 0:
            found.append((step, ckpt.name != BEST, ckpt, state.run_id))
    if not found:
        return None
    step, _, ckpt, run_id = max(found, key=lambda f: f[:2])
    return step, ckpt, run_id


def latest_run_with_checkpoints(root: Path, task_name: str, run_dir: Path) -> Path | None:
    """The run folder to continue: among the folders of this task (outputs/, multirun/, and
    `run_dir` itself) that continue the newest folder's MLflow run (every resume appends to it),
    the one whose committed checkpoint has the highest step; the passed-over ones are logged.

    Not simply the newest folder: a run resumed into a new folder holds a copy of the source's
    best/ from its first second, and when it is killed before its own first checkpoint that copy
    is older than the source's newest checkpoint. Not the highest step of the whole task either:
    an unrelated older run may have trained longer.
    """
    folders = {run_dir.resolve()}
    for base in (root / "outputs" / task_name, root / "multirun" / task_name):
        if base.is_dir():
            folders |= {p.parents[2].resolve() for p in base.glob("**/checkpoints/*/COMMITTED")}
    candidates = []
    for folder in folders:
        newest = newest_committed(folder)
        if newest is not None:
            step, checkpoint, run_id = newest
            candidates.append((step, folder.stat().st_mtime, folder, checkpoint, run_id))
    if not candidates:
        return None
    newest_folder = max(candidates, key=lambda c: c[1])
    lineage = [c for c in candidates if c[4] == newest_folder[4]]
    step, mtime, chosen, checkpoint, _ = max(lineage, key=lambda c: c[:2])
    log.info("resume=auto: %s has the highest committed step of its run: %s at step %d",
             chosen, checkpoint.name, step)
    for other_step, other_mtime, folder, other, _ in lineage:
        if folder != chosen and other_mtime >= mtime:  # newer, yet behind: say why not it
            log.warning("resume=auto: skipped %s%s: its newest committed checkpoint is %s at step "
                        "%d, behind step %d", folder, " (the newest run folder)"
                        if folder == newest_folder[2] else "", other.name, other_step, step)
    if len(candidates) > len(lineage):
        log.info("resume=auto: %d older run folder(s) of task %r belong to other runs",
                 len(candidates) - len(lineage), task_name)
    return chosen


def prepare_resume(cfg: DictConfig, run_dir: Path) -> Path | None:
    """`resume=auto` -> the run of this task with the highest committed step (this run's own
    folder included); `resume=<path>` -> that path."""
    resume = cfg.get("resume")
    if not resume:
        return None
    if str(resume) == "auto":
        found = latest_run_with_checkpoints(Path(cfg.paths.root_dir), cfg.task_name, run_dir)
        if found is None:
            log.warning("resume=auto: no earlier run of task %r has a checkpoint; starting fresh",
                        cfg.task_name)
        return found
    path = Path(str(resume)).expanduser()
    if not path.exists():
        raise ConfigError(f"resume={resume}: no such run or checkpoint folder; use resume=auto or a "
                          "path under outputs/")
    return path


def run_tokenizer(path: str | Path) -> Path | None:
    """tokenizer.json of the run holding `path` (a run dir, its checkpoints/, or one checkpoint)."""
    path = Path(str(path))
    for folder in (path, path.parent, path.parent.parent):
        if (folder / "tokenizer.json").is_file():
            return folder / "tokenizer.json"
    return None


def require_run_tokenizer(path: str | Path, kind: str) -> Path:
    """run_tokenizer(path), or an error naming what to pass; `kind` says which run it must be."""
    found = run_tokenizer(path)
    if found is None:
        raise MissingFileError(
            f"no tokenizer.json in {path} or its run directory: pass the run directory "
            f"(outputs/<task>/<time>) of a finished {kind} run, or one of its checkpoints"
        )
    return found


def reuse_tokenizer(cfg: DictConfig, run: str | Path | None, why: str) -> None:
    """Point data.tokenizer.path at an earlier run's tokenizer.json (unless one is set), so a
    resumed run or a distilled student sees exactly the token ids the checkpoint was trained on."""
    if run is None or cfg.data.get("tokenizer", {}).get("path"):
        return
    found = run_tokenizer(run)
    if found is not None:
        cfg.data.tokenizer.path = str(found)
        log.info("%s: using the tokenizer %s", why, found)


# What a Hugging Face folder says about its tokenizer and generation besides tokenizer.json.
TOKENIZER_SIDE_FILES = (
    "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
    "chat_template.jinja", "chat_template.json",
)


def use_pretrained_tokenizer(cfg: DictConfig) -> None:
    """Point the data at model.pretrained's tokenizer.json (unless a tokenizer is given): the
    checkpoint's embeddings only mean something for the ids it was trained with."""
    source = cfg.model.get("pretrained")
    if not source or cfg.data.get("tokenizer", {}).get("path"):
        return
    if not Path(source).is_dir():
        raise ConfigError(f"model.pretrained={source}: no such folder; give a local Hugging Face "
                          "or mlx-lm model folder (config.json, *.safetensors, tokenizer.json)")
    if not (Path(source) / "tokenizer.json").is_file():
        raise ConfigError(f"{source} has no tokenizer.json: set data.tokenizer.path= to the "
                          "checkpoint's tokenizer (a fast tokenizer saved by transformers)")
    cfg.data.tokenizer.path = str(Path(source) / "tokenizer.json")
    log.info("pretrained model: using the tokenizer %s", cfg.data.tokenizer.path)


def keep_pretrained_files(cfg: DictConfig, run_dir: Path) -> None:
    """Copy the pretrained folder's tokenizer side files (special tokens, chat template,
    generation settings) into the run folder, so an export needs only the run."""
    source = cfg.model.get("pretrained")
    if not source:
        return
    for name in TOKENIZER_SIDE_FILES:
        if (Path(source) / name).is_file() and not (run_dir / name).exists():
            shutil.copyfile(Path(source) / name, run_dir / name)


def first_teacher(cfg: DictConfig) -> str | None:
    specs = (cfg.trainer.get("distill") or {}).get("teachers") or []
    if not specs:
        return None
    return str(specs[0] if isinstance(specs[0], str) else specs[0].get("run"))


def finished_metric(cfg: DictConfig) -> float | None:
    """For sweep.skip_finished: the metric of a finished run with this config hash, if any."""
    from mlxlab.config import config_hash
    from mlxlab.tracking.mlflow import find_finished_run

    if "uri" not in cfg.tracking:
        return None
    run = find_finished_run(cfg.tracking.uri, cfg.tracking.experiment_name, config_hash(cfg))
    if run is None:
        return None
    metrics = run.data.metrics
    return float(metrics.get(f"best/{cfg.optimized_metric}",
                             metrics.get(cfg.optimized_metric, float("nan"))))
