"""What a fit holds: `FitParts` (what it takes from its Trainer) and `FitFields` (what its
pieces build, in order, and the later pieces read).

`Fit` (loop.py) is built on `EvaluationPoints` (eval_points.py) and `RunEnd` (run_end.py); all
three read the fields declared here, which `Fit.run`'s pieces set: the loop's own pieces build
them, the other two only read them (and RunState's evaluation fields).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import mlx.nn as nn

from mlxlab.checkpoint import CheckpointManager
from mlxlab.data.base import DataModule
from mlxlab.data.batching import Batching
from mlxlab.objectives.base import LossFn, Objective
from mlxlab.runtime.cluster import distributed
from mlxlab.tracking.base import Tracker
from mlxlab.training.async_writer import CheckpointWriter
from mlxlab.training.callbacks import Callback
from mlxlab.training.model_ops import ModelSchedule
from mlxlab.training.optim import OptimizerFactory
from mlxlab.training.parallel.sharding import Placement
from mlxlab.training.settings import CheckpointPolicy, TrainerSettings
from mlxlab.training.signals import GracefulStop
from mlxlab.training.state import RunState


class FitParts(Protocol):
    """What a fit takes from its Trainer (trainer.py): the settings and the parts it was built
    with."""

    settings: TrainerSettings
    optimizer_factory: OptimizerFactory
    callbacks: Sequence[Callback]
    checkpointing: CheckpointPolicy
    objective: Objective


class FitFields:
    """The fields of one fit: its parts and arguments (the constructor's), then what run()'s
    pieces build, in order, and the save and evaluation points read."""

    settings: TrainerSettings
    optimizer_factory: OptimizerFactory
    callbacks: list[Callback]       # this fit's: a data curriculum adds its own
    checkpointing: CheckpointPolicy
    objective: Objective
    model: nn.Module
    data: DataModule
    tracker: Tracker
    run_dir: Path
    config: dict
    tags: dict
    resume: str | Path | None
    stop: GracefulStop              # the signals that end the run with a checkpoint
    world: distributed.World
    rows_of: Any                    # this rank's rows of a batch (identity: data batches per rank)
    batching: Batching              # after any memory fitting
    grad_accum: int
    loss_fn: LossFn                 # the objective's loss in trainer.precision: what the step trains
    total_steps: int
    max_epochs: float
    steps_per_epoch: int | None
    state: RunState
    optimizer: Any
    placement: Placement            # how the model sits on the ranks (training/parallel/)
    data_world: distributed.World   # the ranks the data splits over (tensor: none, every rank
    eval_world: distributed.World   # computes the same rows; fsdp evaluates whole on each)
    manager: CheckpointManager
    base: dict | None               # the pretrained base checkpoints leave out (fit_base)
    writer: CheckpointWriter
    model_ops: ModelSchedule
    val_print: str | None           # the validation set's fingerprint (None: no validation)
    saved_at: list[int]             # the steps saved, the same on every rank
    step_fn: Any                    # the compiled step (rebuilt after a model operation)
    compiling: bool                 # the next step compiles (left out of the throughput)
    shapes_seen: frozenset          # the micro-batch shapes the compiled step has traced
    compiles: list[float]           # seconds of each step that compiled, in this process
    tie_break: tuple[str, str] | None  # (metric, mode) breaking a tie on the monitor
    objective_tags: dict[str, str]  # the run tags the objective's setup returned
    steps_peak: int                 # MLX's peak bytes at the last step (before its checkpoint)
