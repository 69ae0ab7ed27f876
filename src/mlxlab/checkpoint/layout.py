"""What a checkpoint directory is called and holds, and where a run folder keeps them: the one
place these names are spelled."""

from __future__ import annotations

from pathlib import Path

from mlxlab.errors import UserError

CHECKPOINTS_DIR = "checkpoints"  # a run folder's checkpoints, one directory each
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
CHECKSUMS_FILE = "checksums.json"
MARKER = "COMMITTED"
BEST = "best"
QUANTIZED = "quantized"  # trainer.quantize_bits: the best weights quantized (not resumable)
STEP_PREFIX = "step_"
TMP_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, incomplete or corrupt."""


class CheckpointWarning(UserWarning):
    """A corrupt checkpoint was skipped in favour of an older one."""


def step_name(step: int) -> str:
    """`step_00000123`: zero-padded so names sort like steps."""
    return f"{STEP_PREFIX}{step:08d}"


def step_of(name: str | Path) -> int:
    """The step of a `step_XXXXXXXX` name (a local path or a remote key), else -1."""
    name = str(name).rstrip("/").rsplit("/", 1)[-1]
    if not name.startswith(STEP_PREFIX):
        return -1
    try:
        return int(name[len(STEP_PREFIX) :])
    except ValueError:
        return -1
