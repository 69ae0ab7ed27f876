"""The tracker interface the trainer talks to, written once (BaseTracker), a do-nothing tracker,
and config flattening.

`BaseTracker` is the interface: every method a tracker has, each a no-op with its docstring, so
a tracker subclasses it and overrides what it does (MlflowTracker, CsvTracker, WandbTracker,
FanoutTracker, NullTracker). `Tracker` is the same members as a runtime-checkable Protocol,
derived from BaseTracker, never written out again: `isinstance(obj, Tracker)` (the trainer's
contract check) accepts a tracker that defines them all without subclassing.
"""

from __future__ import annotations

import json
import types
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

# MLflow refuses longer param values (6000 chars in MLflow 3).
MAX_PARAM_VALUE_LENGTH = 6000


def _flushed() -> None:
    pass


class BaseTracker:
    """What the trainer talks to (`tracking=mlflow|csv|wandb|none`), with no effects: trackers
    subclass it and override what they do."""

    run_id: str | None = None  # the run's id once started (a resumed run: the one it continues)

    def start(self, params: dict, tags: dict, run_id: str | None = None) -> None:
        """Start a run with these params and tags; `run_id` given: continue that run (resume)."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Metric values at an optimizer step; may be buffered (flush sends them)."""

    def flush(self) -> None:
        """Everything logged so far reaches the store; called before each checkpoint is
        written, so a checkpoint never covers steps the store lacks."""

    def flush_barrier(self) -> Callable[[], None]:
        """flush() without holding up the caller: returns a wait that returns once everything
        logged before the call reached the store (the checkpoint writer calls it before it
        commits, off the training thread). Here, for a tracker that writes in the caller's
        thread: flush now, nothing is left to wait for."""
        self.flush()
        return _flushed

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        """A file or folder into the run's artifacts (under `artifact_path`)."""

    def log_dict(self, data: dict, artifact_file: str) -> None:
        """A JSON/YAML file in the run's artifacts."""

    def log_text(self, text: str, artifact_file: str) -> None:
        """A text file in the run's artifacts (analysis' generated samples)."""

    def log_figure(self, figure: Any, name: str) -> None:
        """A matplotlib figure in the run's artifacts."""

    def set_tags(self, tags: dict) -> None:
        """Tags on the started run."""

    def end(self, status: str = "FINISHED") -> None:
        """End the run: FINISHED | FAILED | KILLED."""

    def probe(self) -> None:
        """Raise (one clear line) when the store named by the settings does not answer."""

    def set_dataset(self, name: str, source: str, digest: str, rows: int | None) -> None:
        """The training data, logged with the run (before start)."""

    def continue_from(self, source_run_dir: str | Path, step: int) -> None:
        """Before start() of a resumed run: the killed run's folder and its checkpoint's step."""

    def rewind(self, step: int) -> None:
        """After start() resumed run_id: drop what was logged after `step` (it is logged again)."""

    def summary(self) -> list[str]:
        """Lines for the end of a run: where its records are."""
        return []


# The interface's methods, in the order written above (FanoutTracker calls each on every tracker).
METHODS = tuple(name for name, member in vars(BaseTracker).items()
                if callable(member) and not name.startswith("_"))


def _protocol_of(base: type) -> type:
    """`base`'s public members and annotations as a runtime-checkable Protocol of the same
    name, so the interface is written once."""
    members = {name: member for name, member in vars(base).items() if not name.startswith("_")}

    def body(namespace: dict) -> None:
        namespace.update(members, __annotations__=dict(base.__annotations__),
                         __module__=base.__module__,
                         __doc__=f"{base.__name__}'s members, checked structurally.")

    return runtime_checkable(types.new_class("Tracker", (Protocol,), exec_body=body))


Tracker = _protocol_of(BaseTracker)


class NullTracker(BaseTracker):
    """`tracking=none`: touches no store and no disk."""

    def __init__(self, **_ignored: Any) -> None:
        self.run_id: str | None = None

    def start(self, params: dict, tags: dict, run_id: str | None = None) -> None:
        # Nothing is logged, so no run id: a resumed run must not claim the source's MLflow run.
        self.run_id = None

    def summary(self) -> list[str]:
        return ["mlflow run: - (tracking=none)"]


def flatten_config(cfg: Mapping, prefix: str = "") -> dict[str, str]:
    """Nested config -> {"optimizer.learning_rate": "0.0003", ...}, the form MLflow params take.

    Lists of plain values stay one param ("[64, 128]"); lists holding dicts are indexed
    ("callbacks.0.name"). Accepts plain dicts and OmegaConf DictConfigs (resolve them first
    with OmegaConf.to_container(cfg, resolve=True) to log values, not interpolations).
    """
    if not isinstance(cfg, Mapping):
        raise ValueError(f"flatten_config expects a mapping, got {type(cfg).__name__}")
    flat: dict[str, str] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            if len(value) == 0:
                flat[name] = "{}"
            flat.update(flatten_config(value, prefix=f"{name}."))
        elif _is_list(value) and any(isinstance(v, Mapping) or _is_list(v) for v in value):
            flat.update(flatten_config({str(i): v for i, v in enumerate(value)}, f"{name}."))
        elif _is_list(value):
            flat[name] = json.dumps([_plain(v) for v in value])
        else:
            flat[name] = str(value)[:MAX_PARAM_VALUE_LENGTH]
    return flat


def _is_list(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes))


def _plain(value: Any) -> Any:
    return value if isinstance(value, (int, float, bool, str, type(None))) else str(value)
