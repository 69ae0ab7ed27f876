"""A frozen encoder's states, computed once per training utterance and read back in later epochs.

When a Whisper run trains only its decoder (`model.lora.modules: [decoder]`, no dropout), the
encoder maps an utterance's features to the same states in every epoch, and on a CPU that
forward pass is most of a step (whisper-base, 8 utterances of 30 s: 1,500 frames through six
layers). So speech_to_text's batches carry `encoder_states` instead of `input_features`: the
states of an utterance the run has not seen yet are computed outside the compiled step, and
kept on disk (a temporary folder, float32 as computed: the cached step is the uncached one's
arithmetic, and the states of 8 utterances read back in milliseconds, without growing the
process's memory as a copy in RAM would); later epochs read them. The folder is removed when
the run ends, and holds at most the disk's free space less a margin (past that, states are
computed each time, said once in the log).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from mlxlab.data.batching import Batch

log = logging.getLogger(__name__)

# free disk space the cache always leaves
MARGIN_BYTES = 2 * 2**30


class EncoderStates:
    """`batch(model, batch)`: the batch with `encoder_states` [B, frames, width] for its rows
    (by the data's `index`) in place of `input_features`."""

    def __init__(self, folder: str | Path | None = None) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="mlxlab-encoder-states-", dir=folder))
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.folder, True)
        self.stored: set[int] = set()
        self.full = False
        self.computed = self.read = 0

    def _path(self, row: int) -> Path:
        return self.folder / f"{row}.npy"

    def _room(self, nbytes: int) -> bool:
        if not self.full and shutil.disk_usage(self.folder).free - nbytes < MARGIN_BYTES:
            self.full = True
            log.info("the encoder-state cache keeps %d utterances: the disk under %s has no "
                     "more room; the others' states are computed at each step", len(self.stored),
                     self.folder)
        return not self.full

    def batch(self, model: Any, batch: Batch) -> Batch:
        rows = [int(i) for i in np.asarray(batch["index"])]
        missing = [k for k, row in enumerate(rows) if row not in self.stored]
        fresh: dict[int, np.ndarray] = {}
        if missing:
            features = batch["input_features"]
            if len(missing) < len(rows):
                features = features[mx.array(missing)]
            states = np.asarray(mx.stop_gradient(model.encode(features)))
            for k, state in zip(missing, states):
                fresh[k] = state
                if self._room(state.nbytes):
                    np.save(self._path(rows[k]), state)
                    self.stored.add(rows[k])
            self.computed += len(missing)
        self.read += len(rows) - len(missing)
        states = np.stack([fresh[k] if k in fresh else np.load(self._path(row))
                           for k, row in enumerate(rows)])
        out = {k: v for k, v in batch.items() if k != "input_features"}
        out["encoder_states"] = mx.array(states)
        return out

    def close(self) -> None:
        self._cleanup()
