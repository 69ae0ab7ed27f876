"""The checkpoints of one fit: the manager and writer its `CheckpointPolicy` asks for, what a
checkpoint holds (`checkpoint_state`; `fit_base`: only the trained parameters when the frozen
ones are a pretrained base's), and resuming: the newest usable checkpoint of a run
restored into the model, optimizer, data, RNG, callbacks and RunState (`restore`), with a tag and
a warning for each thing that changed since (`resume_tags`).

The files themselves (atomic writes, discovery, loading by name) are checkpoint/'s; this module
says what of a fit goes into them and comes back out.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from mlxlab.checkpoint import (
    CheckpointError,
    CheckpointManager,
    CheckpointState,
    LoadReport,
    find_run_checkpoints,
    rng_state,
    set_rng_state,
)
from mlxlab.checkpoint.layout import CHECKPOINTS_DIR
from mlxlab.data.batching import Batching
from mlxlab.models.base import Model
from mlxlab.models.sources.fingerprint import base_record, holds_base
from mlxlab.objectives.base import Objective
from mlxlab.runtime.cluster import distributed
from mlxlab.tracking.base import flatten_config
from mlxlab.training.async_writer import CheckpointWriter
from mlxlab.training.callbacks import Callback
from mlxlab.training.model_ops import ModelSchedule, newest_state
from mlxlab.training.settings import CheckpointPolicy, TrainerSettings
from mlxlab.training.state import RunState, TrainingError

log = logging.getLogger(__name__)

# The run config's record of its micro-batch (training/micro_batch.py; MLflow params batch_plan.*)
PLAN_KEY = "batch_plan"


def build_manager(policy: CheckpointPolicy, run_dir: Path,
                  settings: TrainerSettings) -> CheckpointManager:
    """When to save and what to keep under run_dir/checkpoints; best/ follows the monitor."""
    return CheckpointManager(
        run_dir / CHECKPOINTS_DIR, keep_last_n=policy.keep_last_n,
        save_every_steps=policy.save_every_steps, save_every_minutes=policy.save_every_minutes,
        monitor=settings.monitor, mode=settings.monitor_mode)


def build_writer(policy: CheckpointPolicy, manager: CheckpointManager, run_dir: Path, config: dict,
                 world: distributed.World) -> CheckpointWriter:
    """Background (or inline) checkpoint writes, uploading to checkpoint.remote (rank 0).
    An unusable remote (its package missing, RemoteError) fails here."""
    uploader = None
    if policy.remote and world.is_main:
        from omegaconf import OmegaConf  # (the remote's modules: only for a remote)

        from mlxlab.checkpoint.remote import RemoteStore, RemoteUploader

        store = RemoteStore(policy.remote, retries=policy.remote_retries,
                            backoff_s=policy.remote_backoff_s, timeout_s=policy.remote_timeout_s)
        uploader = RemoteUploader(store, run_dir, manager.keep_last_n,
                                  config_text=OmegaConf.to_yaml(OmegaConf.create(config)),
                                  final_wait_s=policy.remote_final_wait_s)
    return CheckpointWriter(manager, asynchronous=policy.async_write,
                            when_busy=policy.when_busy, uploader=uploader)


def fit_base(model: Model, policy: CheckpointPolicy) -> dict | None:
    """The base record this fit's checkpoints carry, so that they hold only the trainable
    parameters (adapters, DoRA magnitudes, a trained head): the model's frozen weights come
    from its pretrained source as a rebuild gives them again (Model.base_source). None, and
    checkpoints of every weight: a model from scratch, a full fine-tune (nothing frozen), or
    checkpoint.save_base=true. Hashes the source's files once (cached by path, size and mtime)."""
    source = model.base_source
    if policy.save_base or source is None:
        return None
    trainable = {k for k, _ in tree_flatten(model.trainable_parameters())}
    if all(k in trainable for k, _ in tree_flatten(model.parameters())):
        return None
    record = base_record(source["pretrained"], source.get("revision"), Path(source["folder"]))
    log.info("checkpoints hold the trained parameters only; the frozen ones are the base %s "
             "(fingerprint %s; checkpoint.save_base=true keeps every weight)",
             record["pretrained"], record["fingerprint"][:12])
    return record


def checkpoint_state(state: RunState, data_state: dict, *, model: nn.Module, data,
                     callbacks: Sequence[Callback], monitor: str, config: dict,
                     val_print: str | None, model_ops: ModelSchedule,
                     objective: Objective, base: dict | None = None) -> CheckpointState:
    """Everything a checkpoint of this fit at `state.step` holds beside the arrays; `data_state`:
    where the data stream is (every lane's, gathered); `base`: fit_base's record (dropped
    once a model operation changed which weights exist: a grown layer is not the base's)."""
    return CheckpointState(
        step=state.step, epoch=state.epoch, data=data_state, rng=rng_state(),
        callbacks={cb.state_key: cb.state_dict() for cb in callbacks},
        run_id=state.run_id, history=state.history,  # the tracker's: set when it is written
        best_metrics=state.best_metrics,
        best_metric=state.best_metrics.get(monitor), config=config,
        best_eval=state.best_eval.state_dict() if state.best_eval is not None else None,
        # + what rebuilds a pretrained model without its source folder (its config)
        model_init={"vocab_size": data.vocab_size, "num_labels": data.num_labels,
                    **model.checkpoint_init},
        tokenizer_hash=data.tokenizer_hash,
        val_fingerprint=val_print, log_window=state.window.state_dict(),
        model_ops=model_ops.state_dict(),  # training/model_ops.py
        objective=objective.state_dict(),  # batches in hand, a generator's RNG (objectives/)
        # classification: label values and columns, so predicting needs no training CSV
        encoding=data.encoding_state(),
        base=None if model_ops.reshaped() else base,
    )


def restore(resume: str | Path, *, model: nn.Module, optimizer, data,
            callbacks: Sequence[Callback], state: RunState, manager: CheckpointManager,
            model_ops: ModelSchedule, world: distributed.World, objective: Objective,
            rows: int | None = None) -> tuple[CheckpointState, LoadReport | None]:
    """Load the newest usable checkpoint of `resume` (a run or checkpoint folder) into
    everything (the objective after its setup); (its state.json, how its weights matched the
    model's). `rows`: this fit's micro-batch, where the data's position is counted in batches
    of another (rescaled_position)."""
    source = find_run_checkpoints(resume)
    model_ops.restore_structure(model, newest_state(source))  # before its weights load
    raw, path = source.load_latest(model, optimizer,
                                   verify_base=holds_base(model, f"resume={resume}"))
    saved = CheckpointState.from_json(raw)
    if (saved.model_ops or {}).get("done", []) != model_ops.done:
        raise CheckpointError(f"resume: {path} was saved before or after other model "
                              "operations than the newest checkpoint: resume from that one")
    data.load_state_dict(rescaled_position(saved.data, saved.config, rows))
    set_rng_state(saved.rng)
    objective.load_state_dict(saved.objective)
    for cb in callbacks:
        cb.load_state_dict(saved.callbacks.get(cb.state_key, {}))
    state.restore(saved, path)
    manager.restore_best(saved.best_metric)
    if world.is_main:  # rank 0 alone writes the run folder
        manager.adopt_best(path.parent)
    log.info("resumed from %s at step %d (epoch %d)", path, state.step, state.epoch)
    return saved, source.last_report


def resume_tags(saved: CheckpointState, report: LoadReport | None, config: dict, data,
                val_print: str | None, state: RunState, manager: CheckpointManager,
                monitor: str) -> dict[str, str]:
    """Tags (and warnings) for what differs from the checkpoint: settings, tokenizer, validation
    set (its best metric is then forgotten), weights that did not load."""
    tags = resume_changes(saved.config or {}, config)
    old_tok, new_tok = saved.tokenizer_hash, data.tokenizer_hash
    if old_tok != new_tok:
        log.warning("resume: the tokenizer changed (%s -> %s)", old_tok, new_tok)
        tags["resume.changed.tokenizer_hash"] = f"{old_tok} -> {new_tok}"
    if saved.validation_changed(val_print):
        # A best metric measured on other data is no bar for this data's metrics.
        log.warning("resume: the validation set changed since the checkpoint: the best metric "
                    "(%s = %s) is reset; the next evaluation sets a new best/",
                    monitor, state.best_metrics.get(monitor))
        tags["resume.changed.validation_set"] = f"{saved.val_fingerprint} -> {val_print}"
        forget_best(state, manager)
    if report is not None and not report.exact:  # the architecture changed since then
        log.warning("resume: weights did not all match:\n%s", report.summary())
        tags["resume.load_report"] = report.summary()[:5000]
    return tags


def resume_changes(old: dict, new: dict) -> dict[str, str]:
    """Tags naming each model, objective, trainer, optimizer, data and seed setting that differs
    from the checkpoint's."""
    def settings(cfg: dict) -> dict[str, str]:
        # data.tokenizer.path is pointed at the resumed run's tokenizer (its hash is compared
        # instead); cache folders move with the project root and change no result.
        flat = flatten_config({k: cfg[k] for k in ("model", "objective", "trainer", "optimizer",
                                                   "data", "seed")
                               if k in cfg})
        return {k: v for k, v in flat.items()
                if k != "data.tokenizer.path" and not k.endswith("cache_dir")}

    before = settings(old)
    changes = {}
    for key, value in settings(new).items():
        if key in before and before[key] != value:
            log.warning("resume: %s changed %s -> %s", key, before[key], value)
            changes[f"resume.changed.{key}"] = f"{before[key]} -> {value}"
    return changes


def forget_best(state: RunState, manager: CheckpointManager) -> None:
    """A best/ of other weights or data is no bar for these: the next evaluation sets one."""
    state.best_metrics, state.best_eval, manager.best_metric = {}, None, None


def validation_fingerprint(data) -> str | None:
    """A hash of the validation batches, cut with one fixed batching so that the run's own batch
    size does not count: equal fingerprints mean metrics measured on the same examples (kept in
    each checkpoint, compared on resume). None, said once, for data without validation."""
    if not data.has_validation:
        log.info("no validation data (%s): no evaluation; checkpoints by steps (trainer."
                 "eval_every_steps, checkpoint.save_every_steps), at epoch ends and at "
                 "the end; no best/ checkpoint: the last one is the result",
                 data.no_validation_reason)
        return None
    h = hashlib.sha256()
    for batch in data.val_batches(Batching(batch_size=64)):
        for key in sorted(batch):
            value = np.array(batch[key])
            h.update(f"{key}{value.dtype}{value.shape}".encode())
            h.update(value.tobytes())
    return h.hexdigest()[:16]


def rescaled_position(data_state: dict, config: dict | None, rows: int | None) -> dict:
    """A checkpoint's data position for a fit of `rows` rows per micro-batch. Fixed datasets
    count the batches handed out this epoch (`batches_done`), in the checkpoint's micro-batch;
    a checkpoint is taken after whole optimizer steps, so the same rows are `batches_done` x
    theirs / ours batches of ours. (A packed stream counts documents and windows: unchanged.)"""
    config = config or {}
    plan = config.get(PLAN_KEY) or {}
    was = plan.get("micro_batch") or (config.get("trainer") or {}).get("batch_size")
    if (not rows or not was or int(was) == rows or "batches_done" not in data_state
            or "examples_consumed" in data_state):
        return data_state
    done = int(data_state["batches_done"]) * int(was)
    if done % rows:
        raise TrainingError(f"resume: the checkpoint's data position ({data_state['batches_done']} "
                            f"batches of {was}) is not whole batches of {rows}: resume with "
                            f"trainer.micro_batch={was}")
    log.info("resume: the data position, %s batches of %s rows, is %d of %d", data_state[
        "batches_done"], was, done // rows, rows)
    return {**data_state, "batches_done": done // rows}
