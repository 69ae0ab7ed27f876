"""Checkpoints that survive crashes, full disks and architecture changes.

A checkpoint is a directory `checkpoints/step_00000123/` holding model.safetensors,
optimizer.safetensors, state.json, checksums.json and a COMMITTED marker. The package sits
below training/ (it imports only config, errors and MLX), so finished runs (runs/) and the
trainer both use it. One module per job:

- layout: the file and directory names, and the errors;
- state: state.json as the versioned `CheckpointState` dataclass (with the migration of old ones);
- rng: the MLX PRNG key to JSON and back;
- atomic: writing one (temp dir, fsync, checksums, marker last, `swap_into_place`);
- discover: which directories are complete (`check_committed`) and which to try on resume;
- restore: loading by parameter name with the optimizer remapped (`load_checkpoint`, `LoadReport`,
  `Checkpoints.load_latest`);
- manager: when to save, rotation, best/ (`CheckpointManager`);
- remote: the copies in object storage (`RemoteStore`, `RemoteUploader`,
  `fetch_remote_checkpoint`), imported on its own: fsspec is only needed there.
"""

from mlxlab.checkpoint.atomic import (
    Snapshot,
    save_checkpoint,
    swap_into_place,
    take_snapshot,
    write_snapshot,
)
from mlxlab.checkpoint.discover import check_committed, committed_step_dirs, step_dirs
from mlxlab.checkpoint.layout import (
    BEST,
    CHECKPOINTS_DIR,
    CHECKSUMS_FILE,
    MARKER,
    MODEL_FILE,
    OLD_PREFIX,
    OPTIMIZER_FILE,
    QUANTIZED,
    STATE_FILE,
    STEP_PREFIX,
    TMP_PREFIX,
    CheckpointError,
    CheckpointWarning,
    step_name,
    step_of,
)
from mlxlab.checkpoint.manager import CheckpointManager
from mlxlab.checkpoint.restore import (
    Checkpoints,
    LoadReport,
    find_run_checkpoints,
    load_checkpoint,
    load_first_usable,
)
from mlxlab.checkpoint.rng import rng_state, set_rng_state
from mlxlab.checkpoint.state import (
    STATE_VERSION,
    BestChoice,
    CheckpointState,
    MonitoredMetric,
    choose_best,
    is_better,
)

__all__ = [
    "BEST", "QUANTIZED", "CHECKPOINTS_DIR", "CHECKSUMS_FILE", "MARKER", "MODEL_FILE", "OLD_PREFIX",
    "OPTIMIZER_FILE", "STATE_FILE", "STATE_VERSION", "STEP_PREFIX", "TMP_PREFIX",
    "CheckpointError", "CheckpointManager", "CheckpointState", "CheckpointWarning", "Checkpoints",
    "LoadReport", "MonitoredMetric", "Snapshot", "check_committed", "committed_step_dirs",
    "BestChoice", "choose_best", "find_run_checkpoints", "is_better", "load_checkpoint", "load_first_usable", "rng_state",
    "save_checkpoint", "set_rng_state", "step_dirs", "step_name", "step_of", "swap_into_place",
    "take_snapshot", "write_snapshot",
]
