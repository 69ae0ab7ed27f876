"""mlxlab-train: compose the config, build the parts, wire them, return the optimized metric.

No training logic, file formats or MLflow calls live here: see docs/architecture.md.
"""

from __future__ import annotations

import hashlib
import logging
import math
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from omegaconf import DictConfig

from mlxlab.config import (
    config_dir,
    config_hash,
    group_options,
    instantiate,
    to_container,
    unwrapped,
    validate,
)
from mlxlab.errors import ConfigError, UserError

if TYPE_CHECKING:
    from mlxlab.training.settings import CheckpointPolicy

log = logging.getLogger("mlxlab")


def seed_everything(seed: int) -> None:
    """Seed the run's own generators: MLX's (weights, dropout). Data shuffling and splits use
    numpy Generators seeded from the config. Python's and numpy's global generators are left
    alone: other code draws from them (MLflow picks run names from `random`)."""
    import mlx.core as mx

    mx.random.seed(seed)


def hydra_context(cfg: DictConfig) -> tuple[Path, dict[str, str], bool]:
    """The run folder, the chosen config-group options (as tags) and whether this is a sweep."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    run_dir = Path(cfg.paths.output_dir)
    if not HydraConfig.initialized():
        return run_dir, {}, False
    hc = HydraConfig.get()
    from mlxlab.tracking.tags import CHOICE_PREFIX

    choices = {f"{CHOICE_PREFIX}{k}": str(v) for k, v in hc.runtime.choices.items()
               if not k.startswith("hydra")}
    return run_dir, choices, hc.mode == RunMode.MULTIRUN


def run_name(cfg: DictConfig, swept: Sequence[str] = ()) -> str:
    """tracking.run_name, else `<task_name>-<MMDD-HHMMSS>` plus the overrides of a multirun job
    that set the `swept` keys (`train-1122-093012 model.hidden_size=64 optimizer.learning_rate=3e-4`)."""
    given = cfg.tracking.get("run_name")
    if given:
        return str(given)
    name = f"{cfg.task_name}-{time.strftime('%m%d-%H%M%S')}"
    overrides = [str(o).lstrip("+~") for o in _task_overrides()]
    shown = [o for o in overrides if o.split("=", 1)[0] in swept]
    return " ".join([name, *shown])[:250]


def swept_keys() -> tuple[str, ...]:
    """The keys this multirun job's sweep varies (its sweep folder says), else none."""
    from mlxlab.tracking.sweep_folder import current_job

    job = current_job()
    return job.swept_keys if job is not None else ()


def _task_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return list(HydraConfig.get().overrides.task or [])


def git_commit(folder: Path) -> str | None:
    """HEAD of the git checkout holding `folder`, if any (2 s at most, never raises)."""
    try:
        out = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=2)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def run_tags(cfg: DictConfig, choices: dict[str, str], run_hash: str, run_dir: Path,
             resumed_from: Path | None = None) -> dict:
    from mlxlab.tracking import tags as T
    from mlxlab.tracking.source import source_tags

    tags = {
        **choices,
        T.CONFIG_HASH: run_hash,
        T.RUN_DIR: str(run_dir),
        T.TASK_NAME: cfg.task_name,
        T.OVERRIDES: " ".join(_task_overrides()),
        **source_tags(),  # Source: mlxlab-train / mlxlab train, and the command line as typed
    }
    commit = git_commit(Path(__file__).parent)  # the code that trained, not the data's folder
    if commit:
        tags[T.GIT_COMMIT] = commit
    from mlxlab.search.trial_link import current_trial

    trial = current_trial()  # a search's trial: its study and number on the run
    if trial is not None:
        tags.update(trial.tags())
    if resumed_from is not None:  # the run folder (or checkpoint) this run goes on from
        tags[T.RESUMED_FROM] = str(resumed_from)
    return {**tags, **{str(k): str(v) for k, v in (cfg.get("tags") or {}).items()}}


def describe_dataset(data) -> tuple[str, str, str, int | None] | None:
    """(name, source, digest, rows) of a file-backed dataset, for the run's MLflow input."""
    path = Path(str(data.path or ""))  # DataModule.path: None unless read from one file
    if not path.is_file():
        return None
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    rows = data.examples
    return path.stem, str(path.resolve()), digest, len(rows) if rows is not None else None


def track_dataset(tracker, data) -> None:
    """The run's MLflow input: a file-backed dataset's name, source, digest and rows."""
    dataset = describe_dataset(data)
    if dataset is not None:
        tracker.set_dataset(*dataset)


def count_parameters(model) -> int:
    from mlx.utils import tree_flatten

    return sum(v.size for _, v in tree_flatten(model.parameters()))


def summary_lines(result, tracker) -> list[str]:
    """The end of a run: the best checkpoint's metrics, rounded, and where to look."""
    metrics = dict(result.metrics)
    step = metrics.pop("best_step", None)
    where = f"best checkpoint, step {int(step)}" if step is not None else "best checkpoint"
    shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
    if not shown:  # e.g. streamed text with data.splits.val_examples=0
        where, shown = "none", "no validation data"
    return [f"validation ({where}): {shown}", f"run dir:    {result.run_dir}", *tracker.summary()]


def build_tracker(cfg: DictConfig, name: str | None = None):
    """The `tracking` node's tracker (tracking/fanout.py builds MLflow, CSV or both, in a
    child process with tracking.background; in a multirun job, a child of the sweep's parent
    run), named `name` or run_name(cfg) with the keys the sweep folder says are swept."""
    named = {"run_name": name or run_name(cfg, swept_keys())} if "run_name" in cfg.tracking else {}
    return instantiate(cfg.tracking, **named)


def build_callbacks(cfg: DictConfig) -> tuple[list, CheckpointPolicy]:
    """The `callbacks` group's named `_target_` nodes, built in config order (None entries, as
    left by `callbacks.x=null`, are skipped), and apart from them the checkpoint policy
    (`callbacks.checkpoint`: a settings record, its defaults when absent); a search's trial adds
    the reporter that feeds its pruner (search/pruning.py)."""
    from mlxlab.search.trial_link import current_trial
    from mlxlab.training.callbacks import Callback
    from mlxlab.training.settings import CheckpointPolicy

    built, policy = [], None
    for name, node in (cfg.get("callbacks") or {}).items():
        if node is None:
            continue
        callback = instantiate(node)
        if isinstance(callback, CheckpointPolicy):
            policy = policy or callback
            continue
        if not isinstance(callback, Callback):
            raise ConfigError(f"callbacks.{name} built a {type(callback).__name__}, not a "
                              "mlxlab.training.callbacks.Callback: subclass it")
        callback.name = name  # its state's key in checkpoints
        built.append(callback)
    trial = current_trial()  # a search's job: which trial it trains
    if trial is not None:
        from mlxlab.search.pruning import TrialReporter

        reporter = TrialReporter(trial)
        reporter.name = "search_trial"
        built.append(reporter)
    return built, policy or CheckpointPolicy()


def train(cfg: DictConfig) -> dict[str, float]:
    """Build everything from `cfg`, train, and return the best validation metrics."""
    validate(cfg)
    from mlxlab.distill_rounds import rounds_of

    if rounds_of(cfg) > 1:
        return train_distill_rounds(cfg)
    run_dir, choices, _ = hydra_context(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    from mlxlab.runs import (
        first_teacher,
        keep_pretrained_files,
        load_teachers,
        prepare_resume,
        rebuild_from_checkpoint,
        record_resume,
        remote_resume,
        resumed_run_folder,
        reuse_tokenizer,
        use_pretrained_tokenizer,
    )
    from mlxlab.runtime import distributed, slurm
    from mlxlab.tracking.base import NullTracker
    from mlxlab.tracking.mlflow.stale import process_tags
    from mlxlab.tracking.tags import WORLD_SIZE
    from mlxlab.training.startup import prepare_device
    from mlxlab.training.trainer import Trainer

    settings = instantiate(cfg.trainer)  # TrainerSettings: checked by validate() above
    world = distributed.world(settings.distributed.mode, settings.distributed.timeout_s)
    if settings.requeue and not cfg.get("resume") and slurm.restarted():
        log.info("trainer.requeue: a requeued Slurm job: resume=auto")
        cfg.resume = "auto"
    callbacks, checkpointing = build_callbacks(cfg)
    resume = remote_resume(cfg.get("resume"), run_dir, checkpointing,
                           lambda: prepare_resume(cfg, run_dir))
    if resume is not None:  # what was trained, with what this command line names on top
        rebuild_from_checkpoint(cfg, resume, _task_overrides())
        validate(cfg)
        settings = instantiate(cfg.trainer)
        record_resume(cfg, run_dir, resume)  # the run folder's config: what this run trains
    run_hash = config_hash(cfg)  # before the tokenizer paths below are filled in
    # the device line, and MLX's CUDA kernel cache in paths.cache_dir before any kernel compiles
    prepare_device(cfg.paths.cache_dir, settings.fused_kernels)
    seed_everything(cfg.seed)
    reuse_tokenizer(cfg, resume, "resume")
    reuse_tokenizer(cfg, first_teacher(cfg), "distillation")
    use_pretrained_tokenizer(cfg)
    tracker = NullTracker()  # ranks other than 0 track nothing
    if world.is_main:
        tracker = build_tracker(cfg)
        tracker.probe()  # a named store that does not answer fails here, before any training
    data = instantiate(cfg.data)
    if world.is_main:  # rank 0 writes the tokenizer (and data caches) first
        data.setup(run_dir)
        keep_pretrained_files(cfg, run_dir)
    # rank 0 may train a tokenizer or tokenize a table first, then the others read theirs: these
    # waits get the allowance of a first (compiling) step
    world.barrier("waiting for rank 0's data setup", scale=10.0)
    if not world.is_main:
        data.setup(None)
    world.check_same(str(data.tokenizer_hash), "the tokenizer",  # after the others' setup
                     "train it once (rank 0) and pass data.tokenizer.path=<its tokenizer.json>",
                     scale=10.0)
    track_dataset(tracker, data)
    model = instantiate(cfg.model, vocab_size=data.vocab_size, num_labels=data.num_labels)
    config = to_container(cfg)
    config["num_parameters"] = count_parameters(model)
    log.info("model %s: %s parameters", cfg.model._target_.rsplit(".", 1)[-1],
             f"{config['num_parameters']:,}")
    trainer = Trainer(settings, optimizer=instantiate(cfg.optimizer), callbacks=callbacks,
                      load_teachers=load_teachers, checkpointing=checkpointing)
    resumed_from = resumed_run_folder(resume) if resume is not None else None
    tags = {**run_tags(cfg, choices, run_hash, run_dir, resumed_from), **process_tags(),
            WORLD_SIZE: str(world.size)}
    result = trainer.fit(model, data, tracker, run_dir, config=config, tags=tags, resume=resume)
    if world.is_main:
        print("\n".join(summary_lines(result, tracker)))
    return result.metrics


def train_distill_rounds(cfg: DictConfig) -> dict[str, float]:
    """trainer.distill.rounds > 1: one parent run, each round a child run (distill_rounds.py)."""
    from mlxlab.distill_rounds import train_rounds

    run_dir, choices, _ = hydra_context(cfg)
    name = run_name(cfg, swept_keys())
    parent = build_tracker(cfg, name)
    parent.probe()  # a store that does not answer fails here, before any manifest
    return train_rounds(cfg, train, parent, run_tags(cfg, choices, config_hash(cfg), run_dir), name)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def hydra_main(cfg: DictConfig) -> float:
    from mlxlab.training.trainer import TrainingInterrupted

    _, _, sweeping = hydra_context(cfg)
    if cfg.get("sweep", {}).get("skip_finished") and sweeping:
        from mlxlab.runs import finished_metric

        done = finished_metric(cfg)
        if done is not None:
            log.info("skip_finished: this config already has a finished run; skipping")
            return done
    try:
        with unwrapped():  # a constructor's own error (a bad size) as itself, not Hydra's report
            metrics = train(cfg)
        if cfg.optimized_metric not in metrics:  # e.g. streamed text with data.splits.val_examples=0
            log.warning("no %s to return: the run had no validation data", cfg.optimized_metric)
        return float(metrics.get(cfg.optimized_metric, math.nan))
    except TrainingInterrupted as stop:
        log.error("stopped by signal; checkpoint: %s (resume with resume=auto)", stop.checkpoint)
        if stop.requeue:
            from mlxlab.runtime import slurm

            slurm.requeue()
        sys.exit(stop.exit_code)
    except UserError as err:  # bad input the user can fix; anything else is a bug: traceback
        from mlxlab.runtime import failures

        if sweeping:  # a failed trial is recorded as failed (NaN) and the sweep goes on
            log.error("trial failed: %s", err)
            from mlxlab.search.trial_link import record_failure

            record_failure(str(err))  # a search's trial: the reason on its Optuna trial
            failures.cleanup_done()  # its cleanup is over: a device failure's watchdog stands down
            return math.nan
        remove_unused_run_dir(cfg)
        # sys.exit, or os._exit after a device failure (MLX's teardown can hang then: mlx#2821)
        failures.leave(2, f"mlxlab: error: {err}")


# Config groups whose option a user picks on the command line (group=option).
CHOICE_GROUPS = ("model", "data", "trainer", "optimizer", "callbacks", "tracking", "experiment",
                 "debug", "hparams_search")


def check_group_choices(argv: list[str]) -> None:
    """`optimizer=adamx` fails here with one line listing the options, not with Hydra's
    multi-line "Could not find 'optimizer/adamx'" report. A user's own config folder
    (`--config-dir ./my_conf`) adds its files to the options."""
    own = _config_dirs(argv)
    for arg in argv:
        key, eq, value = arg.lstrip("+").partition("=")
        if not eq or key not in CHOICE_GROUPS or "(" in value or value in ("null", ""):
            continue
        options = sorted({*group_options(key), *(p.stem for d in own for p in d.glob(f"{key}/*.yaml"))})
        # a multirun sweep (a,b) or a list of options merged into one node ([mlflow,csv])
        listed = value.removeprefix("[").removesuffix("]").split(",")
        unknown = [v.strip() for v in listed if v.strip() not in options]  # Hydra allows "a, b"
        if options and unknown:
            raise ConfigError(f"{key}={unknown[0]} is not an option: choose one of {options} "
                              f"(the files in conf/{key}/)")


def _config_dirs(argv: list[str]) -> list[Path]:
    """The folders Hydra's --config-dir / -cd add to the config search path."""
    dirs = []
    for i, arg in enumerate(argv):
        flag, eq, value = arg.partition("=")
        if flag in ("--config-dir", "-cd"):
            value = value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
            dirs.append(Path(value).expanduser())
    return dirs


def main() -> None:
    """mlxlab-train / `mlxlab train`: the group choices checked first, then the Hydra app."""
    try:
        check_group_choices(sys.argv[1:])
    except ConfigError as err:
        print(f"mlxlab: error: {err}", file=sys.stderr)
        sys.exit(2)
    if tracks_in_a_child(sys.argv[1:]):
        from mlxlab.tracking.mlflow import background

        background.prestart()  # its imports overlap Hydra's composing and ours
    hydra_main()


def tracks_in_a_child(argv: list[str]) -> bool:
    """Whether this command line will track with MLflow in a child process (the default:
    tracking=mlflow, tracking.background=true) from this process: one run, this rank the
    first. A wrong guess costs only an idle child that exits with this process."""
    from mlxlab.runtime import distributed

    if any(a in ("-m", "--multirun", "--help", "-h", "--cfg", "-c", "--info") or
           a.startswith(("--cfg=", "--info=", "hydra/launcher=")) for a in argv):
        return False
    if distributed.launched_rank() not in (None, 0):
        return False
    for arg in argv:
        key, _, value = arg.lstrip("+").partition("=")
        if key == "tracking" and "mlflow" not in value:
            return False
        if key == "tracking.background" and value.lower() in ("false", "0", "no", "off"):
            return False
    return True


def remove_unused_run_dir(cfg: DictConfig) -> None:
    """A run that failed before it made anything (bad config, no tracking server) leaves no
    output folder holding only Hydra's `.hydra/` and log: remove it and its emptied parents."""
    run_dir = Path(str(cfg.paths.output_dir))
    if not run_dir.is_dir():
        return
    made = [p.name for p in run_dir.iterdir() if p.name != ".hydra" and p.suffix != ".log"]
    if made:
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    outputs = Path(str(cfg.paths.root_dir)) / "outputs"
    for parent in run_dir.parents:
        if outputs not in (parent, *parent.parents) or any(parent.iterdir()):
            break
        parent.rmdir()


if __name__ == "__main__":
    main()
