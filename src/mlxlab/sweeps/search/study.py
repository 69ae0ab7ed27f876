"""The search's Optuna study: where it is stored, who runs which trial, what a restart resumes.

The study lives in an RDB storage (Optuna's own distributed mode): by default a sqlite file
beside the MLflow store (`<root>/mlruns/optuna.db`), or any database URL
(`hydra.sweeper.storage=postgresql://user@host/db`) that sweepers on several machines share.
`study_name` names it; the same command started again loads it (`load_if_exists`): finished
trials stay finished, and the count of trials is the one asked for over all starts.

A study remembers what it searches (`SPEC_ATTR`: space, fixed overrides, direction, sampler,
pruner): a start with other settings under the same name is refused with one line, so one
study never mixes two searches.

A trial records the process running it (host, boot, pid) and a heartbeat. A trial left RUNNING
by a process that died (SIGKILL, OOM, a lost node) is *stale*: on this host when its process is
gone, elsewhere when its heartbeat stopped for `STALE_AFTER_S`. A start claims stale trials and
runs them again under their own number and params (its job folder, and so its checkpoint, is
the same): they resume, and the search's sequence of trials is the uninterrupted one's.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from mlxlab.errors import ConfigError
from mlxlab.runtime.files.locks import file_lock

log = logging.getLogger(__name__)

SPEC_ATTR = "mlxlab:spec"
OWNER_ATTR = "mlxlab:owner"            # {"host", "boot", "pid"} of the sweeper running a trial
WORKER_ATTR = "mlxlab:worker"          # ... of the job's process (a launcher's worker)
HEARTBEAT_ATTR = "mlxlab:heartbeat"    # time.time() of the owner's last beat
ATTEMPTS_ATTR = "mlxlab:attempts"      # starts of this trial (a stale one is started again)
PRUNED_AT_ATTR = "pruned_at_step"      # user attrs, shown by optuna-dashboard too
STEPS_ATTR = "steps_trained"
FAIL_REASON_ATTR = "fail_reason"
HEARTBEAT_S = 20.0
STALE_AFTER_S = 120.0
MAX_ATTEMPTS = 3  # a trial whose process died this often (e.g. killed out of memory) fails


def default_storage(root: str | Path, tracking_uri: str | None) -> str:
    """sqlite beside the MLflow store: its folder when the store is a sqlite file, else
    `<root>/mlruns/optuna.db`."""
    folder = Path(root) / "mlruns"
    if tracking_uri and tracking_uri.startswith("sqlite:///"):
        folder = Path(tracking_uri.removeprefix("sqlite:///").split("?", 1)[0]).parent
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(folder / 'optuna.db').resolve()}"


def lock_path(url: str, root: str | Path) -> Path:
    """The file lock that orders this storage's creation and its trials' numbering between
    sweepers of this machine: beside a sqlite file, else under `<root>/mlruns`, named by the
    URL. (Sweepers on several machines share a database server: its own transactions order
    them, and a lost race to create the tables is retried, open_storage.)"""
    if url.startswith("sqlite:///"):
        db = Path(url.removeprefix("sqlite:///").split("?", 1)[0])
        return db.with_name(db.name + ".lock")
    return Path(root) / "mlruns" / f".optuna-{hashlib.sha256(url.encode()).hexdigest()[:12]}.lock"


@contextlib.contextmanager
def trial_lock(storage: Any, url: str, root: str | Path, name: str,
               timeout_s: float = 120.0) -> Iterator[None]:
    """Held while a sweeper counts the study's trials and creates the next one, so sweepers
    started together make n_trials in all. sqlite: the file lock beside the database (one
    machine); PostgreSQL: an advisory lock in the server, which orders sweepers on every
    machine sharing it (polled up to `timeout_s`, then one line); other servers: the file lock
    (sweepers of one machine)."""
    if storage.engine.dialect.name != "postgresql":
        with file_lock(lock_path(url, root), timeout_s, what=f"study {name!r}"):
            yield
        return
    from sqlalchemy import text

    key = int.from_bytes(hashlib.sha256(f"mlxlab:{name}".encode()).digest()[:8], "big",
                         signed=True)
    deadline = time.monotonic() + timeout_s
    with storage.engine.connect() as conn:
        while not conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar():
            if time.monotonic() > deadline:
                raise ConfigError(f"study {name!r}: another sweeper held its advisory lock in "
                                  f"{_safe_url(url)} for over {timeout_s:.0f} s; stop it, or "
                                  "start again")
            time.sleep(0.05)
        try:
            yield
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})


def open_study(url: str, root: str | Path, name: str, direction: str,
               spec: Mapping[str, Any]) -> tuple[Any, Any]:
    """(storage, study): both created if missing, one sweeper at a time. Optuna creates its
    schema without guarding against another process doing the same (two sweepers started at
    once on a fresh root: `UNIQUE constraint failed: alembic_version.version_num`), and two
    fresh starts would both record the study's spec."""
    with file_lock(lock_path(url, root), what=f"the Optuna storage {_safe_url(url)}"):
        storage = open_storage(url)
        return storage, load_or_create(storage, name, direction, spec)


def open_storage(url: str, attempts: int = 3) -> Any:
    """Optuna's RDBStorage for `url`; sqlite waits on a lock held by a parallel trial instead of
    failing, and a database that cannot be reached is one line. Sweepers started at once on a
    new database race to create Optuna's tables (the loser's CREATE fails): it tries again."""
    import optuna

    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    for attempt in range(attempts):
        try:
            return optuna.storages.RDBStorage(url, **kwargs)
        except Exception as err:  # a driver missing, a server down, bad credentials, the race
            racing = any(w in str(err).lower() for w in (
                "already exists", "duplicate key", "unique constraint"))
            if racing and attempt + 1 < attempts:
                time.sleep(1.0 + attempt)
                continue
            raise ConfigError(f"hydra.sweeper.storage={_safe_url(url)} cannot be opened "
                              f"({type(err).__name__}: {str(err).splitlines()[0]}); "
                              f"{_storage_fix(url, err)}") from None
    raise AssertionError("unreachable")


def _storage_fix(url: str, err: Exception) -> str:
    """What to do: a sqlite file that is not a database (corrupt, or another program's) is
    not fixed by the URL; a new study file or removing it is."""
    text = str(err).lower()
    if url.startswith("sqlite") and any(w in text for w in (
            "not a database", "malformed", "file is encrypted", "no such table", "alembic")):
        path = url.removeprefix("sqlite:///").split("?", 1)[0]
        return (f"the file is not a usable Optuna database: remove {path} (its study's trials "
                "are lost) or point hydra.sweeper.storage=sqlite:///<new file> for a new study")
    return ("fix the URL, start the database, or leave it null for sqlite beside the MLflow "
            "store")


def _safe_url(url: str) -> str:
    """The URL without a password."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}"
    return url


def spec_digest(spec: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_or_create(storage: Any, name: str, direction: str, spec: Mapping[str, Any]) -> Any:
    """The study `name`, created with `spec` or checked against it."""
    import optuna

    study = optuna.create_study(storage=storage, study_name=name, direction=direction,
                                load_if_exists=True)
    digest = spec_digest(spec)
    saved = study.user_attrs.get(SPEC_ATTR)
    if saved is None:
        study.set_user_attr(SPEC_ATTR, {"digest": digest, "spec": json.loads(
            json.dumps(spec, default=str))})
    elif saved.get("digest") != digest:
        changed = _changed_keys(saved.get("spec", {}), spec)
        raise ConfigError(
            f"study {name!r} in {_safe_url(storage.url)} was started with other search settings "
            f"({', '.join(changed) or 'see its user attrs'} differ): name a new study with "
            "hydra.sweeper.study_name=<name>, or run the same command to resume this one")
    return study


def _changed_keys(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    new = json.loads(json.dumps(new, default=str))
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


# --- who runs a trial ---------------------------------------------------------------------


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def this_process() -> dict[str, Any]:
    return {"host": socket.gethostname(), "boot": _boot_id(), "pid": os.getpid()}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def on_this_machine(process: dict[str, Any]) -> bool:
    me = this_process()
    return process.get("host") == me["host"] and process.get("boot") == me["boot"]


def process_alive(process: dict[str, Any] | None) -> bool | None:
    """Whether a recorded process of this machine lives; None for another machine's."""
    if not process:
        return False
    if not on_this_machine(process):
        return None
    return _alive(int(process.get("pid", -1)))


def sweeper_gone(trial: Any, now: float | None = None) -> bool:
    """The sweeper running a RUNNING trial is gone (this machine) or silent (another)."""
    attrs = trial.system_attrs
    owner = attrs.get(OWNER_ATTR)
    if not owner:  # asked, never started (its sweeper died between ask and launch)
        return time.time() - trial.datetime_start.timestamp() > STALE_AFTER_S \
            if trial.datetime_start else True
    if owner.get("pid") == os.getpid() and on_this_machine(owner):
        return False  # ours
    alive = process_alive(owner)
    if alive is None:  # another machine's sweeper: its heartbeat tells
        alive = (now or time.time()) - float(attrs.get(HEARTBEAT_ATTR, 0.0)) <= STALE_AFTER_S
    return not alive


def heartbeat_age(storage: Any, trial_id: int) -> float:
    return time.time() - float(storage.get_trial_system_attrs(trial_id).get(HEARTBEAT_ATTR, 0.0))


def worker_alive(trial: Any) -> bool:
    """The trial's job process still runs here (its sweeper died; it is stopping itself)."""
    return process_alive(trial.system_attrs.get(WORKER_ATTR)) is True


def claim(storage: Any, trial_id: int) -> int:
    """This process runs the trial now: owner, heartbeat, attempts + 1 (returned)."""
    attempts = int(storage.get_trial_system_attrs(trial_id).get(ATTEMPTS_ATTR, 0)) + 1
    storage.set_trial_system_attr(trial_id, OWNER_ATTR, this_process())
    storage.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())
    storage.set_trial_system_attr(trial_id, ATTEMPTS_ATTR, attempts)
    return attempts


class Heartbeat:
    """A thread that beats for the trials this process runs, so sweepers elsewhere see them
    alive (and stop seeing them when this process dies)."""

    def __init__(self, storage: Any, every_s: float = HEARTBEAT_S) -> None:
        self.storage, self.every_s = storage, every_s
        self.trial_ids: set[int] = set()
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="mlxlab-search-heartbeat",
                                       daemon=True)

    def __enter__(self) -> Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stopped.set()
        self.thread.join(timeout=5)

    def add(self, trial_id: int) -> None:
        with self.lock:
            self.trial_ids.add(trial_id)

    def remove(self, trial_id: int) -> None:
        with self.lock:
            self.trial_ids.discard(trial_id)

    def _beat(self) -> None:
        while not self.stopped.wait(self.every_s):
            with self.lock:
                ids = list(self.trial_ids)
            for trial_id in ids:
                try:
                    self.storage.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())
                except Exception as err:  # a finished trial, a database hiccup: next beat
                    log.debug("heartbeat for trial %s: %s", trial_id, err)
