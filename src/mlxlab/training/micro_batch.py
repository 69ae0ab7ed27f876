"""The micro-batch a fit trains with, and the accumulation that keeps its effective batch.

The effective batch is trainer.batch_size x trainer.grad_accum rows per optimizer step, and
nothing here changes it: a micro-batch of m rows trains it in (batch_size x grad_accum) / m
forward/backward passes, summed in the one compiled step (step.py), so the update is the same
(to float rounding: the token-weighted sums are added in another order) for a loss whose rows
are independent. A loss whose rows are each other's negatives (Objective.couples_rows: MNRL,
CachedMNRL, CoSENT) is another loss on fewer rows, so its config check refuses any split and
an out of memory ends it rather than restart it at half the micro-batch. Where m comes from,
first come:

1. the run folder's memory_restarts.json: the run ran out of memory and mlxlab-train's parent
   restarted it at half the micro-batch (runtime/supervision/supervise.py);
2. a resumed checkpoint's plan (its config's `batch_plan`), unless trainer.micro_batch changed:
   a resumed `auto` run keeps what its first start chose instead of searching again;
3. trainer.micro_batch=N;
4. trainer.micro_batch=auto: the largest power of two dividing the effective batch whose step
   fits the memory the run may use (`memory_budget`: the tightest of trainer.memory_limit (GB,
   or a fraction of the device's) and the limits set on the process (an address-space limit,
   a cgroup's: runtime/memory/memory_limits.py, less what the process holds beside MLX); with neither,
   MLX's own limit), measured before step 1 on a batch padded to the longest row the
   data makes (the objective's probe_batch: the data's first, or its own batches at their
   largest, e.g. prompts with completions of the longest length): forward, backward, and the
   optimizer's state and update, as MLX counts them (what the objective loaded in its setup,
   e.g. a learned reward's model, is resident then and counted; what its models need outside
   the step, a learned reward's scoring batch, is `memory_beside_step`, taken off the budget);
   a size whose measurement crashes the process (MLX's CPU backend faults where it cannot
   allocate) does not fit: mlxlab-train's parent starts the run again, measuring below it;
5. neither (micro_batch=null): trainer.batch_size.

What was chosen, and what the search measured, goes into the run's config as `batch_plan` (MLflow
params, kept in every checkpoint); a restart's new micro-batch is a tag (params are written once).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_map

from mlxlab.checkpoint import rng_state, set_rng_state
from mlxlab.data.batching import Batching
from mlxlab.data.streaming.module import StreamingText
from mlxlab.runtime.cluster import distributed
from mlxlab.runtime.compute import device
from mlxlab.runtime.memory import memory_limits
from mlxlab.runtime.supervision import failures, supervise
from mlxlab.tracking import tags as T
from mlxlab.training.checkpointing import PLAN_KEY
from mlxlab.training.optim import OptimizerFactory, build_optimizer
from mlxlab.training.plan import global_batching
from mlxlab.training.settings import TrainerSettings, memory_limit
from mlxlab.training.state import TrainingError

log = logging.getLogger(__name__)

SCAN_ROWS = 256  # rows per batch when the data is read once for its longest row
GB = 1e9
# A size predicted over this many times the limit is not tried: the search itself must not run
# out (MLX's CPU backend does not raise, it faults); a closer one is measured.
PREDICTED_OVER = 1.5


@dataclasses.dataclass
class Fitting:
    """What the fit needs to decide its micro-batch: the run's parts and its records."""

    model: nn.Module
    data: object
    loss_fn: Callable
    probe_batch: Callable[[object, Batching], dict]  # the objective's (data, batching) -> batch
    settings: TrainerSettings
    world: distributed.World
    rows_of: Callable[[dict], dict] | None
    optimizer: OptimizerFactory
    run_dir: Path
    resume: str | Path | None
    config: dict  # the run's config: batch_plan is added (params, checkpoints)
    tags: dict  # the run's tags: a restart's
    # bytes the objective's models need outside the step (Objective.memory_beside_step),
    # measured only by the search
    beside_step: Callable[[], int] = lambda: 0
    # the batch may be split (Objective.couples_rows: not where rows are each other's negatives)
    splittable: bool = True


def plan_micro_batch(fit: Fitting, batching: Batching, rank_batches: bool) -> tuple[Batching, int]:
    """(batching, grad_accum) for the fit; `batching`: trainer.batch_size's, global when the
    data batches globally (not `rank_batches`)."""
    settings = fit.settings
    effective = settings.batch_size * settings.grad_accum
    note = restart_note(fit.run_dir, fit.resume, effective)
    saved = saved_plan(fit.resume, settings)
    record: dict = {"effective_batch": effective}
    if note is not None:
        micro = restarted(note, fit.run_dir, fit.tags)
        record["chosen_by"] = "restart"
    elif saved is not None:
        micro, record = int(saved["micro_batch"]), {**saved, "chosen_by": "resumed"}
        log.info("micro-batch %d x grad_accum %d: the resumed run's choice", micro,
                 effective // micro)
    elif settings.micro_batch == "auto":
        micro, tried, limit, budgeted, beside = search(fit, effective)
        record.update(chosen_by="auto", memory_limit_gb=round(limit / GB, 3), tried=tried,
                      budgeted=budgeted, beside_step_gb=round(beside / GB, 6))
    elif settings.micro_batch is not None:
        micro = int(settings.micro_batch)
        record["chosen_by"] = "fixed"
    else:  # trainer.batch_size as it is
        report(fit, batching.batch_size, settings.grad_accum)
        return batching, settings.grad_accum
    apply_memory_limit(settings)
    record["micro_batch"], record["grad_accum"] = micro, effective // micro
    fit.config[PLAN_KEY] = record
    fit.tags[T.MICRO_BATCH], fit.tags[T.GRAD_ACCUM] = str(micro), str(effective // micro)
    report(fit, micro, effective // micro)
    rows = dataclasses.replace(settings.data_batching(), batch_size=micro)
    return (rows if rank_batches else global_batching(rows, fit.world)), effective // micro


def report(fit: Fitting, micro: int, accum: int) -> None:
    """The plan, for a supervising parent (runtime/supervision/supervise.py)."""
    restartable = (not fit.settings.batching.dynamic and not fit.world.enabled
                   and fit.splittable)
    supervise.report_run(fit.run_dir, micro, accum, fit.settings.oom_restarts, restartable,
                         fit.settings.stall_timeout_s)


def restarted(note: dict, run_dir: Path, tags: dict) -> int:
    """The micro-batch of a run its parent restarted (the event logged and tagged); a note that
    says the restarts are spent ends the run with its line (a sweep's job: failed, the sweep
    goes on), once: a later start of it trains at the last micro-batch."""
    line = note.pop("exhausted", None)
    if line:
        supervise.write_note(run_dir, note)
        raise failures.DeviceFailure(line)
    events = note.get("restarts", [])
    micro = int(note["micro_batch"])
    if events:
        last = events[-1]
        log.warning("restarted after running out of memory (%s) at step %s: micro-batch %s -> "
                    "%d, grad_accum %s -> %s (the same effective batch); %s step(s) since the "
                    "checkpoint of step %s are trained again (restart %d; %s)", last["how"],
                    last["step"], last["micro_batch"], micro, last["grad_accum"],
                    note["grad_accum"], last["steps_lost"], last["checkpoint_step"], len(events),
                    supervise.NOTE)
        tags[T.OOM_RESTARTS] = str(len(events))
        tags[f"{T.OOM_RESTART_PREFIX}{len(events)}"] = (
            f"step {last['step']} ({last['how']}): micro-batch {last['micro_batch']} -> {micro}, "
            f"{last['steps_lost']} step(s) lost")
    return micro


def restart_note(run_dir: Path, resume: str | Path | None, effective: int) -> dict | None:
    """The parent's note for this run: in its folder, or in the folder it resumes (a sweep's
    job resumed into another folder); one for another effective batch is not this run's."""
    folders = [Path(run_dir)]
    if resume:
        source = Path(resume)
        folders += [source, *list(source.parents)[:2]]
    for folder in folders:
        note = supervise.read_note(folder)
        if note is not None and effective % int(note.get("micro_batch") or effective + 1) == 0:
            return note
    return None


def saved_plan(resume: str | Path | None, settings: TrainerSettings) -> dict | None:
    """The resumed checkpoint's batch plan, when trainer.micro_batch is what it was then."""
    if not resume:
        return None
    from mlxlab.checkpoint.restore import find_run_checkpoints
    from mlxlab.training.model_ops import newest_state

    state = newest_state(find_run_checkpoints(resume))
    config = (state.config if state is not None else None) or {}
    plan = config.get(PLAN_KEY)
    was = (config.get("trainer") or {}).get("micro_batch")
    if not plan or was != settings.micro_batch:
        return None
    effective = settings.batch_size * settings.grad_accum
    if plan.get("effective_batch") != effective or effective % int(plan["micro_batch"]):
        return None
    return dict(plan)


def memory_limit_bytes(settings: TrainerSettings) -> float:
    """trainer.memory_limit in bytes (settings.memory_limit reads GB, fractions, units); null:
    MLX's own limit (Metal's recommended working set; on the CPU a share of RAM)."""
    if settings.memory_limit is None:
        return float(mx.get_memory_limit())
    kind, value = memory_limit(settings.memory_limit)
    return value if kind == "bytes" else value * device_memory_bytes()


def device_memory_bytes() -> float:
    info = mx.device_info(mx.default_device())
    memory = info.get("memory_size") or info.get("total_memory")
    if memory and device.backend() != "cpu":
        return float(memory)
    return memory_limits.total_memory()


def memory_budget(settings: TrainerSettings) -> tuple[float, str]:
    """(the bytes a measured step may peak at, which limit set them): the tightest of
    trainer.memory_limit and the limits set on this process (runtime/memory/memory_limits.py: RLIMIT_AS,
    a cgroup's, each less what the process holds beside MLX and headroom); neither set: MLX's
    own limit. The machine's RAM is not a budget where the process may use less of it."""
    held = float(mx.get_active_memory() + mx.get_cache_memory())
    found = [(b.bytes, b.what) for b in memory_limits.budgets(held)]
    if settings.memory_limit is not None:
        found.append((memory_limit_bytes(settings),
                      f"trainer.memory_limit={settings.memory_limit}"))
    if not found:
        found.append((float(mx.get_memory_limit()), "MLX's limit: none set on the process"))
    return min(found)


def apply_memory_limit(settings: TrainerSettings) -> None:
    """A set trainer.memory_limit is MLX's limit too (Metal and CUDA raise past it; MLX's CPU
    backend does not enforce one)."""
    if settings.memory_limit is not None:
        mx.set_memory_limit(int(memory_limit_bytes(settings)))


def candidates(effective: int) -> list[int]:
    """Powers of two that divide the effective batch, smallest first."""
    sizes, m = [], 1
    while effective % m == 0 and m <= effective:
        sizes.append(m)
        m *= 2
    return sizes


def search(fit: Fitting, effective: int) -> tuple[int, str, float, str, int]:
    """trainer.micro_batch=auto: (the chosen micro-batch, what was tried, the step's limit in
    bytes, which limit it is, the bytes taken off it for the objective's models beside the step).
    Sizes are tried upward until one is over the limit; one predicted well past it (memory grows
    with the rows: the last two measures extrapolated) is not run, so that the search itself does
    not run out."""
    (limit, budgeted), started = memory_budget(fit.settings), time.perf_counter()
    beside = int(fit.beside_step())
    if beside:  # e.g. a learned reward's scoring batch: not at the step's time, in the process
        limit -= beside
        budgeted += f", less {beside / GB:.3f} GB the objective's models use beside the step"
    saved_rng, saved_data = rng_state(), fit.data.state_dict()
    # the longest row the data makes, or the objective's own batch when it is wider (completions)
    width = max(longest_row(fit.data), widest(fit.probe_batch(fit.data, Batching(batch_size=1))))
    tried: list[str] = []
    chosen, peaks = None, []
    # a size whose measurement crashed the process before (its parent restarted it) is not run
    crashed = supervise.probe_ceiling(fit.run_dir)
    try:
        for m in candidates(effective):
            fit.data.load_state_dict(saved_data)  # each size measured on the first batch
            if crashed is not None and m >= crashed[0]:
                tried.append(f"{m}:out-of-memory({crashed[1]})")
                break
            if len(peaks) >= 2:  # the rows' part doubles with the rows
                predicted = peaks[-1] + 2 * (peaks[-1] - peaks[-2])
                if predicted > PREDICTED_OVER * limit:  # a close call is measured
                    tried.append(f"{m}:skipped(~{predicted / GB:.3f}GB)")
                    break
            supervise.report_probe(fit.run_dir, m)  # a crash from here on: m does not fit
            peak = probe(fit, m, width)
            tried.append(f"{m}:{peak / GB:.3f}GB" if peak is not None else f"{m}:out-of-memory")
            if peak is None or peak > limit:
                break
            chosen = m
            peaks.append(peak)
    finally:
        supervise.report_probe(fit.run_dir, None)
        set_rng_state(saved_rng)
        fit.data.load_state_dict(saved_data)
        mx.clear_cache()  # the probes' buffers go back
        device.reset_peak_memory()  # the run's peak is the training's, not the search's
    summary = ", ".join(tried)
    if chosen is None:
        raise TrainingError(
            f"trainer.micro_batch=auto: one row of {width} positions does not fit "
            f"{limit / GB:.2f} GB ({budgeted}; {summary}): raise the limit (trainer.memory_limit, "
            "`ulimit -v`, the container's), lower data.max_length, or use a smaller model")
    log.info("trainer.micro_batch=auto: %d rows x grad_accum %d (effective batch %d) fit %.3f GB "
             "(%s) at rows of %d positions; tried %s (%.1f s)", chosen, effective // chosen,
             effective, limit / GB, budgeted, width, summary, time.perf_counter() - started)
    return chosen, summary, limit, budgeted, beside


def probe(fit: Fitting, rows: int, width: int) -> float | None:
    """MLX's peak memory (bytes) of one step of `rows` rows padded to `width`: the gradients, a
    fresh optimizer state and its update of the trainable parameters (the model's are left
    alone). None: MLX raised out of memory (Metal, CUDA)."""
    batching = dataclasses.replace(fit.settings.data_batching(), batch_size=rows)
    batch = pad_rows(fit.probe_batch(fit.data, global_batching(batching, fit.world)), width)
    if fit.rows_of is not None:
        batch = fit.rows_of(batch)
    grad_fn = nn.value_and_grad(fit.model, fit.loss_fn)
    optimizer = build_optimizer(fit.optimizer, fit.settings.schedule, 1)
    mx.eval(fit.model.parameters())
    device.reset_peak_memory()
    try:
        params = fit.model.trainable_parameters()
        optimizer.init(params)
        (loss, _), grads = grad_fn(fit.model, batch)
        updated = optimizer.apply_gradients(grads, params)
        mx.eval(loss, updated, optimizer.state)
        peak = float(mx.get_peak_memory())
    except RuntimeError as err:
        if failures.kind_of(err) != "out of memory":
            raise
        return None
    finally:
        del optimizer
    if fit.world.enabled:  # one figure for all ranks, so they all pick the same size
        peak = max(fit.world.sum_numbers([peak if r == fit.world.rank else 0.0
                                          for r in range(fit.world.size)], "the memory probe"))
    return peak


def longest_row(data) -> int:
    """The widest batch the data makes (positions): a packed stream's seq_len, else one pass
    over the training split in large batches (its position is put back by the caller)."""
    if isinstance(data, StreamingText):  # windows of seq_len, every one
        return data.seq_len
    return max([1, *(widest(b) for b in data.train_batches(Batching(batch_size=SCAN_ROWS), 0))])


def widest(batch: dict) -> int:
    """The positions of `batch`'s widest (rows, positions) array (1 for a batch without one)."""
    return max([1, *(int(v.shape[1]) for v in batch.values() if _positions(v))])


def pad_rows(batch: dict, width: int) -> dict:
    """`batch` with its (rows, positions) arrays (token ids, their masks) padded to `width`
    (their last position repeated: the memory of a longer row, whatever it holds)."""
    widths = [v.shape[1] for v in batch.values() if _positions(v)]
    if not widths or max(widths) >= width:
        return batch
    now = max(widths)

    def pad(v):
        if not isinstance(v, mx.array) or v.ndim != 2 or v.shape[1] != now:
            return v
        return mx.array(np.pad(np.array(v), ((0, 0), (0, width - now)), mode="edge"))

    return tree_map(pad, batch)


def _positions(v) -> bool:
    """A (rows, positions) array of token ids (features are floats: they tell no width)."""
    return isinstance(v, mx.array) and v.ndim == 2 and not mx.issubdtype(v.dtype, mx.floating)


