"""Loading a checkpoint by parameter name, with the optimizer state remapped to match.

A model whose architecture changed since the checkpoint (more layers, a bigger vocabulary, LoRA
added or removed) takes what fits and `LoadReport` says what was loaded, re-initialized and
dropped. Nothing is modified unless every file verifies and loads. A checkpoint that holds only
the trained parameters (its state records a `base`) loads onto a model that holds that base: the
caller says how it knows (`verify_base`), else the load is refused. `Checkpoints.load_latest` is
the one resume path: the first candidate that verifies, warning about each one skipped.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten

from mlxlab.checkpoint.atomic import flat_arrays
from mlxlab.checkpoint.discover import check_committed, run_checkpoint_dirs
from mlxlab.checkpoint.layout import (
    MODEL_FILE,
    OPTIMIZER_FILE,
    CheckpointError,
    CheckpointWarning,
)
from mlxlab.checkpoint.state import read_payload
from mlxlab.runtime.memory.io_threads import load_arrays


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
    from_base: list[str] = field(default_factory=list)  # frozen, left out: the base's own

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

        lines = [f"loaded {self.path}: {len(self.loaded)} tensors by name"
                 + (f" ({len(self.from_base)} frozen ones the base's)" if self.from_base else "")]
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


def set_path(tree: Any, key: str, value: mx.array) -> None:
    """`value` at `key` (a name as tree_flatten spells it: dots, list positions as numbers)
    of a tree of dicts and lists, an optimizer's state."""
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
        return load_arrays(path)
    except Exception as e:
        raise CheckpointError(
            f"cannot read {path} ({e}): the file is corrupt or not a "
            "safetensors file; resume from an older checkpoint"
        ) from e


def restore_optimizer(
    optimizer: optim.Optimizer,
    model: nn.Module,
    ckpt_opt: dict,
    loaded_from: dict[str, str],
    report: LoadReport,
) -> None:
    """Fill the optimizer's state in place (compiled steps hold a reference to it) from the saved
    `ckpt_opt`, moved by parameter name (`loaded_from`: model name -> saved name), failing that
    by shape in layer order; what finds no saved value starts fresh. Resume and scheduled model
    operations use it."""
    optimizer.init(model.trainable_parameters())
    fresh, _ = _group_by_param(flat_arrays(optimizer.state))
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
        set_path(optimizer.state, key, value)


# Called with a checkpoint's base record before its weights load: returns when the model holds
# that base, raises a UserError naming what differs otherwise.
BaseCheck = Callable[[dict], None]


def match_weights(current: dict[str, mx.array], ckpt: dict[str, mx.array], frozen: set[str],
                  report: LoadReport) -> tuple[list[tuple[str, mx.array]], dict[str, str]]:
    """Each model parameter (`current`, by name) matched to a checkpoint array by name
    (_source_name: a renamed layer too), pure: the (name, array) pairs to load, in the model's
    dtype, and the checkpoint name each came from; `report` records what was loaded, renamed,
    kept from the base (`frozen` names absent from the checkpoint), re-initialized or dropped."""
    new_weights: list[tuple[str, mx.array]] = []
    loaded_from: dict[str, str] = {}
    matched: set[str] = set()  # checkpoint names with a model counterpart, loaded or not
    for name, param in current.items():
        src = _source_name(name, ckpt)
        matched.add(src)
        if src is None and name in frozen:
            report.from_base.append(name)
        elif src is None:
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
    return new_weights, loaded_from


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: optim.Optimizer | None = None, strict: bool = False,
    verify_base: BaseCheck | None = None,
) -> tuple[dict, LoadReport]:
    """Load weights by name (and optimizer state) from checkpoint directory `path`.

    Returns state.json as written (a dict: `CheckpointState.from_json` types and migrates it)
    and a LoadReport. With `strict=True` any re-initialized or dropped parameter is an error.
    Nothing is modified unless every file verifies and loads. A checkpoint of the trained
    parameters alone (state.json's `base`) needs `verify_base`, which proves the model holds
    that base; its frozen parameters then stay as they are.
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
    state = read_payload(path)
    base = state.get("base")
    if base:
        if verify_base is None:
            raise CheckpointError(
                f"{path} holds only the trained parameters of the base {base.get('pretrained')}: "
                "load it with mlxlab.runs.load_run_model (or any mlxlab verb), which rebuilds "
                "the base from its source and checks it")
        verify_base(base)
    ckpt = _load_safetensors(path / MODEL_FILE)
    has_opt = (path / OPTIMIZER_FILE).exists()
    ckpt_opt = _load_safetensors(path / OPTIMIZER_FILE) if optimizer is not None and has_opt else {}

    report = LoadReport(path=path)
    current = dict(tree_flatten(model.parameters()))
    frozen = set(current) - {k for k, _ in tree_flatten(model.trainable_parameters())} \
        if base else set()
    new_weights, loaded_from = match_weights(current, ckpt, frozen, report)
    if strict and (report.reinitialized or report.dropped):
        raise CheckpointError(
            f"checkpoint {path} does not match the model (strict=True):\n" + report.summary()
        )

    if new_weights:
        model.update(tree_unflatten(new_weights))
    if optimizer is not None:
        if has_opt:
            restore_optimizer(optimizer, model, ckpt_opt, loaded_from, report)
        else:
            report.notes.append(f"no {OPTIMIZER_FILE}: optimizer starts fresh")
    mx.eval(model.parameters(), optimizer.state if optimizer is not None else [])
    return state, report


def load_first_usable(
    candidates: Iterable[Path], model: nn.Module, optimizer: optim.Optimizer | None = None,
    verify_base: BaseCheck | None = None,
) -> tuple[dict, LoadReport, Path]:
    """Load the first candidate that verifies; warn about each one skipped and why (a base that
    differs is no reason to try an older one: its UserError ends the load)."""
    tried: list[str] = []
    for path in candidates:
        try:
            state, report = load_checkpoint(path, model, optimizer, verify_base=verify_base)
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
        self, model: nn.Module, optimizer: optim.Optimizer | None = None,
        verify_base: BaseCheck | None = None,
    ) -> tuple[dict, Path]:
        """Load the first usable one, warning about each skipped; report in `last_report`."""
        state, self.last_report, path = load_first_usable(self, model, optimizer, verify_base)
        return state, path



def find_run_checkpoints(path: Path) -> Checkpoints:
    """Checkpoint directories for `resume=<path>`, newest first, then `best/`.

    `path` may be a run directory (holding checkpoints/), a checkpoints directory, or one
    checkpoint directory. Uncommitted ones are included so loading can say why it skipped them.
    """
    return Checkpoints(run_checkpoint_dirs(path))
