"""Per-example losses: every training example's loss at every step it is trained on.

The loss already computes each example's cross-entropy before taking the mean; built with
per_example=True it returns those values too (aux["example_loss"], and any other
`example_<column>` its objective measures per example), so recording them costs no extra forward
pass. The step hands them over as evaluated arrays; a background thread turns them into rows and,
at each epoch's end, writes `<run dir>/per_example/epoch_0001.parquet` (example_id, epoch, step,
loss and the objective's other columns) and logs it as an artifact. The training thread only
puts a reference on a queue.

The rows of an unfinished epoch are part of the checkpoint (state_dict), so a resumed run writes
the same files as one that was never interrupted. `mlxlab runs hardest RUN` ranks the examples.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from mlxlab.objectives.losses import EXAMPLE_PREFIX
from mlxlab.training.callbacks import Callback

log = logging.getLogger(__name__)

FOLDER = "per_example"
KEYS = ("example_id", "epoch", "step")  # where a row is; the value columns follow (loss, ...)


class PerExampleLosses(Callback):
    """Records each training example's loss per step and writes one parquet file per epoch."""

    needs_example_losses = True

    def __init__(self, folder: str = FOLDER, log_artifacts: bool = True) -> None:
        self.folder, self.log_artifacts = folder, log_artifacts
        self.rows: dict[str, list] = {c: [] for c in KEYS}
        self.written: list[int] = []
        self.tracker, self.dir, self.steps_per_epoch, self.ids = None, None, None, None
        self.enabled, self.warned = True, False
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def setup(self, context, model, data) -> None:
        self.tracker, self.dir = context.tracker, Path(context.run_dir) / self.folder
        self.steps_per_epoch = context.steps_per_epoch
        self.ids = data.train_idx  # batch index -> the row of the data file (None: no file rows)
        # Rank 0 writes the run folder; under data parallelism it sees its own rows only.
        self.enabled = context.world.is_main
        if self.enabled and self._thread is None:
            self._thread = threading.Thread(target=self._work, name="per-example-losses",
                                            daemon=True)
            self._thread.start()

    # --- the training thread: references on a queue ------------------------------------

    def on_batch_outputs(self, step: int, batches: list, outputs: dict) -> None:
        if not self.enabled:
            return
        if any("index" not in b for b in batches):
            if not self.warned:
                log.warning("per-example losses: this data's batches carry no example index: "
                            "nothing is recorded")
                self.warned = True
            return
        epoch = _epoch_of(step, self.steps_per_epoch)
        self._queue.put(("rows", step, epoch, [b["index"] for b in batches], outputs))

    def on_step(self, step: int, logs: dict[str, float]) -> None:
        if self.enabled and self.steps_per_epoch and step % self.steps_per_epoch == 0:
            self._queue.put(("write", step // self.steps_per_epoch))

    def on_train_end(self) -> None:
        if self._thread is None:
            return
        self._queue.put(("write", None))  # what is left: an epoch cut short by max_steps
        self._queue.put(None)
        self._thread.join()
        self._thread = None
        self._raise_if_failed()

    # --- checkpoint state -----------------------------------------------------------------

    def state_dict(self) -> dict:
        self._queue.join()  # a checkpoint covers every step before it
        self._raise_if_failed()
        return {"rows": {c: list(v) for c, v in self.rows.items()}, "written": list(self.written)}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.rows = {c: list(state["rows"].get(c, [])) for c in KEYS}
            self.rows.update({c: list(v) for c, v in state["rows"].items() if c not in KEYS})
            self.written = list(state.get("written", []))

    # --- the background thread --------------------------------------------------------

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if self._error is None:
                    self._handle(item)
            except BaseException as e:  # reported on the training thread, never lost
                self._error = e
            finally:
                self._queue.task_done()

    def _handle(self, item: tuple) -> None:
        if item[0] == "rows":
            _, step, epoch, indexes, outputs = item
            index = np.concatenate([np.array(i) for i in indexes]).astype(np.int64)
            # Streamed text: a row is a packed window, its id the document its first scored
            # token is from; -1 marks a padding row (it scores nothing) and is left out.
            real = index >= 0
            index = index[real]
            ids = self.ids[index] if self.ids is not None else index
            before = len(self.rows["example_id"])
            self.rows["example_id"].extend(int(i) for i in ids)
            self.rows["epoch"].extend([epoch] * len(ids))
            self.rows["step"].extend([step] * len(ids))
            for key, values in outputs.items():  # example_<column>: the objective's columns
                column = self.rows.setdefault(key.removeprefix(EXAMPLE_PREFIX), [None] * before)
                column.extend(np.array(values)[real].tolist())
            for column in self.rows.values():  # one these outputs lack: empty on these rows
                column.extend([None] * (before + len(ids) - len(column)))
        else:
            epochs = sorted(set(self.rows["epoch"])) if item[1] is None else [item[1]]
            for epoch in epochs:
                self._write_epoch(epoch)

    def _write_epoch(self, epoch: int) -> None:
        import pandas as pd

        keep = [i for i, e in enumerate(self.rows["epoch"]) if e == epoch]
        if not keep:
            return
        frame = pd.DataFrame({c: [values[i] for i in keep] for c, values in self.rows.items()})
        frame = frame.astype({"example_id": "int64", "epoch": "int32", "step": "int64"})
        for column in [c for c in frame.columns if c not in KEYS]:
            if frame[column].isna().all():  # a column no row of this epoch has
                frame = frame.drop(columns=column)
            else:
                frame[column] = frame[column].astype("float32")
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"epoch_{epoch:04d}.parquet"
        frame.to_parquet(path, index=False)
        gone = set(keep)
        self.rows = {c: [v for i, v in enumerate(vals) if i not in gone] for c, vals in self.rows.items()}
        self.written.append(epoch)
        if self.log_artifacts and self.tracker is not None:
            self.tracker.log_artifact(str(path), self.folder)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"per-example loss recording failed: {self._error}") from self._error


def _epoch_of(step: int, steps_per_epoch: int | None) -> int:
    # Data of unknown length (no epochs): everything is "epoch 1", written at the end.
    return (step - 1) // steps_per_epoch + 1 if steps_per_epoch else 1


# --- reading: `mlxlab runs hardest` ------------------------------------------------------


def read_losses(files: Iterable[str | Path]) -> Any:
    """The rows of per-epoch parquet files as one DataFrame, by epoch and step."""
    import pandas as pd

    frames = [pd.read_parquet(f) for f in sorted(map(str, files))]
    if not frames:
        raise FileNotFoundError("no per_example/epoch_*.parquet files")
    frame = pd.concat(frames, ignore_index=True)
    return frame.sort_values(["epoch", "step"], kind="stable").reset_index(drop=True)


def hardest(frame: Any, n: int = 20, epoch: int | None = None) -> Any:
    """The `n` examples with the highest loss in `epoch` (default: the last one recorded), with
    their mean loss over all epochs and the mean of each other column their objective wrote."""
    last = int(frame["epoch"].max()) if epoch is None else int(epoch)
    at = frame[frame["epoch"] == last]
    if at.empty:
        raise ValueError(f"no rows for epoch {last}: epochs recorded are "
                         f"{sorted(frame['epoch'].unique().tolist())}")
    columns = {c: (c, "mean") for c in at.columns if c not in KEYS}
    table = at.groupby("example_id").agg(**columns)
    table["mean_loss_all_epochs"] = frame.groupby("example_id")["loss"].mean()
    table["epoch"] = last
    return table.sort_values("loss", ascending=False, kind="stable").head(n)
