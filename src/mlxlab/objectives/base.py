"""The objective interface: what the one training loop asks of whatever it trains toward.

The loop (training/loop.py), evaluation, checkpoint state, artifacts and analysis ask an
`Objective` these things and nothing else about which objective runs:

- `setup(ObjectiveSetup)`: build what the loss needs (teachers, a reference, caches, a sampler)
  from the run's parts, before any checkpoint is restored; returns the run tags it knows then.
- `train_batches(data, batching, epoch, model)`: an epoch's micro-batches. The default passes the
  data module's through; an objective that makes its own (GRPO: prompts -> completions ->
  rewards) reads the data's batches and yields its own (see "Making batches").
- `plan(grad_accum)`: how many batches it yields per batch of the data module (the run's length
  counts them), or one ConfigError line when they cannot be summed `grad_accum` at a time.
- `loss(model, batch) -> (loss, aux)`: pure in the model's parameters and one batch (the step
  compiles it); `aux["ntokens"]` is the count the loss is a mean over, by which accumulation
  and data parallelism weight micro-batches; other scalars are logged as `train/<key>`; keys
  `example_<column>` are per-row values (one per row, when `ObjectiveSetup.per_example`) that
  callbacks.per_example writes as the column `<column>`. A row whose loss masks (`loss_mask`,
  `*_loss_mask`) are 0 adds 0 to both.
- `probe_batch(data, batching)`: a batch of `batching.batch_size` in the shape `loss` trains on,
  for measuring a step's memory (trainer.micro_batch=auto): the data's first, or one shaped as
  the objective's own batches are at their largest. `probe_loss()`: the loss on the data
  module's own batches (analysis differentiates it on a validation batch), None when the
  objective trains on batches it makes.
- `evaluate(...) -> Evaluation`: the metrics `<prefix>/<name>` on the validation split.
- `metrics(kind)` (a class method): a `MetricSpec` of what evaluate reports on data of a kind
  (`data_kind`: a data module's task, or "prompts"): each metric's direction and range, the
  tie-break; none when the objective does not train on such data. `optimized_metric`, the best
  checkpoint, `runs compare` and a sweep's verdict read it (objectives/catalog.py).
- `check_config(cfg, kind)` (a class method): one ConfigError line when the composed config asks
  what the objective cannot do (data of another kind: DataMismatch; an optimized_metric it does
  not report; settings that do not fit together), before anything is built.
- `model_head` (a class attribute): the decoder head it trains, "lm" (next-token logits) or
  "score" (a reward model's scalar, objectives/preference/reward.py); check_config refuses another
  model.head.
- `logs()`: metrics measured outside the loss since the last logged line (train/<key>).
- `state_dict()` / `load_state_dict(state)`: JSON-able (`pack_array` keeps an array's bits),
  written into every checkpoint and restored on resume, after setup, before the first batch.

Configuration: `conf/objective/<name>.yaml` is one node whose `_target_` is the class and whose
keys are its constructor's arguments; the constructor only checks and keeps them (config
validation builds it before anything heavy), `setup` does the work. What an objective needs from
rooms above objectives/ (finished runs as teachers: runs.load_teachers) comes in its node as a
Hydra `_partial_` callable.

Making batches (an objective that generates its training data):
- `train_batches` is a generator the loop drains one optimizer step at a time and checkpoints
  between steps: keep everything that decides the next batch in `state_dict` (rollouts not yet
  trained on, passes done, the generator's key), never in the generator's locals; the first
  call after `load_state_dict` yields exactly what the killed run would have yielded next.
  Read prompts from `data.train_batches(batching, epoch)` (its position is checkpointed).
- It may run `model` (generation): call `model.eval()` / `model.train()` around it and
  `mx.eval` what it computes, outside the compiled step, drawing from its own RNG.
- Each yielded batch is a dict of arrays whose first axis is the row, with a `loss_mask`;
  everything the loss needs (advantages, old and reference log-probs) is in it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlxlab.data.batching import Batch, Batching
from mlxlab.data.prompts import PromptRows
from mlxlab.errors import ConfigError, DataMismatch
from mlxlab.runtime.cluster import distributed
from mlxlab.stats import MetricDefinition

LossFn = Callable[[nn.Module, Batch], tuple[mx.array, dict[str, mx.array]]]


@dataclass(frozen=True)
class ExampleScores:
    """One task's scores per example, as an objective's evaluation computed them: the task's
    metrics (means over the rows), one row per example ({"id": ..., score: value, ...}) and each
    score that pairs two runs with its direction (evaluation/paired.py)."""

    task: str
    kind: str
    metrics: dict[str, float]
    rows: list[dict[str, Any]]
    higher_is_better: dict[str, bool] = field(default_factory=dict)


@dataclass(frozen=True)
class Evaluation:
    """What an objective's evaluate() measured on the validation split."""

    metrics: dict[str, float]          # <prefix>/loss, /accuracy, ... (MetricSpec)
    labels: np.ndarray | None = None   # classification: each validation row's label,
    probs: np.ndarray | None = None    # and its predicted probabilities (rows x labels)
    # per-example scores of tasks the evaluation scored (a retrieval set's queries), which
    # evaluation/in_training.py keeps as the run's eval_tasks/last and /best
    tasks: tuple[ExampleScores, ...] = ()

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
class MetricSpec:
    """What an objective's evaluation reports on data of one kind (prefix "val/"): each metric's
    direction and range, and the metric that picks between evaluations equal on the monitor (the
    best checkpoint, checkpoint.choose_best: a saturated monitor such as DPO's reward accuracy
    ties early). No definitions: the objective does not train on such data."""

    definitions: Mapping[str, MetricDefinition] = field(default_factory=dict)
    tie_break: str | None = "loss"  # used when it is one of the definitions

    def tie(self) -> tuple[str, str] | None:
        """(the logged tie-break metric, its mode), None when the objective reports none."""
        if self.tie_break not in self.definitions:
            return None
        return f"val/{self.tie_break}", self.definitions[self.tie_break].mode


def data_kind(data: Any) -> str | None:
    """The kind of data a data module (or its class) holds, as `metrics` takes it: "prompts" for
    prompts without completions (data=prompts), else its task (classification, lm, preference)."""
    prompts = isinstance(data, PromptRows) or (isinstance(data, type)
                                               and issubclass(data, PromptRows))
    return "prompts" if prompts else data.task


def check_monitor(cfg: Any, kind: str | None, reported: Iterable[str], objective: str) -> None:
    """optimized_metric is one of the `reported` metrics (no prefix) of `objective` (its name in
    the line), or one ConfigError line naming the choices."""
    names = [f"val/{m}" for m in reported]
    if names and cfg.get("optimized_metric") not in names:
        raise ConfigError(f"optimized_metric={cfg.get('optimized_metric')!r} is not computed for "
                          f"{kind} data by objective {objective}: choose one of {names}")


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
    run_dir: Path | None = None             # the run folder (files it writes, e.g. samples)
    tracker: Any = None                     # the run's Tracker (started by the time batches
                                            #   are drawn and evaluations run: artifacts)
    float32_step: bool = True               # the step computes in float32 (trainer.precision)


def check_model_head(cfg: Any, objective: type[Objective]) -> None:
    """A decoder's model.head (lm: next-token logits, score: a reward model's scalar) is the one
    `objective` trains, or one ConfigError line: a head the loss would not read is a mistake."""
    head = (cfg.get("model") or {}).get("head")
    if head not in ("lm", "score") or head == objective.model_head:  # (another: the model's line)
        return
    if objective.model_head == "score":
        raise ConfigError(f"objective {objective.__name__} trains a reward model, a scalar head "
                          "on the decoder: set model.head=score (or experiment=reward_chat)")
    raise ConfigError(f"model.head={head} is a reward model's scalar head, which objective "
                      f"{objective.__name__} does not train: leave model.head=lm, or use "
                      "objective=reward")


class Objective:
    """What a run trains toward (see the module). Subclasses implement `loss`, `evaluate` and
    `metrics`; the rest have the defaults of an objective that trains on the data's batches."""

    # the decoder head it trains (model.head of conf/model/hf_decoder.yaml): lm | score
    model_head = "lm"
    # a row's loss reads the batch's other rows (in-batch negatives): the batch is computed
    # whole, never split into micro-batches, accumulation steps or ranks (an out of memory
    # ends the run instead of restarting it at half the micro-batch)
    couples_rows = False

    def setup(self, setup: ObjectiveSetup) -> dict[str, str] | None:
        """Build what the loss needs from the run's parts (teachers, a reference, caches);
        called once per fit, before any checkpoint is restored. Returns run tags known now
        (tracking/tags.py names: each teacher's weight), or None."""
        return None

    def train_batches(self, data: Any, batching: Batching, epoch: int,
                      model: nn.Module) -> Iterable[Batch]:
        """An epoch's micro-batches: the data module's, unless the objective makes its own."""
        return data.train_batches(batching, epoch)

    def plan(self, grad_accum: int) -> int:
        """Batches train_batches yields per batch of the data module (the run's length counts
        them), or one ConfigError line when they cannot be summed `grad_accum` at a time into
        one optimizer step (called once the micro-batch is chosen, before the first step)."""
        return 1

    def loss(self, model: nn.Module, batch: Batch) -> tuple[mx.array, dict[str, mx.array]]:
        """(the scalar loss, aux): pure in (model's parameters, batch); compiled by the step."""
        raise NotImplementedError(f"{type(self).__name__}.loss")

    def probe_batch(self, data: Any, batching: Batching) -> Batch:
        """A batch of `batching.batch_size` shaped as the loss trains on them, to measure a step's
        memory (training/micro_batch.py pads its rows to the longest the data makes): the data
        module's first. Called after setup; it must not move the objective's own state."""
        return next(iter(data.train_batches(batching, 0)))

    def memory_beside_step(self, batching: Batching) -> int:
        """Bytes the objective's own models take outside the compiled step at their peak, beyond
        what they hold resident (a learned reward's scoring activations: runs/learned_reward.py),
        which trainer.micro_batch=auto leaves out of the step's budget; models the objective
        loads in `setup` are resident by then and counted in the step's measurement. Called
        after setup, only by that search."""
        return 0

    def probe_loss(self) -> LossFn | None:
        """The loss on a batch of the data module's (analysis differentiates it on a validation
        batch); None when the objective trains on batches it makes, not on the data's."""
        return self.loss

    def evaluate(self, model: nn.Module, data: Any, batching: Batching,
                 world: distributed.World | None = None, prefix: str = "val",
                 step: int | None = None) -> Evaluation:
        """The metrics `<prefix>/<name>` on data's validation batches (rank-reduced); `step`: the
        optimizer step evaluated (for what the objective writes beside the metrics, e.g. sample
        completions as an artifact; None outside a fit)."""
        raise NotImplementedError(f"{type(self).__name__}.evaluate")

    @classmethod
    def metrics(cls, kind: str | None) -> MetricSpec:
        """What evaluate reports on data of `kind` (data_kind); no definitions when the
        objective does not train on such data."""
        return MetricSpec()

    @classmethod
    def check_config(cls, cfg: Any, kind: str | None) -> None:
        """One ConfigError line when the composed config `cfg` asks what this objective cannot
        do, asked of the class before anything is built (a refused run creates no folder):
        data of a `kind` it does not train on (DataMismatch), an optimized_metric it does not
        report. An objective with more to check (teachers that must read the student's tokens)
        adds its checks and calls this one."""
        check_model_head(cfg, cls)
        spec = cls.metrics(kind)
        if kind is not None and not spec.definitions:
            raise DataMismatch(f"objective {cls.__name__} does not train on {kind} data")
        check_monitor(cfg, kind, spec.definitions, cls.__name__)

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
