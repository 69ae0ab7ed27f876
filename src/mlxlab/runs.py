"""Finished runs as inputs: resume sources, distillation teachers, models for generate/predict.

A run directory holds `.hydra/config.yaml`, `tokenizer.json` and `checkpoints/` (see
training/checkpoint/); every checkpoint's state.json carries the resolved config and the
model's constructor inputs, so a model can be rebuilt from the checkpoint alone.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import mlx.nn as nn
from omegaconf import DictConfig, OmegaConf

from mlxlab.config import instantiate
from mlxlab.errors import ConfigError, MissingFileError

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


CHECKPOINT_CHOICES = ("best", "last")


def choose_checkpoint(path: str | Path, which: str = "best") -> Path:
    """The committed checkpoint of a run folder to load: `best` = best/ (else the newest, for a
    run without validation), `last` = the newest step_*. A checkpoint folder is itself."""
    from mlxlab.training.checkpoint import BEST, check_committed, find_run_checkpoints

    if which not in CHECKPOINT_CHOICES:
        raise ConfigError(f"checkpoint={which!r}: use one of {', '.join(CHECKPOINT_CHOICES)}")
    candidates = find_run_checkpoints(Path(path))  # newest step first, then best/
    if which == "best":
        candidates = sorted(candidates, key=lambda p: p.name != BEST)
    usable = [p for p in candidates if check_committed(p, full=False) is None]
    if not usable:
        raise ConfigError(f"{path} holds no committed checkpoint: train it first or give another run")
    return usable[0]


def load_run_model(path: str | Path, which: str = "best") -> tuple[nn.Module, dict]:
    """Rebuild the model of a finished run (its best checkpoint, else the newest; or the newest
    with which="last") with its weights; state["checkpoint_path"] says which was loaded."""
    from mlxlab.training.checkpoint import load_checkpoint

    checkpoint = choose_checkpoint(path, which)
    state = json.loads((checkpoint / "state.json").read_text())
    config = state.get("config") or {}
    if "model" not in config or "model_init" not in state:
        raise ConfigError(f"{checkpoint}/state.json has no model config: it is not an mlxlab run")
    # The checkpoint holds every weight, so a pretrained source folder is not needed again.
    model_cfg = OmegaConf.create(config["model"])
    if "pretrained" in model_cfg:
        model_cfg.pretrained = None
    model = instantiate(model_cfg, **state["model_init"])
    load_checkpoint(checkpoint, model, strict=True)
    model.eval()
    state["checkpoint_path"] = str(checkpoint)
    return model, state


def load_teachers(
    specs: list, vocab_size: int, num_labels: int | None
) -> tuple[list[nn.Module], list[float]]:
    """Teachers for distillation: each spec is {run: <run dir or checkpoint>, weight: float}.

    A teacher must predict over the same outputs as the student: the same label set for
    classifiers, the same token ids for language models (train.py points the student's data at
    the first teacher's tokenizer.json for that).
    """
    models, weights = [], []
    for spec in specs:
        spec = {"run": spec} if isinstance(spec, str) else dict(spec)
        if not spec.get("run"):
            raise ConfigError("each trainer.distill.teachers entry needs run=<finished run dir>")
        model, state = load_run_model(spec["run"])
        theirs = state["model_init"]
        if theirs.get("num_labels") != num_labels or theirs.get("vocab_size") != vocab_size:
            raise ConfigError(
                f"teacher {spec['run']} was trained with vocab_size={theirs.get('vocab_size')}, "
                f"num_labels={theirs.get('num_labels')} but the student's data has "
                f"vocab_size={vocab_size}, num_labels={num_labels}: give the student the teacher's "
                f"tokenizer (data.tokenizer.path=<teacher run>/tokenizer.json) and the same label column"
            )
        model.freeze()
        models.append(model)
        weights.append(float(spec.get("weight", 1.0)))
        log.info("teacher: %s (%s)", spec["run"], state["checkpoint_path"])
    return models, weights


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
