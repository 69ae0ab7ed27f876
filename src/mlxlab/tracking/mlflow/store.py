"""The central MLflow store: where it is (`resolve_uri`: a sqlite file by default, or a
server) and making it and the experiment exist (`ensure_store`, idempotent, safe when several
processes create one sqlite store at once)."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sqlite3
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlxlab.errors import ConfigError
from mlxlab.runtime import settings
from mlxlab.runtime.files.locks import file_lock
from mlxlab.tracking import tags as T
from mlxlab.tracking.mlflow import environment
from mlxlab.tracking.mlflow.calls import retrying

log = logging.getLogger(__name__)

# MLflow 3 opens experiments without this tag in its GenAI view; ours are model training.
EXPERIMENT_KIND = "custom_model_development"


def default_store_uri(root: str | Path | None = None) -> str:
    """sqlite URI of `<root>/mlruns/mlflow.db` (root: the project root), always absolute."""
    # the same root train.py's paths use; imported here, as config imports omegaconf, which the
    # tracking process (background.py) is never given a reason to load
    from mlxlab.config import project_root

    db = (Path(root) if root is not None else project_root()).resolve() / "mlruns" / "mlflow.db"
    return f"sqlite:///{db}"


def builds_mlflow(tracking: Any) -> bool:
    """Whether a composed `tracking` node builds an MLflow tracker: it has MLflow's settings
    (mlflow.yaml always sets `uri`) or names MlflowTracker itself. The one place this is
    decided (fanout.build_tracker, tracked_store, a grid's finished jobs ask here).

    Why by a key and not a `kind:` per option: Hydra merges a list of options
    (tracking=[mlflow,csv]) into one node, where each option's `kind` would overwrite the
    last; what survives the merge is what only each option has: MLflow's flat settings (kept
    flat: `tracking.uri=` in every command line and saved run), csv.yaml's `csv:` block,
    wandb.yaml's `wandb:` block."""
    if not isinstance(tracking, Mapping):
        return False
    return "uri" in tracking or str(tracking.get("_target_", "")).endswith("MlflowTracker")


def tracked_store(tracking: Any) -> str | None:
    """The store a composed `tracking` node's MLflow tracker writes to (resolve_uri of its uri),
    None when the node builds no MLflow tracker (tracking=none, csv, wandb)."""
    return resolve_uri(tracking.get("uri")) if builds_mlflow(tracking) else None


def resolve_uri(uri: str | None) -> str:
    """uri, else $MLFLOW_TRACKING_URI (MLflow's default store, read now: environment.py), else
    the default sqlite store; rejects file stores."""
    uri = str(uri or environment.tracking_uri() or default_store_uri())
    if "://" not in uri or uri.startswith("file:"):
        raise ConfigError(
            f"tracking uri {uri!r} is a file store, which MLflow 3 no longer writes; "
            f"use a sqlite store such as 'sqlite:///{Path(uri.removeprefix('file:')).resolve()}"
            "/mlflow.db' or a server 'http://127.0.0.1:5000'"
        )
    return uri


def sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite URI (query string dropped), None for other backends."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///").split("?", 1)[0]).resolve()


def check_writable(uri: str) -> None:
    """A sqlite store (or the folder it will be made in) that this process cannot write fails
    here, in one line: a real write, rolled back (a table made in a transaction needs the
    database file and its journal beside it writable; permission bits say nothing for root
    and read-only mounts). Before, jobs trained untracked with MLflow's tracebacks."""
    db = sqlite_path(uri)
    if db is None:  # a server: probe_store asks it
        return
    try:
        if db.is_file():
            with contextlib.closing(sqlite3.connect(db, timeout=30)) as conn:
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("CREATE TABLE mlxlab_write_probe (x)")
                conn.execute("ROLLBACK")
        else:  # the nearest folder that exists: checking creates nothing
            folder = db.parent
            while not folder.exists() and folder != folder.parent:
                folder = folder.parent
            probe = folder / f".mlxlab-write-probe-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
    except (OSError, sqlite3.Error) as err:
        raise ConfigError(
            f"MLflow store {db} cannot be written ({type(err).__name__}: {err}): give this user "
            f"write access to {db.parent}, point tracking.uri at a writable store, or train "
            "untracked with tracking=none") from None


def ensure_store(
    uri: str | None = None, experiment_name: str = "mlxlab", artifact_root: str | None = None
) -> str:
    """Create the store and the experiment if missing; return the experiment id. Idempotent.

    For sqlite the schema is created under an fcntl lock next to the database file: several
    processes migrating a fresh sqlite file at once can corrupt it. Artifacts default to
    `<database dir>/artifacts/<experiment id>`; a tracking server picks its own.
    """
    uri = resolve_uri(uri)
    db = sqlite_path(uri)
    if db is None:
        return retrying(_ensure_experiment_via_client, uri, experiment_name, artifact_root)

    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    db.parent.mkdir(parents=True, exist_ok=True)
    root = Path(artifact_root or db.parent / "artifacts").resolve()
    with file_lock(db.with_name(db.name + ".lock"), what=f"the MLflow store {db}"):
        if db.exists() and db.stat().st_size > 0:
            wait_for_schema(db)  # another process (a server starting on it) may migrate it
        if not db.exists() or db.stat().st_size == 0:
            _make_fresh_store(db, root)  # whole, in one rename: a server opening it sees all
        store = retrying(SqlAlchemyStore, uri, str(root))
        experiment = store.get_experiment_by_name(experiment_name)
        if experiment is None:
            from mlflow.entities import ExperimentTag

            return store.create_experiment(
                experiment_name, tags=[ExperimentTag(T.EXPERIMENT_KIND, EXPERIMENT_KIND)]
            )
        if experiment.lifecycle_stage == "deleted":
            log.warning("restoring deleted MLflow experiment %r", experiment_name)
            store.restore_experiment(experiment.experiment_id)
        if T.EXPERIMENT_KIND not in experiment.tags:  # made before this tag was set
            from mlflow.entities import ExperimentTag

            store.set_experiment_tag(
                experiment.experiment_id, ExperimentTag(T.EXPERIMENT_KIND, EXPERIMENT_KIND)
            )
        return experiment.experiment_id


# A tracking server started on this sqlite file migrates it (~10 s on 2 cores) without our lock:
# its schema is waited for up to SCHEMA_WAIT_S; one whose migration made no step for
# SCHEMA_STALL_S was left half-made (its migrating process stopped) and is repaired or refused.
SCHEMA_WAIT_S = 100.0
SCHEMA_STALL_S = 30.0


def schema_state(db: Path) -> tuple[str | None, bool]:
    """(the store's alembic revision, whether every table of MLflow's models exists), read with
    sqlite3 alone: opening it with MLflow would start migrating it beside its other migrator."""
    from mlflow.store.db.base_sql_model import Base

    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)) as conn:
        tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE "
                                                   "type = 'table'")}
        revision = None
        if "alembic_version" in tables:
            row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
            revision = row[0] if row else None
    return revision, set(Base.metadata.tables) <= tables


def wait_for_schema(db: Path, wait_s: float = SCHEMA_WAIT_S,
                    stall_s: float = SCHEMA_STALL_S) -> None:
    """Return once the sqlite store `db` holds this MLflow's whole schema: at once for a
    finished store; while another process migrates it, when it is done (bounded); a
    half-made one (no step for `stall_s`) is moved aside when it holds no run (the caller makes
    it anew), else refused with one line (a run is never trained beside untracked)."""
    from mlflow.store.db.utils import _get_latest_schema_revision

    head, started = None, time.monotonic()
    last, since = None, started
    while True:
        try:
            state = schema_state(db)
        except sqlite3.Error as err:  # locked by the migrating process, or not a database yet
            state = ("?", str(err))
        if state[1] is True:
            head = head or _get_latest_schema_revision()
            if state[0] == head:
                return
        now = time.monotonic()
        if state != last:
            if last is None:
                log.warning("MLflow store %s is being created by another process (a tracking "
                            "server starting on it?): waiting for its schema", db)
            last, since = state, now
        elif now - since >= stall_s or now - started >= wait_s:
            _half_made(db, state[0], head or _get_latest_schema_revision())
            return
        time.sleep(0.25)


def _half_made(db: Path, revision: str | None, head: str) -> None:
    """A store whose migration stopped half-way: moved aside when it holds no run, else one
    line saying how to finish it."""
    with contextlib.closing(sqlite3.connect(db, timeout=30)) as conn:
        try:
            runs = conn.execute("SELECT count(*) FROM runs").fetchone()[0]
        except sqlite3.Error:
            runs = 0
    if runs:
        raise ConfigError(
            f"MLflow store {db} has schema revision {revision}, MLflow {_version()} needs {head} "
            "(a migration that stopped half-way, or a store of another MLflow version): back it "
            f"up, then run `mlflow db upgrade sqlite:///{db}`, or point tracking.uri at another "
            "store")
    aside = db.with_name(f"{db.name}.half-made-{int(time.time())}")
    os.replace(db, aside)
    log.warning("MLflow store %s was left half-made (schema revision %s, its migration stopped) "
                "and held no run: moved to %s and made anew", db, revision, aside)


def _version() -> str:
    import mlflow

    return mlflow.__version__


STORE_TEMPLATE = "mlflow-{version}-empty-store.db"  # in the user's cache, one per MLflow version


def store_template_path() -> Path:
    """An empty store migrated by this MLflow version, kept in the user's cache
    ($MLXLAB_CACHE_DIR, else $XDG_CACHE_HOME/mlxlab, else ~/.cache/mlxlab): MLflow builds a new
    sqlite store by running every schema migration since its first release (~10 s on 2 cores),
    a copy takes milliseconds."""
    import mlflow

    return settings.current().cache_dir / STORE_TEMPLATE.format(version=mlflow.__version__)


def store_templates(cache_dir: Path) -> list[Path]:
    """The empty-store templates in `cache_dir`, this MLflow version's and older ones'."""
    return sorted(cache_dir.glob(STORE_TEMPLATE.format(version="*")))


def _copy_store_template(db: Path) -> bool:
    template = store_template_path()
    if template.is_file():
        tmp = db.with_name(f".{db.name}.{os.getpid()}.tmp")
        shutil.copyfile(template, tmp)
        os.replace(tmp, db)
        return True
    return False


def _make_fresh_store(db: Path, root: Path) -> None:
    """A new store at `db`: the template's copy, else one migrated beside it (and kept as the
    template), renamed into place when whole: never a half-made file another process (a tracking
    server started at the same moment) could open and migrate too."""
    if _copy_store_template(db):
        return
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    tmp = db.with_name(f".{db.name}.{os.getpid()}.new")
    tmp.unlink(missing_ok=True)
    store = retrying(SqlAlchemyStore, f"sqlite:///{tmp}", str(root))
    store.engine.dispose()
    _save_store_template(tmp)
    os.replace(tmp, db)


def _save_store_template(db: Path) -> None:
    """The fresh store, minus its Default experiment (whose artifact folder is this store's;
    MLflow recreates it in every copy), as the template for the next fresh store."""
    template = store_template_path()
    if template.is_file():
        return
    try:
        template.parent.mkdir(parents=True, exist_ok=True)
        tmp = template.with_name(f".{template.name}.{os.getpid()}.tmp")
        shutil.copyfile(db, tmp)
        with contextlib.closing(sqlite3.connect(tmp)) as conn, conn:
            conn.execute("DELETE FROM experiment_tags")
            conn.execute("DELETE FROM experiments")
        os.replace(tmp, template)
    except (OSError, sqlite3.Error) as e:  # a read-only home: every fresh store migrates
        log.debug("no MLflow store template at %s: %s", template, e)


def _ensure_experiment_via_client(uri: str, name: str, artifact_root: str | None) -> str:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if T.EXPERIMENT_KIND not in experiment.tags:
            client.set_experiment_tag(experiment.experiment_id, T.EXPERIMENT_KIND, EXPERIMENT_KIND)
        return experiment.experiment_id
    try:
        return client.create_experiment(
            name, artifact_location=artifact_root, tags={T.EXPERIMENT_KIND: EXPERIMENT_KIND}
        )
    except MlflowException as e:  # another job created it first
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id
