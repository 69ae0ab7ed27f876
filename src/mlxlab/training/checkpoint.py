"""Checkpoints that survive crashes, full disks and architecture changes.

A checkpoint is a directory `checkpoints/step_00000123/` holding model.safetensors,
optimizer.safetensors, state.json, checksums.json and a COMMITTED marker. It is written into a
temporary sibling directory, the marker goes in last, and the directory is renamed into place,
so a committed name always points at a complete checkpoint. Files are never changed after the
rename: `best/` shares them through hard links.

Loading is by parameter name: a model whose architecture changed since the checkpoint (more
layers, a bigger vocabulary, LoRA added or removed) takes what fits and `LoadReport` says what
was loaded, re-initialized and dropped.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import struct
import time
import uuid
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from mlxlab.errors import UserError
from mlxlab.training.metrics import is_better

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
CHECKSUMS_FILE = "checksums.json"
MARKER = "COMMITTED"
BEST = "best"
STEP_PREFIX = "step_"
TMP_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, incomplete or corrupt."""


class CheckpointWarning(UserWarning):
    """A corrupt checkpoint was skipped in favour of an older one."""


# ---------------------------------------------------------------------------- RNG


def rng_state() -> list[int]:
    """The global MLX PRNG key as two plain ints (JSON-able)."""
    return [int(x) for x in mx.random.state[0].tolist()]


def set_rng_state(key: list[int]) -> None:
    """Restore a key from `rng_state()`.

    `mx.random.state` cannot be assigned to, but `mx.random.seed(s)` sets the key to
    `[s >> 32, s & 0xFFFFFFFF]`, which restores any key exactly (checked below).
    """
    if len(key) != 2:
        raise ValueError(f"RNG state must be two uint32 ints from rng_state(), got {key!r}")
    hi, lo = (int(x) for x in key)
    mx.random.seed((hi << 32) | lo)
    if rng_state() != [hi, lo]:
        raise RuntimeError(f"could not restore MLX RNG key {key}: mx.random.seed changed meaning")


# ---------------------------------------------------------------------------- writing


def _fsync_path(path: Path) -> None:
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
        _fsync_path(path)
        expected = _safetensors_size(path)
    except OSError:
        raise
    except Exception as e:  # mlx raises RuntimeError for I/O failures
        raise OSError(errno.EIO, f"writing {path.name} failed: {e}") from e
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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _commit(tmp: Path) -> None:
    """checksums.json, then the COMMITTED marker last, each fsynced with the directory."""
    files = sorted(p.name for p in tmp.iterdir() if p.name not in (CHECKSUMS_FILE, MARKER))
    sums = {
        name: {"sha256": _sha256(tmp / name), "bytes": (tmp / name).stat().st_size}
        for name in files
    }
    _write_json(tmp / CHECKSUMS_FILE, sums)
    _fsync_path(tmp)
    _write_json(tmp / MARKER, {"time": time.time()})
    _fsync_path(tmp)


def _swap_into_place(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`; an existing `final` is renamed away first and deleted after."""
    old = None
    if final.exists():
        old = final.with_name(f"{OLD_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}")
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_path(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _flat_arrays(tree: Any) -> dict[str, mx.array]:
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


def take_snapshot(model: nn.Module, optimizer: optim.Optimizer | None, state: dict) -> Snapshot:
    """Everything a checkpoint needs, evaluated; ValueError for a bad state before any write."""
    step = state.get("step")
    if not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"checkpoint state needs a non-negative int 'step', got {step!r}")
    try:
        state_text = json.dumps(state, indent=1, default=_json_default)  # fail before writing
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"checkpoint state is not JSON-serializable ({e}); pass plain "
            "numbers, strings, lists and dicts (never objects)"
        ) from e
    model_arrays = dict(tree_flatten(model.parameters()))
    opt_arrays = _flat_arrays(optimizer.state) if optimizer is not None else None
    mx.eval(model_arrays, opt_arrays or {})
    return Snapshot(int(step), model_arrays, opt_arrays, state_text)


def save_checkpoint(
    directory: Path, model: nn.Module, optimizer: optim.Optimizer | None, state: dict
) -> Path:
    """Write `directory/step_{state['step']:08d}` atomically and return its path.

    On an OSError (full disk, permissions) the temporary directory is removed and the error is
    re-raised with the checkpoint named; committed checkpoints are never touched.
    """
    return write_snapshot(directory, take_snapshot(model, optimizer, state))


def write_snapshot(directory: Path, snap: Snapshot) -> Path:
    """The disk half of `save_checkpoint`: temp dir, files, checksums, marker, rename."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"{STEP_PREFIX}{snap.step:08d}"
    tmp = directory / f"{TMP_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        _write_safetensors(tmp / MODEL_FILE, snap.model)
        if snap.optimizer is not None:
            _write_safetensors(tmp / OPTIMIZER_FILE, snap.optimizer)
        _write_text(tmp / STATE_FILE, snap.state_text)
        _commit(tmp)
        _swap_into_place(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        msg = (
            f"could not write checkpoint {final} ({e.strerror or e}); it was discarded and "
            "earlier checkpoints are intact: free disk space or check permissions"
        )
        raise (OSError(e.errno, msg) if e.errno else OSError(msg)) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


# ---------------------------------------------------------------------------- verifying


def check_committed(path: Path, full: bool = True) -> str | None:
    """None when `path` is a complete checkpoint, else the reason it is not.

    `full=False` checks the marker, checksums.json and file sizes only (cheap, for listing);
    `full=True` also re-hashes every file.
    """
    path = Path(path)
    if not path.is_dir():
        return "not a directory"
    if not (path / MARKER).exists():
        return f"no {MARKER} marker (the save never finished)"
    try:
        sums = json.loads((path / CHECKSUMS_FILE).read_text())
    except (OSError, ValueError) as e:
        return f"{CHECKSUMS_FILE} unreadable ({e})"
    if not isinstance(sums, dict) or not all(
        isinstance(v, dict) and {"sha256", "bytes"} <= v.keys() for v in sums.values()
    ):
        return f"{CHECKSUMS_FILE} malformed"
    for name in (MODEL_FILE, STATE_FILE):
        if name not in sums:
            return f"{name} missing from {CHECKSUMS_FILE}"
    for name, expect in sums.items():
        file = path / name
        if not file.exists():
            return f"{name} is missing"
        size = file.stat().st_size
        if size != expect["bytes"]:
            return f"{name} is {size} bytes, expected {expect['bytes']} (truncated?)"
        if full and _sha256(file) != expect["sha256"]:
            return f"{name} checksum mismatch (file modified or corrupted)"
    return None


def _step_of(path: Path) -> int:
    try:
        return int(path.name[len(STEP_PREFIX) :])
    except ValueError:
        return -1


def _step_dirs(directory: Path) -> list[Path]:
    """step_* directories, newest first, committed or not."""
    if not directory.is_dir():
        return []
    dirs = [p for p in directory.iterdir() if p.name.startswith(STEP_PREFIX) and _step_of(p) >= 0]
    return sorted(dirs, key=_step_of, reverse=True)


# ---------------------------------------------------------------------------- loading


@dataclass
class LoadReport:
    """What `load_checkpoint` did with each parameter and optimizer entry."""

    path: Path
    loaded: list[str] = field(default_factory=list)
    renamed: dict[str, str] = field(default_factory=dict)  # model name -> checkpoint name
    reinitialized: dict[str, str] = field(default_factory=dict)  # model name -> why
    dropped: list[str] = field(default_factory=list)  # in the checkpoint, not in the model
    optimizer_by_name: list[str] = field(default_factory=list)
    optimizer_by_shape: dict[str, str] = field(default_factory=dict)  # model -> ckpt name
    optimizer_fresh: list[str] = field(default_factory=list)
    optimizer_scalars: list[str] = field(default_factory=list)  # step, learning_rate, ...
    notes: list[str] = field(default_factory=list)

    @property
    def exact(self) -> bool:
        """Every parameter and its optimizer state came back under the same name."""
        return not (
            self.renamed
            or self.reinitialized
            or self.dropped
            or self.optimizer_by_shape
            or self.optimizer_fresh
            or self.notes
        )

    def summary(self) -> str:
        def names(xs: Iterable[str]) -> str:
            xs = list(xs)
            return ", ".join(xs[:8]) + (f", ... (+{len(xs) - 8})" if len(xs) > 8 else "")

        lines = [f"loaded {self.path}: {len(self.loaded)} tensors by name"]
        if self.renamed:
            lines.append(
                f"  mapped ({len(self.renamed)}): "
                + names(f"{c} -> {m}" for m, c in self.renamed.items())
            )
        if self.reinitialized:
            lines.append(
                f"  re-initialized ({len(self.reinitialized)}): "
                + names(f"{m} ({why})" for m, why in self.reinitialized.items())
            )
        if self.dropped:
            lines.append(f"  dropped ({len(self.dropped)}): {names(self.dropped)}")
        if self.optimizer_by_name or self.optimizer_by_shape or self.optimizer_fresh:
            lines.append(
                f"  optimizer state: {len(self.optimizer_by_name)} by name, "
                f"{len(self.optimizer_by_shape)} by shape, "
                f"{len(self.optimizer_fresh)} fresh; restored "
                f"{names(self.optimizer_scalars) or 'no scalars'}"
            )
        if self.optimizer_by_shape:
            lines.append(
                "  optimizer by shape: "
                + names(f"{c} -> {m}" for m, c in self.optimizer_by_shape.items())
            )
        if self.optimizer_fresh:
            lines.append(f"  optimizer fresh: {names(self.optimizer_fresh)}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _source_name(name: str, ckpt: dict[str, mx.array]) -> str | None:
    """Checkpoint name for model parameter `name`: itself, or the LoRA-wrapped/unwrapped twin.

    LoRA wraps a base layer as `.linear`: plain `a.query.weight` <-> LoRA `a.query.linear.weight`.
    """
    if name in ckpt:
        return name
    parts = name.split(".")
    if len(parts) >= 2 and parts[-2] == "linear":
        unwrapped = ".".join(parts[:-2] + parts[-1:])
        if unwrapped in ckpt:
            return unwrapped
    wrapped = ".".join(parts[:-1] + ["linear", parts[-1]])
    if wrapped in ckpt:
        return wrapped
    return None


def _group_by_param(flat: dict[str, mx.array]):
    """Split flattened optimizer state into {param: {slot: array}} and top-level scalars.

    MLX optimizers keep per-parameter slots (`m`, `v`, ...) one level below the parameter's
    own path, and scalars (`step`, `learning_rate`, scheduled values) at the top.
    """
    per_param: dict[str, dict[str, mx.array]] = {}
    scalars: dict[str, mx.array] = {}
    for key, value in flat.items():
        param, dot, slot = key.rpartition(".")
        if dot:
            per_param.setdefault(param, {})[slot] = value
        else:
            scalars[key] = value
    return per_param, scalars


def _set_path(tree: Any, key: str, value: mx.array) -> None:
    parts = key.split(".")
    for p in parts[:-1]:
        tree = tree[int(p)] if isinstance(tree, (list, tuple)) else tree[p]
    last = parts[-1]
    if isinstance(tree, list):
        tree[int(last)] = value
    else:
        tree[last] = value


def _natural_key(name: str) -> list:
    # layers.2 before layers.10, as in the model's own order
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split(".")]


def _signature(slots: dict[str, mx.array]) -> tuple:
    return tuple(sorted((k, tuple(v.shape), v.dtype) for k, v in slots.items()))


def _load_safetensors(path: Path) -> dict[str, mx.array]:
    try:
        return mx.load(str(path))
    except Exception as e:
        raise CheckpointError(
            f"cannot read {path} ({e}): the file is corrupt or not a "
            "safetensors file; resume from an older checkpoint"
        ) from e


def _restore_optimizer(
    optimizer: optim.Optimizer,
    model: nn.Module,
    ckpt_opt: dict,
    loaded_from: dict[str, str],
    report: LoadReport,
) -> None:
    """Fill the optimizer's state in place (compiled steps hold a reference to it)."""
    optimizer.init(model.trainable_parameters())
    fresh, _ = _group_by_param(_flat_arrays(optimizer.state))
    saved, scalars = _group_by_param(ckpt_opt)

    updates: dict[str, mx.array] = {}
    missing: list[str] = []
    params = dict(tree_flatten(model.trainable_parameters()))
    for name, slots in fresh.items():
        if name not in loaded_from:  # re-initialized weights get fresh moments
            report.optimizer_fresh.append(name)
            continue
        src = saved.get(loaded_from[name])
        if src is not None and _signature(src) == _signature(slots):
            updates.update({f"{name}.{k}": v for k, v in src.items()})
            report.optimizer_by_name.append(name)
            saved.pop(loaded_from[name])
        else:
            missing.append(name)
    # Failing the name, pair leftovers by shape in layer order (e.g. a wrapper module changed
    # the optimizer's key prefix while the weights kept their names).
    leftovers = sorted(saved, key=_natural_key)
    for name in sorted(missing, key=_natural_key):
        sig = _signature(fresh[name])
        match = next((c for c in leftovers if c in saved and _signature(saved[c]) == sig), None)
        if match is None:
            report.optimizer_fresh.append(name)
            continue
        updates.update({f"{name}.{k}": v for k, v in saved.pop(match).items()})
        report.optimizer_by_shape[name] = match
    for name in report.optimizer_fresh:  # init() keeps old state; fresh means fresh
        slots: dict = {}
        optimizer.init_single(params[name], slots)
        updates.update({f"{name}.{k}": v for k, v in slots.items()})
    for key, value in scalars.items():
        if key in optimizer.state:
            updates[key] = value
            report.optimizer_scalars.append(key)
    for key, value in updates.items():
        _set_path(optimizer.state, key, value)


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: optim.Optimizer | None = None, strict: bool = False
) -> tuple[dict, LoadReport]:
    """Load weights by name (and optimizer state) from checkpoint directory `path`.

    Returns the trainer state from state.json and a LoadReport. With `strict=True` any
    re-initialized or dropped parameter is an error. Nothing is modified unless every file
    verifies and loads.
    """
    path = Path(path)
    if path.is_file():
        raise CheckpointError(
            f"{path} is a file: pass the checkpoint directory (e.g. {path.parent}) instead"
        )
    if not path.exists():
        raise FileNotFoundError(
            f"checkpoint {path} does not exist: pass a step_XXXXXXXX "
            "directory, or the run directory to resume its newest one"
        )
    problem = check_committed(path)
    if problem is not None:
        raise CheckpointError(
            f"checkpoint {path} is unusable: {problem}; resume from an older "
            "checkpoint (pass the run directory to pick one automatically)"
        )
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except ValueError as e:
        raise CheckpointError(
            f"{path / STATE_FILE} is not valid JSON ({e}); resume from an older checkpoint"
        ) from e
    ckpt = _load_safetensors(path / MODEL_FILE)
    has_opt = (path / OPTIMIZER_FILE).exists()
    ckpt_opt = _load_safetensors(path / OPTIMIZER_FILE) if optimizer is not None and has_opt else {}

    report = LoadReport(path=path)
    current = dict(tree_flatten(model.parameters()))
    new_weights: list[tuple[str, mx.array]] = []
    loaded_from: dict[str, str] = {}
    matched: set[str] = set()  # checkpoint names with a model counterpart, loaded or not
    for name, param in current.items():
        src = _source_name(name, ckpt)
        matched.add(src)
        if src is None:
            report.reinitialized[name] = "not in checkpoint"
        elif ckpt[src].shape != param.shape:
            report.reinitialized[name] = f"shape {tuple(ckpt[src].shape)} -> {tuple(param.shape)}"
        else:
            new_weights.append((name, ckpt[src].astype(param.dtype)))
            loaded_from[name] = src
            report.loaded.append(name)
            if src != name:
                report.renamed[name] = src
    report.dropped = [k for k in ckpt if k not in matched]
    if strict and (report.reinitialized or report.dropped):
        raise CheckpointError(
            f"checkpoint {path} does not match the model (strict=True):\n" + report.summary()
        )

    if new_weights:
        model.update(tree_unflatten(new_weights))
    if optimizer is not None:
        if has_opt:
            _restore_optimizer(optimizer, model, ckpt_opt, loaded_from, report)
        else:
            report.notes.append(f"no {OPTIMIZER_FILE}: optimizer starts fresh")
    mx.eval(model.parameters(), optimizer.state if optimizer is not None else [])
    return state, report


def load_first_usable(
    candidates: Iterable[Path], model: nn.Module, optimizer: optim.Optimizer | None = None
) -> tuple[dict, LoadReport, Path]:
    """Load the first candidate that verifies; warn about each one skipped and why."""
    tried: list[str] = []
    for path in candidates:
        try:
            state, report = load_checkpoint(path, model, optimizer)
        except CheckpointError as e:
            reason = str(e)
            tried.append(f"{path}: {reason}")
            warnings.warn(
                f"skipping checkpoint {path}: {reason}; trying the next older one",
                CheckpointWarning,
                stacklevel=2,
            )
            continue
        return state, report, path
    if not tried:
        raise FileNotFoundError("no checkpoints to resume from")
    raise CheckpointError(
        "no usable checkpoint; tried:\n  "
        + "\n  ".join(tried)
        + "\nstart without resume, or point resume= at another run"
    )


class Checkpoints(list):
    """Checkpoint directories to resume from, in the order to try them."""

    last_report: LoadReport | None = None

    def load_latest(
        self, model: nn.Module, optimizer: optim.Optimizer | None = None
    ) -> tuple[dict, Path]:
        """Load the first usable one, warning about each skipped; report in `last_report`."""
        state, self.last_report, path = load_first_usable(self, model, optimizer)
        return state, path


def find_run_checkpoints(path: Path) -> Checkpoints:
    """Checkpoint directories for `resume=<path>`, newest first, then `best/`.

    `path` may be a run directory (holding checkpoints/), a checkpoints directory, or one
    checkpoint directory. Uncommitted ones are included so loading can say why it skipped them.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"resume path {path} does not exist: pass a run directory, its "
            "checkpoints/ directory, or one step_XXXXXXXX directory"
        )
    if (path / MODEL_FILE).exists() or (path / MARKER).exists():
        return Checkpoints([path])
    directory = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    found = _step_dirs(directory)
    if (directory / BEST).is_dir():
        found.append(directory / BEST)
    if not found:
        raise FileNotFoundError(
            f"no checkpoints under {path}: pass a run directory, its "
            "checkpoints/ directory, or one step_XXXXXXXX directory"
        )
    return Checkpoints(found)


# ---------------------------------------------------------------------------- manager


class CheckpointManager:
    """When to save, rotation (`keep_last_n` plus `best/`), and resume with fallback."""

    def __init__(
        self,
        directory: Path,
        keep_last_n: int = 3,
        save_every_steps: int | None = None,
        save_every_minutes: float | None = None,
        monitor: str | None = None,
        mode: str = "max",
    ) -> None:
        if keep_last_n < 1:
            raise ValueError(f"keep_last_n must be >= 1, got {keep_last_n}")
        if mode not in ("max", "min"):
            raise ValueError(f"checkpoint mode must be 'max' or 'min', got {mode!r}")
        self.directory = Path(directory)
        self.keep_last_n = keep_last_n
        self.save_every_steps = save_every_steps
        self.save_every_minutes = save_every_minutes
        self.monitor = monitor
        self.mode = mode
        self.last_report: LoadReport | None = None
        self._last_save_time = time.monotonic()
        self._last_save_step: int | None = None
        self._recover()
        self.best_metric = self._read_best_metric()

    def _recover(self) -> None:
        """Undo what a killed process left: temp dirs, and a directory caught mid-swap."""
        if not self.directory.is_dir():
            return
        for p in self.directory.iterdir():
            if p.name.startswith(TMP_PREFIX):
                shutil.rmtree(p, ignore_errors=True)
        for p in self.directory.glob(f"{OLD_PREFIX}*"):
            # `.old-NAME-xxxxxxxx`: the swap was killed between its two renames
            original = self.directory / p.name[len(OLD_PREFIX) :].rsplit("-", 1)[0]
            if original.exists():
                shutil.rmtree(p, ignore_errors=True)
            else:
                os.rename(p, original)

    def _read_best_metric(self) -> float | None:
        best = self.best_path
        if best is None:
            return None
        try:
            return json.loads((best / STATE_FILE).read_text())["checkpoint_metric"]["value"]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def restore_best(self, value: float | None) -> None:
        """Best metric so far from a resumed trainer state, when best/ did not say."""
        if self.best_metric is None and value is not None:
            self.best_metric = float(value)

    @property
    def best_path(self) -> Path | None:
        best = self.directory / BEST
        return best if check_committed(best, full=False) is None else None

    def should_save(self, step: int) -> bool:
        if step == self._last_save_step:
            return False
        if self.save_every_steps and step > 0 and step % self.save_every_steps == 0:
            return True
        elapsed = time.monotonic() - self._last_save_time
        return bool(self.save_every_minutes) and elapsed >= self.save_every_minutes * 60

    def is_better(self, metric: float) -> bool:
        return is_better(metric, self.best_metric, self.mode)

    @property
    def last_saved_step(self) -> int | None:
        return self._last_save_step

    def adopt_best(self, run_checkpoints: Path) -> None:
        """Resuming into a new run folder: start from the earlier run's best/, so the best
        checkpoint survives even if this run never beats it."""
        source = Path(run_checkpoints) / BEST
        if self.best_path is None and source.is_dir() and check_committed(source, full=False) is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._refresh_best(source)
            self.best_metric = self._read_best_metric()

    def save(
        self,
        model: nn.Module,
        optimizer: optim.Optimizer | None,
        state: dict,
        metric: float | None = None,
    ) -> Path:
        """Write a step checkpoint; refresh best/ when `metric` improves; rotate old ones."""
        return self.write(self.snapshot(model, optimizer, state, metric))

    def snapshot(
        self,
        model: nn.Module,
        optimizer: optim.Optimizer | None,
        state: dict,
        metric: float | None = None,
    ) -> Snapshot:
        """The in-memory half of `save` (on the training thread); `write` finishes it."""
        if metric is not None:
            state = {
                **state,
                "checkpoint_metric": {
                    "name": self.monitor,
                    "mode": self.mode,
                    "value": float(metric),
                },
            }
        snap = take_snapshot(model, optimizer, state)
        snap.metric = None if metric is None else float(metric)
        self._last_save_time = time.monotonic()
        self._last_save_step = snap.step
        return snap

    def write(self, snap: Snapshot) -> Path:
        """The disk half of `save`: the checkpoint, best/ and rotation (any one thread)."""
        path = write_snapshot(self.directory, snap)
        if snap.metric is not None and self.is_better(snap.metric):
            self._refresh_best(path)
            self.best_metric = snap.metric
        self._rotate()
        return path

    def _refresh_best(self, source: Path) -> None:
        """best/ = a hard-linked copy of `source`, swapped in atomically."""
        tmp = self.directory / f"{TMP_PREFIX}{BEST}-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir()
            for f in source.iterdir():
                if f.name == MARKER:
                    continue
                try:
                    os.link(f, tmp / f.name)  # checkpoint files are never modified in place
                except OSError:
                    shutil.copy2(f, tmp / f.name)
            _fsync_path(tmp)
            _write_json(tmp / MARKER, {"time": time.time(), "source": source.name})
            _fsync_path(tmp)
            old = self.directory / f"{OLD_PREFIX}{BEST}-{uuid.uuid4().hex[:8]}"
            best = self.directory / BEST
            if best.exists():
                os.rename(best, old)
            os.rename(tmp, best)
            _fsync_path(self.directory)
            shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _rotate(self) -> None:
        """Keep the newest keep_last_n committed step checkpoints; delete everything older."""
        kept = 0
        for p in _step_dirs(self.directory):
            if kept >= self.keep_last_n:
                shutil.rmtree(p, ignore_errors=True)
            elif check_committed(p, full=False) is None:
                kept += 1

    def list_committed(self) -> list[Path]:
        """Committed step checkpoints, newest first (marker and sizes; hashes checked at load)."""
        return [p for p in _step_dirs(self.directory) if check_committed(p, full=False) is None]

    def latest(self) -> Path | None:
        committed = self.list_committed()
        return committed[0] if committed else None

    def load_latest(
        self, model: nn.Module, optimizer: optim.Optimizer | None = None
    ) -> tuple[dict, Path]:
        """Load the newest usable checkpoint, falling back to older ones (then best/) with a
        warning. FileNotFoundError when there are none; CheckpointError when none loads.
        The LoadReport is kept in `self.last_report`."""
        candidates = Checkpoints(_step_dirs(self.directory))
        if (self.directory / BEST).is_dir():
            candidates.append(self.directory / BEST)
        if not candidates:
            raise FileNotFoundError(f"no checkpoints in {self.directory}")
        state, path = candidates.load_latest(model, optimizer)
        self.last_report = candidates.last_report
        return state, path
