"""Writing a checkpoint so that a crash or a full disk never leaves a half one under its name.

Files go into a temporary sibling directory, fsynced; checksums.json, then the COMMITTED marker
last; then the directory is renamed into place (`swap_into_place`). A committed name therefore
always points at a complete checkpoint, and files are never changed after the rename, which is
what lets best/ and uploads share them through hard links (`link_files`).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

from mlxlab.checkpoint.layout import (
    CHECKSUMS_FILE,
    MARKER,
    MODEL_FILE,
    OLD_PREFIX,
    OPTIMIZER_FILE,
    STATE_FILE,
    TMP_PREFIX,
    step_name,
)
from mlxlab.checkpoint.state import StateLike, state_base, state_payload, state_step
from mlxlab.errors import DISK_FULL, DiskFull
from mlxlab.runtime.files.checksum import file_sha256


def fsync_path(path: Path) -> None:
    """Flush a file, or a directory's entries (a rename or a new file in it), to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _safetensors_size(path: Path) -> int:
    """The size a safetensors file must have, from its own header."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return -1
        (header_len,) = struct.unpack("<Q", head)
        header = json.loads(f.read(header_len))
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    return 8 + header_len + max(ends, default=0)


def _write_safetensors(path: Path, arrays: dict[str, mx.array]) -> None:
    """mx.save_safetensors, then fsync and a size check.

    The C++ writer does not report failed writes (writing to /dev/full "succeeds"), so a full
    disk is caught by comparing the file size with the size its header promises.
    """
    try:
        mx.save_safetensors(str(path), arrays, metadata={"format": "mlx"})
        fsync_path(path)
        expected = _safetensors_size(path)
    except OSError:
        raise
    except Exception as e:  # mlx raises RuntimeError for I/O failures, without their errno
        needed = sum(a.nbytes for a in arrays.values())
        code = errno.ENOSPC if shutil.disk_usage(path.parent).free < needed else errno.EIO
        raise OSError(code, f"writing {path.name} failed: {e}") from e
    actual = path.stat().st_size
    if actual != expected:
        raise OSError(
            errno.ENOSPC, f"{path.name} is {actual} bytes, expected {expected} (disk full?)"
        )


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (np.ndarray, mx.array)):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON-serializable")


def _write_text(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _write_json(path: Path, obj: Any) -> None:
    _write_text(path, json.dumps(obj, indent=1, default=_json_default))


def _commit(tmp: Path) -> None:
    """checksums.json, then the COMMITTED marker last, each fsynced with the directory."""
    files = sorted(p.name for p in tmp.iterdir() if p.name not in (CHECKSUMS_FILE, MARKER))
    sums = {
        name: {"sha256": file_sha256(tmp / name), "bytes": (tmp / name).stat().st_size}
        for name in files
    }
    _write_json(tmp / CHECKSUMS_FILE, sums)
    fsync_path(tmp)
    write_marker(tmp)


def write_marker(tmp: Path, **info: Any) -> None:
    """The COMMITTED marker (what makes a directory a checkpoint), fsynced with the directory."""
    _write_json(tmp / MARKER, {"time": time.time(), **info})
    fsync_path(tmp)


def temp_dir(directory: Path, name: str) -> Path:
    """A fresh `.tmp-` sibling to build `name` in (a killed run's are removed at the next start)."""
    return directory / f"{TMP_PREFIX}{name}-{uuid.uuid4().hex[:8]}"


def swap_into_place(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`; an existing `final` is renamed away first and deleted after.

    A process killed between the two renames leaves `.old-NAME-xxxxxxxx`, which
    CheckpointManager puts back at its next start.
    """
    old = None
    if final.exists():
        old = final.with_name(f"{OLD_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}")
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_path(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def link_files(source: Path, dest: Path, skip: tuple[str, ...] = ()) -> None:
    """Hard-link (else copy) the files of `source` into `dest`: checkpoint files are never
    modified in place, so a link is a copy that costs nothing."""
    for f in source.iterdir():
        if f.name in skip:
            continue
        try:
            os.link(f, dest / f.name)
        except OSError:
            shutil.copy2(f, dest / f.name)


def flat_arrays(tree: Any) -> dict[str, mx.array]:
    # optimizer state may hold python scalars; safetensors holds arrays only
    return {k: v if isinstance(v, mx.array) else mx.array(v) for k, v in tree_flatten(tree)}


@dataclass
class Snapshot:
    """A checkpoint held in memory: evaluated arrays and the state text, taken on the training
    thread and written by `write_snapshot` from any thread (MLX arrays are immutable, so later
    steps never change what a snapshot holds)."""

    step: int
    model: dict[str, mx.array]
    optimizer: dict[str, mx.array] | None
    state_text: str
    metric: float | None = None
    best: bool | None = None  # becomes best/ (None: the manager compares `metric`)
    # arrays written to files already (a sharded run's, streamed: checkpoint/streamed.py):
    # {file name: path}, moved into the checkpoint in place of `model`'s and `optimizer`'s
    files: dict[str, Path] = field(default_factory=dict)

    def update_state(self, **fields: Any) -> None:
        """Set state fields known only after the snapshot was taken (the tracker's run id)."""
        state = json.loads(self.state_text)
        state.update(fields)
        self.state_text = json.dumps(state, indent=1, default=_json_default)


def take_snapshot(
    model: nn.Module, optimizer: optim.Optimizer | None, state: StateLike
) -> Snapshot:
    """Everything a checkpoint needs, evaluated; ValueError for a bad state before any write.
    A state that records a base (CheckpointState.base) keeps only the trainable parameters:
    the frozen ones are the base's, rebuilt from its source."""
    step = state_step(state)
    if not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"checkpoint state needs a non-negative int 'step', got {step!r}")
    try:  # fail before writing
        state_text = json.dumps(state_payload(state), indent=1, default=_json_default)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"checkpoint state is not JSON-serializable ({e}); pass plain "
            "numbers, strings, lists and dicts (never objects)"
        ) from e
    params = model.trainable_parameters() if state_base(state) else model.parameters()
    model_arrays = dict(tree_flatten(params))
    opt_arrays = flat_arrays(optimizer.state) if optimizer is not None else None
    mx.eval(model_arrays, opt_arrays or {})
    return Snapshot(int(step), model_arrays, opt_arrays, state_text)


def save_checkpoint(
    directory: Path, model: nn.Module, optimizer: optim.Optimizer | None, state: StateLike
) -> Path:
    """Write `directory/step_{step:08d}` atomically and return its path.

    `state` is a CheckpointState (the trainer's) or a plain JSON-able dict with an int "step"
    (written verbatim). On an OSError (full disk, permissions) the temporary directory is
    removed and the error is re-raised with the checkpoint named; committed checkpoints are
    never touched.
    """
    return write_snapshot(directory, take_snapshot(model, optimizer, state))


def disk_full(directory: Path, final: Path, snap: Snapshot) -> DiskFull:
    """One line for a checkpoint that found the disk full: the folder, the space it needs, what
    is free, and what to do (the run resumes from its newest committed checkpoint)."""
    needed = sum(a.nbytes for part in (snap.model, snap.optimizer or {}) for a in part.values())
    free = shutil.disk_usage(directory).free
    committed = sorted(p.name for p in directory.glob("step_*") if (p / MARKER).is_file())
    after = (f"then resume={directory.parent} (a sweep's job: the same sweep command) continues "
             f"from {committed[-1]}" if committed else "then run it again (nothing was "
             "committed yet)")
    return DiskFull(
        errno.ENOSPC,
        f"{DISK_FULL} checkpoint {final} needs {needed / 2**20:.1f} MB, {free / 2**20:.1f} MB "
        f"free in {directory}; the checkpoints committed before it are intact: free space there "
        f"(or set paths.output_dir to a larger disk), {after}")


def write_snapshot(directory: Path, snap: Snapshot, name: str | None = None) -> Path:
    """The disk half of `save_checkpoint`: temp dir, files, checksums, marker, rename; into
    directory/step_<step>, or directory/<name> (replaced whole)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / (name or step_name(snap.step))
    tmp = temp_dir(directory, final.name)
    try:
        tmp.mkdir()
        for name, path in snap.files.items():
            os.replace(path, tmp / name)
        for folder in {path.parent for path in snap.files.values()}:  # where they were written
            shutil.rmtree(folder, ignore_errors=True)
        if MODEL_FILE not in snap.files:
            _write_safetensors(tmp / MODEL_FILE, snap.model)
        if snap.optimizer is not None and OPTIMIZER_FILE not in snap.files:
            _write_safetensors(tmp / OPTIMIZER_FILE, snap.optimizer)
        _write_text(tmp / STATE_FILE, snap.state_text)
        _commit(tmp)
        swap_into_place(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno == errno.ENOSPC:
            raise disk_full(directory, final, snap) from None
        msg = (
            f"could not write checkpoint {final} ({e.strerror or e}); it was discarded and "
            "earlier checkpoints are intact: free disk space or check permissions"
        )
        raise (OSError(e.errno, msg) if e.errno else OSError(msg)) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
