"""`state.json`: the trainer state a checkpoint carries, as one versioned dataclass.

The trainer writes a `CheckpointState`; the trainer (resume), the checkpoint manager (best
metric), `mlxlab.runs`, export and tracking read one back with `CheckpointState.read(path)`. No
other module spells a state.json key.

Versions: 1 is the unversioned layout, 2 adds `version` and writes every field, 3 is a state
whose config has today's shape (the `checkpoint` group, `trainer.micro_batch` alone sizing the
micro-batch). Every version reads (export, predictions and `mlxlab runs` load old runs); a
resume takes version 3 only (`check_resumable`: one line), and a state from a newer mlxlab is
refused with a clear message rather than half-read. The low-level
`save_checkpoint`/`load_checkpoint` also take and return a plain dict (written verbatim) for
callers that checkpoint something other than a trainer.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from mlxlab.checkpoint.layout import STATE_FILE, CheckpointError

STATE_VERSION = 3
# val_fingerprint of a state written before validation sets were fingerprinted: comparing it
# with today's fingerprint would report a change that nobody made.
UNRECORDED = "unrecorded"


@dataclass
class MonitoredMetric:
    """The value that decided whether this checkpoint became best/."""

    name: str | None
    mode: str
    value: float


def is_better(value: float, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
    """Whether `value` improves on `best` (None = nothing yet); NaN never improves anything."""
    if value is None or math.isnan(value):
        return False
    if best is None or math.isnan(best):
        return True
    return value > best + min_delta if mode == "max" else value < best - min_delta


@dataclass(frozen=True)
class BestChoice:
    """Whether an evaluation's checkpoint becomes best/, and when a tie on the monitor decided
    it, the sentence the log and the run's tag (mlxlab.best_checkpoint) say."""

    better: bool
    tie: str | None = None


def choose_best(metrics: Mapping[str, float], best: Mapping[str, float], monitor: str,
                mode: str, step: int, tie_break: tuple[str, str] | None = None) -> BestChoice:
    """The monitor improves on the best so far; or it equals it (a monitor that saturates: DPO's
    val/rewards/accuracy at 1.0 from the first evaluation on) and the tie-break metric
    (`tie_break`: its name and mode, the objective's loss, Objective.tie_break) is better or
    equal, equal meaning the later step. Ties going to the earliest step made "best" an
    accident of when the monitor saturated."""
    value, previous = metrics.get(monitor, math.nan), best.get(monitor)
    if is_better(value, previous, mode):
        return BestChoice(True)
    if previous is None or not math.isfinite(value) or not math.isclose(
            value, previous, rel_tol=1e-9, abs_tol=1e-12):
        return BestChoice(False)
    head = f"step {step}: {monitor} {value:.6g} ties step {int(best.get('best_step', -1))}"
    name, tie_mode = tie_break or (None, "min")
    new, old = metrics.get(name or ""), best.get(name or "")
    if name is None or monitor == name or new is None or old is None:
        return BestChoice(True, f"{head}; the later is kept (no {name or 'tie-break metric'} "
                                "to break the tie)")
    word = "lower" if tie_mode == "min" else "higher"
    if not is_better(old, new, tie_mode):  # the new one is as good or better: it trained longer
        return BestChoice(True, f"{head}; the {word} {name} ({new:.6g} vs {old:.6g}) makes it "
                                "the best checkpoint")
    return BestChoice(False, f"{head}; the best checkpoint stays at step "
                             f"{int(best.get('best_step', -1))} (the {word} {name}, "
                             f"{old:.6g} vs {new:.6g})")


@dataclass
class CheckpointState:
    """Everything a resumed run (or a loaded one) needs besides the weights and optimizer."""

    step: int
    epoch: int = 0
    run_id: str | None = None
    data: dict | None = None  # the data module's position (DataModule.state_dict)
    rng: list[int] | None = None  # rng.rng_state()
    callbacks: dict[str, dict] = field(default_factory=dict)  # class name -> state_dict()
    history: dict[str, list] = field(default_factory=dict)  # metric -> [[step, value], ...]
    best_metrics: dict[str, float] = field(default_factory=dict)
    best_metric: float | None = None  # best_metrics[monitor] when the checkpoint was taken
    # the best evaluation's per-row results (labels, probabilities: what predictions/val_best.csv
    # and the confusion matrix are written from), so a resumed run still has them
    best_eval: dict | None = None
    checkpoint_metric: MonitoredMetric | None = None  # set by CheckpointManager.snapshot
    config: dict = field(default_factory=dict)  # the resolved Hydra config
    # what rebuilds the model without its data (vocab_size, num_labels, a pretrained config)
    model_init: dict = field(default_factory=dict)
    tokenizer_hash: str | None = None
    val_fingerprint: str | None = UNRECORDED
    log_window: dict | None = None  # LogWindow.state_dict(): steps since the last logged line
    encoding: dict | None = None  # classification: label values and columns
    model_ops: dict | None = None  # scheduled model operations done (training/model_ops.py)
    objective: dict = field(default_factory=dict)  # the objective's state_dict() (objectives/)
    # the pretrained base this checkpoint's weights go on, when model.safetensors holds only
    # the trained parameters (models/sources/fingerprint.py: source, folder, fingerprint);
    # None: it holds every weight
    base: dict | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not know
    version: int = STATE_VERSION
    # the checkpoint directory it was read from (set by `read`; not written)
    path: Path | None = field(default=None, repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _UNWRITTEN}
        if self.checkpoint_metric is not None:
            out["checkpoint_metric"] = asdict(self.checkpoint_metric)
        else:
            del out["checkpoint_metric"]
        return {**self.extra, **out}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> CheckpointState:
        """Any known layout, migrated to this one; CheckpointError for one that is not."""
        if not isinstance(raw, dict):
            raise CheckpointError(f"state.json holds {type(raw).__name__}, not an object")
        raw = dict(raw)
        version = raw.get("version", 1)
        if not isinstance(version, int) or version > STATE_VERSION:
            raise CheckpointError(
                f"state.json version {version!r} is newer than this mlxlab reads "
                f"({STATE_VERSION}): upgrade mlxlab to load this checkpoint"
            )
        if version == 1:
            raw = _migrate_v1(raw)
        if not isinstance(raw.get("step"), int):
            raise CheckpointError(f"state.json has no integer step (got {raw.get('step')!r})")
        known = {f.name for f in fields(cls)} - _UNWRITTEN
        kwargs = {k: v for k, v in raw.items() if k in known}
        for f in fields(cls):  # a null where a dict belongs (hand-edited, older writers)
            if kwargs.get(f.name, 0) is None and f.default_factory is dict:
                del kwargs[f.name]
        metric = kwargs.get("checkpoint_metric")
        kwargs["checkpoint_metric"] = MonitoredMetric(**metric) if metric else None
        return cls(**kwargs, extra={k: v for k, v in raw.items() if k not in known})

    @classmethod
    def read(cls, checkpoint: str | Path) -> CheckpointState:
        """The state of checkpoint directory `checkpoint` (no checksum check: see
        discover.check_committed)."""
        return replace(cls.from_json(read_payload(checkpoint)), path=Path(checkpoint))

    def with_metric(self, name: str | None, mode: str, value: float) -> CheckpointState:
        return replace(self, checkpoint_metric=MonitoredMetric(name, mode, float(value)))

    def check_resumable(self) -> None:
        """An older version's config holds keys this mlxlab reads no more: one line saying so,
        rather than a refusal of a key the user never typed."""
        if self.version < STATE_VERSION:
            raise CheckpointError(
                f"resume: {self.path or 'the checkpoint'} was written by an older mlxlab (state "
                f"version {self.version}, this one resumes {STATE_VERSION}): start a new run; "
                "its weights still load (mlxlab export, predictions)")

    def validation_changed(self, fingerprint: str | None) -> bool:
        """The validation set differs from the one this state's best metrics were measured on."""
        return self.val_fingerprint != UNRECORDED and self.val_fingerprint != fingerprint


_UNWRITTEN = {"extra", "path"}


def _migrate_v1(raw: dict[str, Any]) -> dict[str, Any]:
    """Unversioned states: the keys of version 2, each optional (older writers left some out;
    an absent val_fingerprint means none was recorded, not "no validation set")."""
    raw.setdefault("val_fingerprint", UNRECORDED)
    raw["version"] = 1
    return raw


def read_payload(checkpoint: str | Path) -> dict[str, Any]:
    """state.json of checkpoint directory `checkpoint` as written (a dict, not migrated)."""
    path = Path(checkpoint) / STATE_FILE
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(
            f"{path} is not valid JSON ({e}); resume from an older checkpoint"
        ) from e


# The low-level save/load API also checkpoints plain dicts (written as given, no version).
StateLike = CheckpointState | dict


def state_payload(state: StateLike) -> dict[str, Any]:
    """What goes into state.json for `state`."""
    return state.to_json() if isinstance(state, CheckpointState) else state


def state_base(state: StateLike) -> dict | None:
    """The base record of `state` (CheckpointState.base): the weights it leaves out."""
    return state.base if isinstance(state, CheckpointState) else state.get("base")


def state_step(state: StateLike) -> Any:
    return state.step if isinstance(state, CheckpointState) else state.get("step")


def with_metric(state: StateLike, name: str | None, mode: str, value: float) -> StateLike:
    """`state` with the metric that decides best/ recorded in it."""
    if isinstance(state, CheckpointState):
        return state.with_metric(name, mode, value)
    return {**state, "checkpoint_metric": asdict(MonitoredMetric(name, mode, float(value)))}


def metric_of(checkpoint: Path) -> float | None:
    """The checkpoint_metric value of a checkpoint directory, None when absent or unreadable."""
    try:
        state = CheckpointState.read(checkpoint)
    except (OSError, CheckpointError, TypeError):
        return None
    return state.checkpoint_metric.value if state.checkpoint_metric else None
