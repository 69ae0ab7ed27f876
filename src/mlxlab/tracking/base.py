"""The Tracker interface the trainer talks to, a do-nothing tracker, and config flattening."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from mlxlab.tracking.tags import CHOICE_PREFIX as CHOICE_TAG_PREFIX  # noqa: F401 (re-exported)

# MLflow refuses longer param values (6000 chars in MLflow 3).
MAX_PARAM_VALUE_LENGTH = 6000


@runtime_checkable
class Tracker(Protocol):
    """What the trainer talks to (`tracking=mlflow|csv|none`). A custom tracker subclasses
    BaseTracker (no-op defaults for what it does not need) or defines all of these."""

    run_id: str | None

    def start(self, params: dict, tags: dict, run_id: str | None = None) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def flush(self) -> None:
        """Everything logged so far reaches the store; called before each checkpoint is
        written, so a checkpoint never covers steps the store lacks."""
        ...

    def flush_barrier(self) -> Callable[[], None]:
        """flush() without holding up the caller: returns a wait that returns once everything
        logged before the call reached the store (the checkpoint writer calls it before it
        commits, off the training thread)."""
        ...

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None: ...

    def log_dict(self, data: dict, artifact_file: str) -> None: ...

    def log_text(self, text: str, artifact_file: str) -> None:
        """A text file in the run's artifacts (analysis' generated samples)."""
        ...

    def log_figure(self, figure: Any, name: str) -> None: ...

    def set_tags(self, tags: dict) -> None: ...

    def end(self, status: str = "FINISHED") -> None: ...

    def probe(self) -> None:
        """Raise (one clear line) when the store named by the settings does not answer."""
        ...

    def set_dataset(self, name: str, source: str, digest: str, rows: int | None) -> None: ...

    def continue_from(self, source_run_dir: str | Path, step: int) -> None:
        """Before start() of a resumed run: the killed run's folder and its checkpoint's step."""
        ...

    def rewind(self, step: int) -> None:
        """After start() resumed run_id: drop what was logged after `step` (it is logged again)."""
        ...

    def summary(self) -> list[str]:
        """Lines for the end of a run: where its records are."""
        ...


def _flushed() -> None:
    pass


class BaseTracker:
    """The Tracker protocol with no effects: trackers subclass it and override what they do."""

    run_id: str | None = None

    def start(self, params: dict, tags: dict, run_id: str | None = None) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def flush(self) -> None:
        pass

    def flush_barrier(self) -> Callable[[], None]:
        """A tracker that writes in the caller's thread flushes now; nothing is left to wait."""
        self.flush()
        return _flushed

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        pass

    def log_dict(self, data: dict, artifact_file: str) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def log_figure(self, figure: Any, name: str) -> None:
        pass

    def set_tags(self, tags: dict) -> None:
        pass

    def end(self, status: str = "FINISHED") -> None:
        pass

    def probe(self) -> None:
        pass

    def set_dataset(self, name: str, source: str, digest: str, rows: int | None) -> None:
        pass

    def continue_from(self, source_run_dir: str | Path, step: int) -> None:
        pass

    def rewind(self, step: int) -> None:
        pass

    def summary(self) -> list[str]:
        return []


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
