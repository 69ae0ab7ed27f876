"""`mlxlab runs merge` (mlxlab.tracking.mlflow.merge): two stores with real Hydra sweeps (parent and
children through the real MlflowSweepCallback) and an old-style mlruns/ file store, merged into a
central store; every run's metric history, params, tags, artifacts and links compared with the
source; a second merge adds nothing; the sources are left byte-for-byte untouched."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import PYTHON
from mlxlab.tracking import tags as T
from mlxlab.tracking.mlflow.merge import main

APP = """
import hydra
from hydra.utils import instantiate
from omegaconf import OmegaConf

from mlxlab.sweeps.folder import current_job, tracker_arguments


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg):
    # as train.py: the job's parent run and folder are handed to the tracker
    tracker = instantiate(cfg.tracking, **tracker_arguments(current_job(), cfg.tracking))
    tracker.start(OmegaConf.to_container(cfg, resolve=True), {"mlxlab.run_dir": "x"})
    for step in range(1, 31):  # a long enough history, logged in several batches
        tracker.log_metrics({"train/loss": cfg.lr / step, "val/accuracy": cfg.lr * step}, step)
    tracker.log_text(f"lr={cfg.lr}", "notes/lr.txt")
    tracker.end()
    return cfg.lr


if __name__ == "__main__":
    main()
"""

CONFIG = """
defaults:
  - _self_
  - tracking: mlflow
task_name: {name}
optimized_metric: val/accuracy
optimized_mode: max
lr: 0.1
paths:
  mlflow_uri: sqlite:///{root}/mlruns/mlflow.db
hydra:
  searchpath: [pkg://mlxlab.conf, file://{conf}]
  run: {{dir: {root}/outputs/run}}
  sweep: {{dir: {root}/multirun/sweep, subdir: "${{hydra:job.num}}"}}
  callbacks:
    mlflow_sweep:
      _target_: mlxlab.sweeps.callback.MlflowSweepCallback
"""


def sweep_store(root: Path, name: str, lrs: str) -> Path:
    """A store holding one real sweep: a parent run and a child per value of lr."""
    from mlxlab.config import config_dir

    (root / "conf").mkdir(parents=True)
    (root / "app.py").write_text(APP)
    (root / "conf" / "config.yaml").write_text(
        textwrap.dedent(CONFIG).format(name=name, root=root, conf=config_dir()))
    out = subprocess.run([PYTHON, "app.py", "--multirun", f"lr={lrs}"], cwd=root,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return root / "mlruns" / "mlflow.db"


def file_store(root: Path, monkeypatch) -> Path:
    """An mlruns/ file store as older MLflow versions wrote them, with a registered model."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 writes them only if told
    store = root / "mlruns"
    client = MlflowClient(store.as_uri(), registry_uri=store.as_uri())
    exp = client.create_experiment("legacy")
    run = client.create_run(exp, run_name="old-run", tags={"origin": "file"})
    client.log_param(run.info.run_id, "lr", "0.5")
    for step in range(5):
        client.log_metric(run.info.run_id, "loss", 1.0 / (step + 1), step=step,
                          timestamp=1_600_000_000_000 + step)
    client.log_text(run.info.run_id, "weights", "model/weights.txt")
    client.set_terminated(run.info.run_id, "FINISHED")
    client.create_registered_model("legacy-model", tags={"team": "x"}, description="old")
    version = client.create_model_version("legacy-model", f"{run.info.artifact_uri}/model",
                                          run_id=run.info.run_id, tags={"v": "1"})
    client.set_registered_model_alias("legacy-model", "champion", version.version)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")
    return store


def digest(path: Path) -> str:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(path.parent)).encode() + f.read_bytes())
    return h.hexdigest()


def all_runs(client: MlflowClient) -> list:
    ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(ids, max_results=10_000)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    with pytest.MonkeyPatch.context() as monkeypatch:
        return [sweep_store(root / "a", "sweep_a", "0.1,0.2"),
                sweep_store(root / "b", "sweep_b", "0.3,0.4,0.5"),
                file_store(root / "c", monkeypatch)]


@pytest.mark.slow
def test_merge_copies_everything_once_and_leaves_sources_alone(stores, tmp_path, capsys,
                                                              monkeypatch):
    central = f"sqlite:///{tmp_path}/central/mlflow.db"
    before = [digest(s) for s in stores]
    # The CLI entry point the lead wires in as `mlxlab runs merge`.
    assert main([str(stores[0]), str(stores[1]), str(stores[2].parent), "--into", central]) == 0
    printed = capsys.readouterr().out
    assert [digest(s) for s in stores] == before  # read through copies, never written
    assert "runs: 8 copied" in printed and "0 skipped" in printed

    dest = MlflowClient(central, registry_uri=central)
    copies = {r.data.tags[T.MERGE_SOURCE_RUN]: r for r in all_runs(dest)}
    assert len(copies) == 8  # 2 sweeps: 2 + 3 children and their 2 parents; 1 file-store run
    for store in stores:
        uri = f"sqlite:///{store}" if store.suffix == ".db" else store.as_uri()
        if store.suffix != ".db":
            monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        src = MlflowClient(uri)
        for run in all_runs(src):
            copy = copies[run.info.run_id]
            assert copy.info.run_name == run.info.run_name
            assert copy.info.status == run.info.status
            assert (copy.info.start_time, copy.info.end_time) == (
                run.info.start_time, run.info.end_time)
            assert copy.data.params == run.data.params
            assert dest.get_experiment(copy.info.experiment_id).name == src.get_experiment(
                run.info.experiment_id).name
            for key in run.data.metrics:
                def history(client, run_id, key=key):
                    return sorted((m.step, m.timestamp, m.value)
                                  for m in client.get_metric_history(run_id, key))
                assert history(dest, copy.info.run_id) == history(src, run.info.run_id), key
            for key, value in run.data.tags.items():
                if key in ("mlflow.parentRunId", "mlxlab.sweep_id"):  # now the copied parent
                    assert copy.data.tags[key] == copies[value].info.run_id
                else:
                    assert copy.data.tags[key] == value, key
            names = sorted(a.path for a in src.list_artifacts(run.info.run_id))
            assert sorted(a.path for a in dest.list_artifacts(copy.info.run_id)) == names
    children = [r for r in copies.values() if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 5
    notes = [dest.download_artifacts(r.info.run_id, "notes/lr.txt", str(tmp_path / r.info.run_id))
             for r in children]
    assert sorted(Path(n).read_text() for n in notes) == [
        f"lr={x}" for x in ("0.1", "0.2", "0.3", "0.4", "0.5")]

    [version] = dest.search_model_versions("name='legacy-model'")
    assert version.tags["v"] == "1" and version.run_id == copies[
        next(iter(r for r in copies if copies[r].info.run_name == "old-run"))].info.run_id
    assert dest.get_model_version_by_alias("legacy-model", "champion").version == version.version
    assert dest.get_registered_model("legacy-model").description == "old"
    assert version.source == f"{dest.get_run(version.run_id).info.artifact_uri}/model"
    local = dest.download_artifacts(version.run_id, "model", str(tmp_path / "m"))
    assert (Path(local) / "weights.txt").read_text() == "weights"

    before = [digest(s) for s in stores]
    # the second merge, through the installed command as a user types it, adds nothing
    again = subprocess.run(
        [str(Path(sys.executable).with_name("mlxlab")), "runs", "merge", *map(str, stores[:2]),
         str(stores[2].parent), "--into", central], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert "runs: 0 copied (0 of them re-copied after an interrupted merge), 8 skipped" in again.stdout, again.stdout
    assert "registered model versions: 0 copied, 1 skipped" in again.stdout, again.stdout
    assert len(all_runs(dest)) == 8
    assert [digest(s) for s in stores] == before


def test_merge_errors_are_one_clear_line(tmp_path, capsys):
    assert main([str(tmp_path / "nothing-here"), "--into", f"sqlite:///{tmp_path}/c.db"]) == 2
    assert "is not an MLflow store" in capsys.readouterr().err
