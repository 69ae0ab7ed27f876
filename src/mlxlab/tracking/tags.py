"""Every MLflow tag name mlxlab writes or reads, in one place.

Writers (train.py, the trackers, the sweep callback, checkpoint uploads, merges) and readers
(sweep tables, a grid's finished jobs, dead-run checks, the runs listing) import these names, so
a tag is spelled once.
"""

from __future__ import annotations

# MLflow's own
PARENT_RUN = "mlflow.parentRunId"  # the MLflow UI nests runs by this tag
GIT_COMMIT = "mlflow.source.git.commit"
SOURCE_NAME = "mlflow.source.name"  # the run page's "Source": the entry point (tracking/source.py)
EXPERIMENT_KIND = "mlflow.experimentKind"

# A training run (train.py)
CONFIG_HASH = "mlxlab.config_hash"  # a grid finds its finished jobs by it
RUN_DIR = "mlxlab.run_dir"
TASK_NAME = "mlxlab.task_name"
OVERRIDES = "mlxlab.overrides"  # the command line's overrides (also on a sweep's parent)
WORLD_SIZE = "mlxlab.world_size"
COMPILE_S = "mlxlab.compile_s"  # seconds the steps that compiled took (MLX; on a GPU its kernels)
COMPILES = "mlxlab.compiles"  # how many steps compiled: the first, and each new batch shape
COMMAND = "mlxlab.command"  # the command line as typed (tracking/source.py), the latest for a resumed run
RESUMED_FROM = "mlxlab.resumed_from"  # a resumed run: the run folder (or checkpoint) it went on from
# The micro-batch a run trains with (training/micro_batch.py) and its restarts after running out
# of memory (runtime/supervision/supervise.py): tags, since MLflow params are written once
MICRO_BATCH = "mlxlab.micro_batch"
GRAD_ACCUM = "mlxlab.grad_accum"  # micro_batch x grad_accum: the effective batch, unchanged
OOM_RESTARTS = "mlxlab.oom_restarts"  # how often it restarted
OOM_RESTART_PREFIX = "mlxlab.oom_restart."  # + n: what restart n was (step, how, micro-batch)
CHOICE_PREFIX = "choice."  # "choice.model" = "bert": the config-group options a run used

# The process that trains a run, for dead-run detection (tracking/mlflow/stale.py)
PID = "mlxlab.pid"
HOST = "mlxlab.host"
PID_NAMESPACE = "mlxlab.pid_namespace"  # Linux: containers sharing a hostname see other pids
PROCESS_START = "mlxlab.process_start"  # the process's start (boot id:ticks): a reused pid differs
HEARTBEAT = "mlxlab.heartbeat"  # unix seconds, rewritten by the tracking side while the run lives
HEARTBEAT_EVERY = "mlxlab.heartbeat_every_s"  # the interval it promises (runs of other hosts)
KILLED_AT = "mlxlab.killed_at"  # when a dead process's run was marked KILLED (UTC, ISO 8601)
KILLED_REASON = "mlxlab.killed_reason"
RESUMABLE = "mlxlab.resumable"  # "true": a committed checkpoint can continue the KILLED run
SWEEP_IDENTITY = "mlxlab.sweep_identity"  # on a sweep's parent: what the user asked (sweeps/identity.py)

# Sweeps (sweeps/callback.py)
SWEEP_ID = "mlxlab.sweep_id"
# On a FINISHED job of an earlier sweep that a grown sweep (same task, config and seed) kept
# instead of training it again: "mlxlab.adopted_by.<parent run id>" = "true" (sweeps/jobs.py);
# the grown sweep's children are its own runs and these (sweeps/store.py sweep_children)
ADOPTED_BY_PREFIX = "mlxlab.adopted_by."
ROLE = "mlxlab.role"  # "sweep" on a sweep's parent run
SWEEP_PARAMS = "mlxlab.sweep_params"  # JSON list of the keys a sweep varies
SWEEP_DIR = "mlxlab.sweep_dir"
SWEEPER = "mlxlab.sweeper"
OPTIMIZED_METRIC = "mlxlab.optimized_metric"
OPTIMIZED_MODE = "mlxlab.optimized_metric_mode"
ERROR = "mlxlab.error"  # a failed trial's exception
NUM_RUNS = "mlxlab.num_runs"
NUM_FINISHED = "mlxlab.num_finished"
NUM_FAILED = "mlxlab.num_failed"
# the single child with the top value of the optimized metric: one seed's maximum, which the
# verdict below may not confirm (export/serve a sweep's "best" model from it); stores written
# by earlier versions call it BEST_RUN_ID (still read)
TOP_RUN_ID = "mlxlab.top_run_id"
BEST_RUN_ID = "mlxlab.best_run_id"
# on a training run: which evaluation's checkpoint is best/ and, when the monitor tied (a
# saturated accuracy), how the tie was broken (checkpoint/state.py choose_best)
BEST_CHECKPOINT = "mlxlab.best_checkpoint"

# Checkpoint uploads (checkpoint/remote.py, tagged by training/async_writer.py)
REMOTE_URI = "mlxlab.remote.uri"
REMOTE_CHECKPOINTS = "mlxlab.remote.checkpoints"

# Store merges (tracking/mlflow/merge.py)
MERGE_SOURCE_RUN = "mlxlab.merge.source_run_id"
MERGE_SOURCE_STORE = "mlxlab.merge.source"
MERGE_COMPLETE = "mlxlab.merge.complete"
MERGE_SOURCE_VERSION = "mlxlab.merge.source_version"

# Distillation (training/trainer.py, launch/rounds.py)
DISTILL_TEACHER_WEIGHTS = "mlxlab.distill.teacher_weights"  # each teacher's weight, normalized
DISTILL_ROUNDS = "mlxlab.distill.rounds"  # on the parent run of objective.rounds > 1
DISTILL_ROUND = "mlxlab.distill.round"  # on each round's child run

# Replicates and comparisons (sweeps/groups.py, sweeps/compare.py)
VAL_FINGERPRINT = "mlxlab.val_fingerprint"  # the validation rows a run is scored on (a hash)
# On a sweep's parent, tags (never params: a continuation may change them):
GROUP_PREFIX = "group."  # "group.g1" = "model.pooler=true"
TOP_RUN_PREFIX = "top_run."  # "top_run.<key>": the top single run's value of a swept key
OPTUNA_BEST_PREFIX = "optuna.best."  # "optuna.best.<key>": the search's best params
GROUP = "mlxlab.group"  # on each child of a sweep: its group ("g1"); the config is group.g1
# The verdict on a sweep's parent (sweeps/verdict.py): never a bare winner where the test finds
# none. VERDICT: "no detectable difference" | "g1 better than g2" | "too few replicates";
# LEADER: "g1 (not significant)" | "g1 (significant)"; the note is the run's MLflow description
VERDICT = "mlxlab.verdict"
LEADER = "mlxlab.leader"
VERDICT_METRIC = "mlxlab.verdict.metric"
NOTE = "mlflow.note.content"  # markdown MLflow shows as the run's description (Overview tab)

# `mlxlab eval MODEL TASK...` (runs/named_model.py): its run has ROLE "eval" and says what it scored
EVAL_MODEL = "mlxlab.eval.model"  # the scored folder's absolute path
EVAL_MODEL_KIND = "mlxlab.eval.model_kind"  # pretrained | export | run
EVAL_CHECKPOINT = "mlxlab.eval.checkpoint"  # a run's checkpoint folder that was scored
EVAL_SOURCE_RUN = "mlxlab.eval.source_run_id"  # a scored run's own MLflow run, when tracked

# The search (sweeps/search/): a trial's MLflow run
STUDY = "mlxlab.search.study"
TRIAL_NUMBER = "mlxlab.search.trial"
TRIAL_STATE = "mlxlab.search.state"  # PRUNED on a pruned trial's run
PRUNED_AT_STEP = "mlxlab.search.pruned_at_step"
