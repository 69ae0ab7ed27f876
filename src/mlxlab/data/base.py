"""The DataModule contract the trainer relies on (the data side of the Tracker protocol).

`data=<option>` builds one of these. The trainer checks `isinstance(data, DataModule)` once and
then calls its members directly (no hasattr probing). The optional capabilities have defaults
here: a module that names `DataModule` as a base class inherits them, one that does not must
define them all.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from mlxlab.data.batching import Batch, Batching


@runtime_checkable
class DataModule(Protocol):
    task: str                     # "classification" (labels per example) | "lm" (next token)
    vocab_size: int | None        # set by setup()
    num_labels: int | None        # classification: set by setup(); lm: None
    tokenizer_hash: str | None    # set by setup(); recorded in checkpoints, compared on resume

    def setup(self, run_dir: str | Path | None = None) -> None:
        """Tokenizer, splits and caches; writes tokenizer.json into run_dir (rank 0 only)."""
        ...

    def num_train_batches(self, batching: Batching) -> int | None:
        """Batches per epoch; None for a stream of unknown length (set trainer.max_steps)."""
        ...

    def train_batches(self, batching: Batching, epoch: int) -> Iterator[Batch]: ...

    def val_batches(self, batching: Batching) -> Iterator[Batch]: ...

    def state_dict(self) -> dict:
        """Where the data stands (epoch, position): restored on resume."""
        ...

    def load_state_dict(self, state: dict) -> None: ...

    # --- optional, with defaults -------------------------------------------------------

    has_validation: bool = True   # False: nothing held out, no evaluation, checkpoints by steps
    no_validation_reason: str = "none held out"
    label_names: list[str] | None = None  # classification: names on the confusion matrix axes
    tokenizer: Any = None         # the tokenizers.Tokenizer, after setup (samples, token names)
    # A dataset read from one file: its path (the run's MLflow dataset input), every row of it
    # as text, and the training rows' positions in it (a batch's `index` -> the file's row).
    path: str | None = None
    examples: list[str] | None = None
    train_idx: Any = None         # a numpy int array, after setup
    # The training documents a curriculum keeps (its outlier report names them); None: the
    # rows of `examples` at `train_idx` are the documents.
    curriculum_documents: list[str] | None = None

    def encoding_state(self) -> dict[str, Any] | None:
        """What predicting needs without the training data (label values, columns)."""
        return None

    curriculum: Any = None        # data/curriculum.py's Curriculum when the data paces examples

    def count_train_batches(self, batching: Batching, limit: int | None = None) -> int | None:
        """Batches per epoch, counted by a pass over the data where num_train_batches does not
        know (a stream): asked for a run bounded by trainer.max_epochs. With `limit`, a count
        past it stops there and gives limit + 1 (max_steps ends that run before its epochs)."""
        return self.num_train_batches(batching)

    def use_world(self, world: Any) -> bool:
        """True when this data reads a lane per rank (batches are already this rank's); else
        the trainer batches the global batch and each rank takes its rows."""
        return False

    def gathered_state(self) -> dict:
        """state_dict() for a checkpoint; data read in per-rank lanes gathers every rank's
        position here (every rank calls it)."""
        return self.state_dict()

    def train_batches_in_order(self, batching: Batching) -> Iterator[Batch] | None:
        """A fixed dataset's training examples, each once, with an `index` per row (teacher
        caching in distillation); None for streams."""
        return None
