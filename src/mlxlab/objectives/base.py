"""The objective interface: what the one training loop asks of whatever it trains toward.

An `Objective` answers five questions, and the loop (training/loop.py), evaluation, checkpoint
state, artifacts and analysis ask nothing else about which objective runs:

1. **what it trains on**: `train_batches(data, batching, epoch, model)` yields the micro-batches
   of an epoch. The default passes the data module's batches through; an objective that *makes*
   its batches (GRPO: prompts -> generated completions -> rewards -> advantages) reads the data
   module's batches (its prompts) and yields batches of its own. See "Making batches" below.
2. **its loss**: `loss(model, batch) -> (loss, aux)`, a pure function of the model's parameters
   and one batch. The loop wraps it in trainer.precision and training/step.py compiles it with
   `nn.value_and_grad` and `mx.compile`, as before; so it must not read or write Python state
   that changes between calls (anything it needs per batch comes in the batch; anything fixed
   for the run, such as a table of reference log-probs, may be captured as a constant array).
   `aux` holds scalar arrays logged as `train/<key>`, and `aux["ntokens"]`, the count the loss
   is a mean over (tokens, examples, pairs, completions): gradient accumulation and data
   parallelism weight micro-batches by it, and the logged rate counts it. A row with all its
   loss masks 0 (a padding row on a rank without rows, see World.shard_rows, which zeroes every
   key named `loss_mask` or `*_loss_mask`) must add 0 to both. Per-example values (one per row,
   callbacks' needs_example_losses) go in `aux` under the keys of losses.EXAMPLE_KEYS when
   `ObjectiveSetup.per_example` is true.
3. **its evaluation**: `evaluate(model, data, batching, world, prefix, step)` -> `Evaluation`,
   the metrics `<prefix>/<name>` on the validation split (`step`: the optimizer step, for files
   it writes beside them through `ObjectiveSetup.tracker` / `run_dir`);
   `metric_definitions(task)` names them with which way each improves ("min" | "max") and
   the range of their values (stats.MetricDefinition; `metric_directions(task)` is the
   directions alone): what `optimized_metric` may be (config.validate asks the class, before
   anything is built, then `reported_metrics`, the configured objective's own: ORPO's nll_loss
   is not DPO's), what picks the best checkpoint, which way `mlxlab runs compare` and a sweep's
   verdict read a metric and where a mean's interval is cut (objectives/catalog.py reads every
   objective's); `tie_break(task)` names the metric that decides between evaluations equal on
   the monitor (the loss: a saturated monitor such as DPO's reward accuracy ties early);
   `check_data(task)` says in one line when the objective does not train on such data, and
   `check_inputs(cfg)` when the parts the config names for it do not fit together.
4. **its state**: `state_dict()` / `load_state_dict(state)`, JSON-able (floats survive JSON
   exactly; `pack_array` / `unpack_array` keep an array's dtype and bits). training/checkpointing
   writes it into every checkpoint's state.json (`CheckpointState.objective`) and restores it on
   resume, after `setup` and before the first batch: a rollout buffer, a generator's RNG, any
   metric sums since the last logged line. What `setup` recomputes to the same bits from the
   model as it starts and the data (a reference cache) need not be in it.
5. **what the run records about it**: `tags()` (run tags known after setup, e.g. each teacher's
   weight) and `logs()` (metrics it measured outside the loss since the last logged line, e.g.
   the rewards of the rollouts it made; logged as `train/<key>` at each logged step).

Lifecycle, in the order the loop calls it (Fit.run):
    objective = instantiate(cfg.objective)        # cheap: settings only, checked here
    objective.setup(ObjectiveSetup(...))          # before any checkpoint is restored: teachers,
                                                  #   reference models and caches, generators
    objective.load_state_dict(saved.objective)    # on resume only
    for epoch: for batches in steps_of(objective.train_batches(data, batching, epoch, model)):
        step(batches)  -> objective.loss, compiled
        logs: {..aux.., **objective.logs()}
        at evaluations: objective.evaluate(model, data, batching, world)
        at checkpoints: objective.state_dict()

Configuration: `conf/objective/<name>.yaml` is one node whose `_target_` is the objective class
and whose keys are its constructor's arguments (`objective=dpo objective.beta=0.2`). The
constructor only checks and keeps them (config.validate builds it before anything heavy, so a
bad value is one ConfigError line naming `objective.<key>`); `setup` does the work. A new
objective's module goes into the import contract "objectives/ in one direction" (pyproject.toml:
in the top layer beside distill and preference, or below them if they use it) and is named in
scripts/audit_house.py OBJECTIVE_WORDS if its name is new, so that the loop never asks for it.

Making batches (GRPO and any other objective that generates its training data):
- `train_batches` is a generator the loop drains one optimizer step at a time; the loop
  checkpoints between steps, while it is suspended. Keep everything that decides the next batch
  in attributes that `state_dict` returns (not in the generator's locals): the rollouts made but
  not yet trained on, how many of the `num_iterations` passes over them are done, the
  generator's `mx.random` key or numpy Generator state. `load_state_dict` puts them back, and
  the first `train_batches` call after it must yield, first, exactly the batches the killed run
  would have yielded next (drain the restored buffer before reading the data again). The data
  module's own position is checkpointed by the loop as before: read prompts from
  `data.train_batches(batching, epoch)` and never rewind it.
- It may run `model` (generation, old log-probs): it gets the training model itself; call
  `model.eval()` / `model.train()` around generation and `mx.eval` what it computes, outside the
  compiled step. Generation draws from its own RNG, not `mx.random`'s global state (the step's
  dropout keys come from that state, and a resume restores it).
- Each yielded batch is one micro-batch; the loop groups `trainer.grad_accum` of them into one
  optimizer step, and under data parallelism takes this rank's rows of each (World.shard_rows):
  a batch must be a dict of arrays whose first axis is the row, with a `loss_mask` (or
  `*_loss_mask`) so padding rows count 0.
- `batches_per_data_batch()` is how many batches it yields per batch of the data module (GRPO:
  `num_iterations` x the micro-batches one generated group splits into), so the loop's plan
  (steps per epoch, the run's length) counts what the step actually sees.
- Its loss gets the batch as made: put everything it needs (advantages, old and reference
  log-probs, completion masks) in the batch as arrays, and per-batch statistics for the logs
  (reward mean, std, per reward function) in `logs()`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlxlab.data.batching import Batch, Batching
from mlxlab.errors import ConfigError
from mlxlab.runtime import distributed
from mlxlab.stats import MetricDefinition

LossFn = Callable[[nn.Module, Batch], tuple[mx.array, dict[str, mx.array]]]
# (teacher specs, vocab_size, num_labels, label_names) -> (frozen teacher models, weights):
# how an objective that learns from finished runs builds their models (train.py hands
# runs.load_teachers; the objectives never reach up into run folders themselves)
TeacherLoader = Callable[[list, int, "int | None", "list[str] | None"],
                         tuple[list[nn.Module], list[float]]]


@dataclass(frozen=True)
class Evaluation:
    """What an objective's evaluate() measured on the validation split."""

    metrics: dict[str, float]          # <prefix>/loss, /accuracy, ... (metric_directions)
    labels: np.ndarray | None = None   # classification: each validation row's label,
    probs: np.ndarray | None = None    # and its predicted probabilities (rows x labels)

    def state_dict(self) -> dict:
        """For a checkpoint's state.json: the arrays as lists (floats survive JSON exactly) with
        their dtypes, so a restored Evaluation writes byte-identical predictions."""
        return {"metrics": dict(self.metrics), "labels": pack_array(self.labels),
                "probs": pack_array(self.probs)}

    @classmethod
    def from_state_dict(cls, state: dict | None) -> Evaluation | None:
        if not state:
            return None
        return cls(dict(state["metrics"]), unpack_array(state.get("labels")),
                   unpack_array(state.get("probs")))


def pack_array(a: Any) -> dict | None:
    """An array (numpy or MLX) as JSON: its dtype, shape and values, restored to the same bits
    by unpack_array (float32 values are exact as JSON's doubles). None stays None."""
    if a is None:
        return None
    a = np.asarray(a.astype(mx.float32) if isinstance(a, mx.array) and a.dtype == mx.bfloat16
                   else a)
    return {"dtype": str(a.dtype), "shape": list(a.shape), "values": a.reshape(-1).tolist()}


def unpack_array(packed: dict | None) -> np.ndarray | None:
    if packed is None:
        return None
    values = np.asarray(packed["values"], dtype=packed["dtype"])
    return values.reshape(packed["shape"]) if "shape" in packed else values


@dataclass(frozen=True)
class ObjectiveSetup:
    """What `Objective.setup` may use: the run's parts as the loop built them, before any
    checkpoint is restored into the model (so a reference taken from it is the run's start)."""

    model: nn.Module
    data: Any                               # the DataModule, set up
    batching: Batching                      # what the data module is asked for (this rank's
                                            #   or the global batch, see Fit), before memory fitting
    world: distributed.World
    per_example: bool = False               # a callback wants aux's per-example values
    load_teachers: TeacherLoader | None = None  # models of finished runs (distillation)
    run_dir: Path | None = None             # the run folder (files it writes, e.g. samples)
    tracker: Any = None                     # the run's Tracker (started by the time batches
                                            #   are drawn and evaluations run: artifacts)


class Objective:
    """What a run trains toward (see the module). Subclasses implement `loss` and, for data
    whose task the default evaluation does not score, `evaluate` and `metric_directions`."""

    name: ClassVar[str] = "objective"       # conf/objective/<name>.yaml; the run's tag
    needs_teachers: ClassVar[bool] = False  # True: setup needs ObjectiveSetup.load_teachers
    # True: train_batches makes batches the data module does not hold (rollouts), so a memory
    # probe over the data's batches does not measure them (config.py refuses the two together)
    makes_batches: ClassVar[bool] = False

    def setup(self, setup: ObjectiveSetup) -> None:
        """Build what the loss needs from the run's parts (teachers, a reference, caches);
        called once per fit, before any checkpoint is restored."""

    def loss(self, model: nn.Module, batch: Batch) -> tuple[mx.array, dict[str, mx.array]]:
        """(the scalar loss, aux): pure in (model's parameters, batch); compiled by the step."""
        raise NotImplementedError(f"{type(self).__name__}.loss")

    def train_batches(self, data: Any, batching: Batching, epoch: int,
                      model: nn.Module) -> Iterable[Batch]:
        """An epoch's micro-batches: the data module's, unless the objective makes its own."""
        return data.train_batches(batching, epoch)

    def batches_per_data_batch(self) -> int:
        """Batches train_batches yields per batch of the data module (the plan counts steps by it)."""
        return 1

    def check_step_plan(self, grad_accum: int) -> None:
        """One ConfigError line when the objective's batches cannot be summed `grad_accum` at a
        time into one optimizer step (called once the plan is known, before the first step)."""

    def evaluate(self, model: nn.Module, data: Any, batching: Batching,
                 world: distributed.World | None = None, prefix: str = "val",
                 step: int | None = None) -> Evaluation:
        """The metrics `<prefix>/<name>` on data's validation batches (rank-reduced); `step`: the
        optimizer step evaluated (for what the objective writes beside the metrics, e.g. sample
        completions as an artifact; None outside a fit)."""
        raise NotImplementedError(f"{type(self).__name__}.evaluate")

    @classmethod
    def metric_definitions(cls, task: str) -> dict[str, MetricDefinition]:
        """The validation metrics (without the `val/` prefix) that evaluate reports on data of
        `task`, each with its direction and range; {} when the objective does not train on such
        data. A subclass overrides this or, directions only, metric_directions."""
        return {}

    @classmethod
    def metric_directions(cls, task: str) -> dict[str, str]:
        """metric_definitions' names, each with "min" or "max"."""
        return {name: d.mode for name, d in cls.metric_definitions(task).items()}

    def reported_metrics(self, task: str) -> dict[str, str]:
        """What this objective, as configured, reports (a subset of metric_directions: the
        Preference class names ORPO's nll_loss, which its DPO loss does not log)."""
        return self.metric_directions(task)

    @classmethod
    def tie_break(cls, task: str) -> str | None:
        """The metric that picks between evaluations equal on the monitor (the best checkpoint,
        checkpoint.choose_best): the loss when the objective reports one."""
        return "loss" if "loss" in cls.metric_directions(task) else None

    @classmethod
    def check_data(cls, task: str) -> None:
        """One ConfigError line when the objective does not train on data of `task` (config.validate
        asks the class before anything is built); default: when it names no metrics for it."""
        if not cls.metric_directions(task):
            raise ConfigError(f"objective {cls.__name__} does not train on {task} data")

    @classmethod
    def check_inputs(cls, cfg: Any) -> None:
        """One ConfigError line when what the run's config names for this objective cannot work
        together (GKD: a teacher whose tokenizer gives the student's token ids other meanings);
        config.validate asks the class with the composed config before anything is built, so a
        refused run creates no folder, tracked run or model. Default: nothing to check."""

    def __repr__(self) -> str:  # what config.validate's line names
        return type(self).__name__

    def tags(self) -> dict[str, str]:
        """Run tags known after setup (tracking/tags.py names)."""
        return {}

    def logs(self) -> dict[str, float]:
        """Metrics measured outside the loss since the last call (logged as train/<key>)."""
        return {}

    def state_dict(self) -> dict:
        """What a checkpoint keeps of the objective (JSON-able, see the module)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Put back what state_dict returned (after setup, before the first batch)."""


def check_objective(objective: Any) -> Objective:
    """`objective` is an Objective of mlxlab, or one TypeError naming what it is."""
    if not isinstance(objective, Objective):
        raise TypeError(f"{type(objective).__name__} is not an objective of mlxlab: subclass "
                        "mlxlab.objectives.base.Objective (conf/objective/*.yaml)")
    return objective
