"""Merge other MLflow stores into the central one: `python -m mlxlab.tracking.mlflow.merge SOURCE...`.

A SOURCE is a sqlite file (`mlflow.db`), an `mlruns/` file store, a folder holding either, or a
tracking URI (`sqlite:///...`, `file:...`, `http(s)://...`). Everything in it is copied into the
central store (or `--into URI`): experiments (by name, with their tags), runs with their params,
tags, every metric value with its step and timestamp, status, start and end times, artifacts,
parent/child links (`mlflow.parentRunId` and mlxlab's sweep id point at the copied parents), and
registered models with their versions, tags and aliases.

Idempotent: each copied run carries `mlxlab.merge.source_run_id`, each copied model version
`mlxlab.merge.source_version`; a second merge skips what is already there (a run whose copy was
interrupted is deleted and copied again). Sources are never written to: a sqlite source is read
from a temporary copy (upgraded there to the current schema when it is older), other stores only
through read calls.

Why not mlflow-export-import: it imports every run as new on each call (no idempotency), goes
through an intermediate export folder, and its registered-model import targets MLflow 2's
model-version layout; a direct MlflowClient copy keeps all the guarantees above in one pass.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from mlxlab.tracking import tags as T
from mlxlab.tracking.mlflow.calls import (
    MAX_METRICS_PER_BATCH,
    MAX_PARAMS_PER_BATCH,
    MAX_TAGS_PER_BATCH,
    chunks,
)
from mlxlab.tracking.mlflow.environment import set_for_the_call
from mlxlab.tracking.mlflow.store import ensure_store, resolve_uri

log = logging.getLogger(__name__)

RUN_ID_TAGS = (T.PARENT_RUN, T.SWEEP_ID)  # tags whose value is another run's id


class MergeError(RuntimeError):
    """A source or destination that cannot be used; the message names it and the fix."""


@dataclass
class MergeReport:
    experiments_created: list[str] = field(default_factory=list)
    runs_copied: int = 0
    runs_skipped: int = 0
    runs_recopied: int = 0  # interrupted copies deleted and copied again
    metrics_copied: int = 0
    artifacts_copied: int = 0
    models_created: list[str] = field(default_factory=list)
    versions_copied: int = 0
    versions_skipped: int = 0
    problems: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [
            f"runs: {self.runs_copied} copied ({self.runs_recopied} of them re-copied after an "
            f"interrupted merge), {self.runs_skipped} skipped (already merged)",
            f"metric values: {self.metrics_copied}; artifact files: {self.artifacts_copied}",
            f"experiments created: {', '.join(self.experiments_created) or 'none'}",
            f"registered model versions: {self.versions_copied} copied, {self.versions_skipped} "
            f"skipped; models created: {', '.join(self.models_created) or 'none'}",
        ]
        out += [f"problem: {p}" for p in self.problems]
        return out


# ---------------------------------------------------------------------------- sources


def source_uri(source: str) -> str:
    """The tracking URI of a SOURCE argument; MergeError when it names nothing usable."""
    if "://" in source or source.startswith("file:"):
        return source
    path = Path(source).expanduser().resolve()
    if path.is_file():
        return f"sqlite:///{path}"
    if path.is_dir():
        if (path / "mlflow.db").is_file():
            return f"sqlite:///{path / 'mlflow.db'}"
        if (path / "mlruns").is_dir():
            path = path / "mlruns"
        if any(path.glob("*/meta.yaml")):
            return path.as_uri()
    raise MergeError(
        f"merge source {source!r} is not an MLflow store: pass a sqlite file (mlflow.db), an "
        "mlruns/ folder, or a tracking URI (sqlite:///..., file:..., http://host:5000)"
    )


@contextmanager
def readable(uri: str) -> Iterator[str]:
    """A URI to read `uri` through without writing to it: sqlite and file stores go through a
    temporary copy (MLflow may create tables or upgrade the schema of a database it opens, and
    adds .trash/ to a file store); a server is only read."""
    if uri.startswith("file:"):
        with tempfile.TemporaryDirectory(prefix="mlxlab-merge-") as tmp, _file_store_allowed():
            copy = Path(tmp) / "mlruns"
            # hard links: metadata only is read; artifact_location still names the original
            shutil.copytree(Path(uri.removeprefix("file://").removeprefix("file:")), copy,
                            copy_function=_link_or_copy)
            yield copy.as_uri()
        return
    if not uri.startswith("sqlite:///"):
        yield uri
        return
    path = Path(uri.removeprefix("sqlite:///").split("?", 1)[0])
    if not path.is_file():
        raise MergeError(f"merge source {uri}: no such sqlite file")
    with tempfile.TemporaryDirectory(prefix="mlxlab-merge-") as tmp:
        copy = Path(tmp) / path.name
        shutil.copy2(path, copy)
        copy_uri = f"sqlite:///{copy}"
        _upgrade_schema(copy_uri)
        yield copy_uri


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _file_store_allowed() -> AbstractContextManager[None]:
    """MLflow 3 refuses file stores unless told; reading one to merge it is what it is for."""
    return set_for_the_call({"MLFLOW_ALLOW_FILE_STORE": "true"})


def _upgrade_schema(uri: str) -> None:
    """Bring an older sqlite store (the copy) to the schema this MLflow reads."""
    import sqlalchemy
    from mlflow.store.db.utils import _get_latest_schema_revision, _get_schema_version, _upgrade_db

    engine = sqlalchemy.create_engine(uri)
    try:
        with engine.connect() as conn:
            tables = sqlalchemy.inspect(conn).get_table_names()
        if "alembic_version" in tables and _get_schema_version(engine) != _get_latest_schema_revision():
            log.info("merge: upgrading a copy of an older store schema")
            _upgrade_db(engine)
    finally:
        engine.dispose()


# ---------------------------------------------------------------------------- copying


def _all_runs(client, experiment_ids: list[str]) -> list:
    from mlflow.entities import ViewType

    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, run_view_type=ViewType.ACTIVE_ONLY,
                                  max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def _merged_runs(dest, experiment_id: str) -> dict[str, object]:
    """Source run id -> its copy in `experiment_id` of the destination."""
    return {r.data.tags[T.MERGE_SOURCE_RUN]: r for r in _all_runs(dest, [experiment_id])
            if T.MERGE_SOURCE_RUN in r.data.tags}


class Merger:
    def __init__(self, dest_uri: str, dry_run: bool = False) -> None:
        from mlflow import MlflowClient

        self.dest_uri, self.dry_run = dest_uri, dry_run
        self.dest = MlflowClient(tracking_uri=dest_uri, registry_uri=dest_uri)
        self.report = MergeReport()
        self.run_map: dict[str, str] = {}  # source run id -> destination run id

    def merge(self, source: str) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import ViewType

        uri = source_uri(source)
        with readable(uri) as read_uri:
            src = MlflowClient(tracking_uri=read_uri, registry_uri=read_uri)
            for exp in src.search_experiments(view_type=ViewType.ACTIVE_ONLY):
                self._merge_experiment(src, exp, uri)
            self._merge_models(src)

    def _experiment_id(self, exp) -> str:
        found = self.dest.get_experiment_by_name(exp.name)
        if found is not None:
            return found.experiment_id
        self.report.experiments_created.append(exp.name)
        if self.dry_run:
            return ""
        exp_id = ensure_store(self.dest_uri, exp.name)
        for key, value in exp.tags.items():
            if not key.startswith("mlflow."):
                self.dest.set_experiment_tag(exp_id, key, value)
        return exp_id

    def _merge_experiment(self, src, exp, uri: str) -> None:
        runs = _all_runs(src, [exp.experiment_id])
        if not runs:
            return
        exp_id = self._experiment_id(exp)
        merged = _merged_runs(self.dest, exp_id) if exp_id else {}
        copies = []
        for run in sorted(runs, key=lambda r: r.info.start_time or 0):
            done = merged.get(run.info.run_id)
            if done is not None and done.data.tags.get(T.MERGE_COMPLETE) == "true":
                self.run_map[run.info.run_id] = done.info.run_id
                self.report.runs_skipped += 1
                continue
            if self.dry_run:
                self.report.runs_copied += 1
                continue
            if done is not None:  # an interrupted copy: start it over
                self.dest.delete_run(done.info.run_id)
                self.report.runs_recopied += 1
            copies.append((run, self._copy_run(src, run, exp_id, uri)))
        # Parents may sort after their children: link once every copy exists, then mark done.
        for run, new_id in copies:
            links = {k: self.run_map.get(v, v) for k, v in run.data.tags.items() if k in RUN_ID_TAGS}
            if links:
                self.dest.log_batch(new_id, tags=_tags(links))
            self.dest.set_tag(new_id, T.MERGE_COMPLETE, "true")
            self.report.runs_copied += 1

    def _copy_run(self, src, run, exp_id: str, uri: str) -> str:
        from mlflow.entities import Param

        info, data = run.info, run.data
        tags = {k: v for k, v in data.tags.items() if k not in RUN_ID_TAGS}
        tags.update({T.MERGE_SOURCE_RUN: info.run_id, T.MERGE_SOURCE_STORE: uri, T.MERGE_COMPLETE: "false"})
        new = self.dest.create_run(exp_id, start_time=info.start_time, tags=tags,
                                   run_name=info.run_name)
        new_id = new.info.run_id
        self.run_map[info.run_id] = new_id
        params = [Param(k, v) for k, v in data.params.items()]
        for chunk in chunks(params, MAX_PARAMS_PER_BATCH):
            self.dest.log_batch(new_id, params=chunk)
        for key in data.metrics:
            history = src.get_metric_history(info.run_id, key)
            for chunk in chunks(history, MAX_METRICS_PER_BATCH):
                self.dest.log_batch(new_id, metrics=chunk)
            self.report.metrics_copied += len(history)
        self._copy_artifacts(src, info.run_id, new_id)
        self.dest.set_terminated(new_id, status=info.status, end_time=info.end_time)
        return new_id

    def _copy_artifacts(self, src, run_id: str, new_id: str) -> None:
        if not src.list_artifacts(run_id):
            return
        with tempfile.TemporaryDirectory(prefix="mlxlab-merge-art-") as tmp:
            local = Path(src.download_artifacts(run_id, "", tmp))
            self.report.artifacts_copied += sum(1 for p in local.rglob("*") if p.is_file())
            self.dest.log_artifacts(new_id, str(local))

    # -- registered models

    def _merge_models(self, src) -> None:
        try:
            models = list(src.search_registered_models())
        except Exception as e:  # a tracking server without a registry
            self.report.problems.append(f"registered models not read: {e}")
            return
        for model in models:
            versions = sorted(src.search_model_versions(f"name='{model.name}'"),
                              key=lambda v: int(v.version))
            self._merge_model(src, model, versions)

    def _merge_model(self, src, model, versions: list) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.dest.get_registered_model(model.name)
        except MlflowException:
            self.report.models_created.append(model.name)
            if not self.dry_run:
                self.dest.create_registered_model(model.name, tags=model.tags,
                                                  description=model.description)
        done = set()
        if not self.dry_run or model.name not in self.report.models_created:
            done = {v.tags.get(T.MERGE_SOURCE_VERSION) for v in
                    self.dest.search_model_versions(f"name='{model.name}'")}
        for version in versions:
            key = f"{model.name}/{version.version}"
            if key in done:
                self.report.versions_skipped += 1
                continue
            if version.run_id and version.run_id not in self.run_map:
                self.report.problems.append(f"model version {key}: its run {version.run_id} is "
                                            "not in this source; version not copied")
                continue
            self.report.versions_copied += 1
            if not self.dry_run:
                self._copy_version(src, model, version, key)

    def _copy_version(self, src, model, version, key: str) -> None:
        """The new version points at the same files in the copied run; files that lived outside
        the run (MLflow 3 logged models, or no run) are copied into its artifacts first."""
        new_run = self.run_map.get(version.run_id) if version.run_id else None
        relative = _inside_run(src, version)
        if new_run is None or relative is None:
            new_run, relative = self._copy_model_files(src, model, version, key, new_run)
        base = self.dest.get_run(new_run).info.artifact_uri.rstrip("/")
        source = f"{base}/{relative}" if relative else base
        tags = {**version.tags, T.MERGE_SOURCE_VERSION: key}
        new = self.dest.create_model_version(model.name, source, run_id=new_run, tags=tags,
                                             description=version.description)
        for alias in getattr(version, "aliases", []) or []:
            self.dest.set_registered_model_alias(model.name, alias, new.version)

    def _copy_model_files(self, src, model, version, key: str, new_run: str | None
                          ) -> tuple[str, str]:
        import mlflow.artifacts

        with tempfile.TemporaryDirectory(prefix="mlxlab-merge-model-") as tmp:
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=src.get_model_version_download_uri(model.name, version.version),
                dst_path=tmp, tracking_uri=src._tracking_client.tracking_uri,
            )
            if new_run is None:  # a version without a run: keep it under a holder run
                holder = ensure_store(self.dest_uri, "mlxlab-merged-models")
                new_run = self.dest.create_run(holder, run_name=f"model {key}").info.run_id
                self.dest.set_terminated(new_run)
            path = f"registered_models/{model.name}/v{version.version}"
            self.dest.log_artifacts(new_run, local, path)
        return new_run, path


def _inside_run(src, version) -> str | None:
    """The version's path inside its run's artifacts ('' for the root), None if outside."""
    if not version.run_id:
        return None
    source = version.source.rstrip("/")
    prefix = f"runs:/{version.run_id}"
    if source == prefix or source.startswith(prefix + "/"):
        return source[len(prefix):].strip("/")
    base = src.get_run(version.run_id).info.artifact_uri.rstrip("/")
    if source == base or source.startswith(base + "/"):
        return source[len(base):].strip("/")
    return None


def _tags(tags: dict[str, str]) -> list:
    from mlflow.entities import RunTag

    return [RunTag(k, v) for k, v in tags.items()][:MAX_TAGS_PER_BATCH]


def merge(sources: list[str], into: str | None = None, dry_run: bool = False) -> MergeReport:
    """Copy every source store into `into` (default: the central store); the report."""
    dest_uri = resolve_uri(into)
    dest_uris = {dest_uri}
    for source in sources:
        if source_uri(source) in dest_uris:
            raise MergeError(f"merge source {source!r} is the destination store itself")
    merger = Merger(dest_uri, dry_run=dry_run)
    ensure_store(dest_uri, "Default") if not dry_run else None
    for source in sources:
        log.info("merging %s into %s", source, dest_uri)
        merger.merge(source)
    return merger.report


def main(argv: list[str] | None = None) -> int:
    """`mlxlab runs merge SOURCE... [--into URI] [--dry-run]`; 0 on success, 2 on bad input."""
    parser = argparse.ArgumentParser(
        prog="mlxlab runs merge",
        description="Copy experiments, runs and registered models from other MLflow stores "
                    "into the central one (idempotent; sources are only read).",
    )
    parser.add_argument("sources", nargs="+", metavar="SOURCE",
                        help="sqlite file, mlruns/ folder, or tracking URI")
    parser.add_argument("--into", default=None,
                        help="destination tracking URI (default: MLFLOW_TRACKING_URI or the "
                             "central store under the project root)")
    parser.add_argument("--dry-run", action="store_true", help="count what would be copied")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        report = merge(args.sources, into=args.into, dry_run=args.dry_run)
    except MergeError as e:
        print(f"mlxlab runs merge: error: {e}", file=sys.stderr)
        return 2
    for line in report.lines():
        print(("(dry run) " if args.dry_run else "") + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
