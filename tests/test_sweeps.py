"""Sweeps at scale: parallel multiruns, Optuna searches with failing trials, resumable sweeps,
the model registry and cluster launcher configs. Real Hydra, real sqlite MLflow stores in tmp
dirs, real MLX training for the mlxlab-train runs (those are marked slow: each starts Python,
MLX and MLflow several times)."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from conftest import PYTHON, REPO
from mlxlab.config import config_dir
from mlxlab.sweeps.store import sweep_children

# The tiniest real training: a 1-layer BERT of width 16, 3 steps on the shipped Titanic CSV.
TINY = [
    "trainer.max_epochs=1",
    "trainer.max_steps=3",
    "trainer.eval_every_steps=3",
    "trainer.log_every_steps=1",
    "trainer.schedule.warmup_steps=0",
    "callbacks.progress.enabled=false",
    "trainer.batch_size=64",
    "checkpoint.save_every_minutes=null",
    "model.num_layers=1",
    "model.num_heads=2",
    "data.max_length=48",
]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")


def client_for(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def run(cmd: list[str], cwd: Path, env: dict | None = None, timeout: int = 600) -> str:
    env = {**os.environ, **(env or {})}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    return proc.stdout + proc.stderr


def mlxlab_train(root: Path, *overrides: str) -> str:
    """`mlxlab-train` rooted in `root` (store at root/mlruns/mlflow.db)."""
    env = {"MLXLAB_ROOT": str(root), "PYTHONUNBUFFERED": "1"}
    return run([PYTHON, "-m", "mlxlab.train", *overrides], cwd=root, env=env)


def sweep_parents(client, experiment: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs(
        [exp.experiment_id], "tags.`mlxlab.role` = 'sweep'", order_by=["attributes.start_time ASC"]
    )


def training_runs(client, experiment: str) -> list:
    """Every live non-parent run of the experiment (deleted runs are not returned)."""
    exp = client.get_experiment_by_name(experiment)
    return [
        r
        for r in client.search_runs([exp.experiment_id], max_results=1000)
        if r.data.tags.get("mlxlab.role") != "sweep"
    ]


# --------------------------------------------------------------------------- Optuna, tiny app

OPTUNA_APP = """
import math
import hydra
from hydra.utils import instantiate
from omegaconf import OmegaConf

from mlxlab.sweeps.folder import current_job, tracker_arguments


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg):
    if cfg.width == 4:  # a bad combination: fails before any tracking, like a constructor would
        raise ValueError("width=4 is not divisible by heads=3")
    # its sweep's parent run and job folder, handed to the tracker as train.py hands them
    tracker = instantiate(cfg.tracking, **tracker_arguments(current_job(), cfg.tracking))
    tracker.start(OmegaConf.to_container(cfg, resolve=True), {"mlxlab.run_dir": "x"})
    accuracy = cfg.lr * cfg.width
    tracker.log_metrics({"val/accuracy": accuracy / 2}, 1)  # the last value is not the best
    if cfg.width == 3:  # NaN loss: train.py returns NaN in multirun mode
        tracker.end("FAILED")
        return math.nan
    tracker.end()
    return accuracy


if __name__ == "__main__":
    main()
"""

OPTUNA_CONFIG = """
defaults:
  - _self_
  - tracking: mlflow
  - override hydra/sweeper: mlxlab
task_name: demo
seed: 0
optimized_metric: val/accuracy
optimized_mode: max
lr: 0.1
width: 2
paths:
  mlflow_uri: sqlite:///{root}/mlruns/mlflow.db
hydra:
  searchpath: [file://{conf}]
  run: {{dir: {root}/outputs/run}}
  sweep: {{dir: {root}/multirun/sweep, subdir: "${{hydra:job.num}}"}}
  sweeper:
    direction: ${{optimized_mode}}imize
    n_trials: 4
    n_jobs: 2
    sampler: {{seed: 22, n_startup_trials: 8}}
  callbacks:
    mlflow_sweep:
      _target_: mlxlab.sweeps.callback.MlflowSweepCallback
"""


@pytest.mark.slow
def test_optuna_sweep_records_failed_trials_and_logs_the_best(tmp_path):
    """4 trials (one at a time with the basic launcher): one NaN, one raising before tracking
    started (recorded by the callback), two good. Seed 22 (trial k's sampler seeded 22 + k)
    draws (width, lr) = (3, 0.2), (2, 0.2), (2, 0.1), (4, 0.1): exactly that."""
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf/config.yaml").write_text(
        OPTUNA_CONFIG.format(root=tmp_path, conf=REPO / "conf")
    )
    (tmp_path / "app.py").write_text(OPTUNA_APP)
    run([PYTHON, "app.py", "--multirun", "lr=choice(0.1,0.2)", "width=choice(2,3,4)"], tmp_path)

    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    client = client_for(uri)
    (parent,) = sweep_parents(client, "demo")
    children = sweep_children(client, parent.info.run_id)
    outcome = sorted((r.data.params["width"], r.data.params["lr"], r.info.status) for r in children)
    assert outcome == [
        ("2", "0.1", "FINISHED"),
        ("2", "0.2", "FINISHED"),
        ("3", "0.2", "FAILED"),  # NaN
        ("4", "0.1", "FAILED"),  # raised: a run made by the callback, with the error
    ]
    raised = next(r for r in children if r.data.params["width"] == "4")
    assert "not divisible" in raised.data.tags["mlxlab.error"]
    good = {r.data.params["lr"]: r for r in children if r.info.status == "FINISHED"}
    # what the job returned is logged as best/<metric>: the table ranks by it, not the last value
    assert good["0.2"].data.metrics["best/val/accuracy"] == pytest.approx(0.4)
    assert good["0.2"].data.metrics["val/accuracy"] == pytest.approx(0.2)

    parent = client.get_run(parent.info.run_id)
    assert parent.info.status == "FINISHED"
    tags, params, metrics = parent.data.tags, parent.data.params, parent.data.metrics
    assert (tags["mlxlab.num_runs"], tags["mlxlab.num_failed"]) == ("4", "2")
    assert tags["mlxlab.top_run_id"] == good["0.2"].info.run_id
    assert metrics["top_run/val/accuracy"] == pytest.approx(0.4)
    assert metrics["optuna/best_value"] == pytest.approx(0.4)
    # tags, not params: a continuation may move the top run
    assert tags["top_run.lr"] == "0.2" and tags["top_run.width"] == "2"
    assert tags["optuna.best.lr"] == "0.2" and tags["optuna.best.width"] == "2"
    assert not params
    results = yaml.safe_load((tmp_path / "multirun/sweep/optimization_results.yaml").read_text())
    assert results["best_value"] == pytest.approx(0.4)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"optimization_results.yaml", "plots"} <= artifacts


# --------------------------------------------------------------------------- configs


@pytest.fixture
def compose_train():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        yield lambda *o: compose("train", overrides=list(o), return_hydra_config=True)
    GlobalHydra.instance().clear()


@pytest.mark.parametrize(
    ("search", "metric", "direction", "width"),
    [
        ("titanic_optuna", "val/accuracy", "maximize", "model.hidden_size"),
        ("tinystories_optuna", "val/loss", "minimize", "model.dim"),
    ],
)
def test_hparams_search_configs(compose_train, search, metric, direction, width):
    cfg = compose_train(f"hparams_search={search}")
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("mlxlab_sweeper.MlxlabSweeper")
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler"
    assert cfg.optimized_metric == metric and sweeper.direction == direction[:3]
    assert sweeper.storage is None and sweeper.n_trials > 0
    assert sweeper.pruner in ("median", "hyperband")
    assert cfg.hydra.launcher._target_.endswith("JoblibLauncher")  # trials in worker processes
    assert cfg.hydra.sweep.dir.endswith(f"study_{cfg.task_name}")  # a restart finds its folder
    searched = set(sweeper.params)
    assert {"optimizer.learning_rate", width, "model.num_layers", "model.dropout"} <= searched
    assert "trainer.batch_size" in searched
    for choice in str(sweeper.params[width]).removeprefix("choice(").rstrip(")").split(","):
        assert int(choice) % cfg.model.num_heads == 0  # every width the search picks is valid
    assert (
        compose_train(f"hparams_search={search}", "hydra.sweeper.n_trials=3").hydra.sweeper.n_trials
        == 3
    )


@pytest.mark.parametrize(
    ("launcher", "target"),
    [
        ("joblib", "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"),
        ("submitit_slurm", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"),
        ("submitit_local", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"),
        ("ray", "hydra_plugins.hydra_ray_launcher.ray_launcher.RayLauncher"),
    ],
)
def test_cluster_launchers_compose(compose_train, launcher, target):
    cfg = compose_train(f"hydra/launcher={launcher}", "hparams_search=titanic_optuna")
    assert cfg.hydra.launcher._target_ == target
    if launcher == "submitit_slurm":
        cfg = compose_train(
            "hydra/launcher=submitit_slurm",
            "hydra.launcher.partition=gpu",
            "hydra.launcher.timeout_min=240",
            "hydra.launcher.cpus_per_task=8",
        )
        assert (cfg.hydra.launcher.partition, cfg.hydra.launcher.cpus_per_task) == ("gpu", 8)
    if launcher == "ray":
        cfg = compose_train("hydra/launcher=ray", "hydra.launcher.ray.init.address=auto")
        assert cfg.hydra.launcher.ray.init.address == "auto"
        assert cfg.hydra.launcher.ray.remote.num_cpus == 1


# --------------------------------------------------------------------------- registry


@pytest.mark.slow
def test_registered_classifier_predicts_rows_in_a_fresh_process(make_cfg, tmp_path):
    from mlxlab.serving.registry import register_run
    from mlxlab.train import train

    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    cfg = make_cfg(*TINY, "model.hidden_size=16", f"tracking.uri={uri}")
    metrics = train(cfg)
    run_dir = Path(cfg.paths.output_dir)
    version = register_run(run_dir, "titanic-tiny", "champion", uri)
    assert str(version.version) == "1" and version.aliases == ["champion"]
    client = client_for(uri)
    assert (
        version.run_id
        == client.search_runs([client.get_experiment_by_name(cfg.task_name).experiment_id])[
            0
        ].info.run_id
    )  # the model hangs off the training run itself

    rows = REPO / "src/mlxlab/assets/titanic/train.csv"
    script = f"""
import json, sys, mlflow, pandas as pd
model = mlflow.pyfunc.load_model("models:/titanic-tiny@champion")
df = pd.read_csv({str(rows)!r}).head(12).drop(columns=["Survived"])
out = model.predict(df)
print("RESULT" + out.to_json(orient="records"))
try:
    model.predict(["not rows"])
except ValueError as e:
    print("ERROR " + str(e))
"""
    out = run([PYTHON, "-c", script], tmp_path, env={"MLFLOW_TRACKING_URI": uri})
    records = json.loads(out.split("RESULT", 1)[1].splitlines()[0])
    assert [r["PassengerId"] for r in records] == list(range(1, 13))
    assert {r["prediction"] for r in records} <= {0, 1}
    assert all(0.5 <= r["probability"] <= 1.0 for r in records)
    assert "pandas DataFrame" in out.split("ERROR ", 1)[1]
    assert 0.0 <= metrics["val/accuracy"] <= 1.0

    # the same predictions straight from the run's model and data module, in this process
    import mlx.core as mx
    import numpy as np
    from omegaconf import open_dict

    from mlxlab.config import instantiate
    from mlxlab.runs import load_run_model

    model, _ = load_run_model(run_dir)
    with open_dict(cfg):
        cfg.data.tokenizer.path = str(run_dir / "tokenizer.json")
    data = instantiate(cfg.data)
    data.setup(None)
    import pandas as pd

    frame = pd.read_csv(rows).head(12)
    logits = [
        model(b["input_ids"], attention_mask=b["attention_mask"]) for b in data.encode_frame(frame)
    ]
    expected = np.array(mx.argmax(mx.concatenate(logits), axis=-1)).tolist()
    assert [r["prediction"] for r in records] == [data.label_values[i] for i in expected]


def test_register_verb_errors_clearly(tmp_path, capsys):
    """In-process (test_cli runs `mlxlab register` as a process of its own)."""
    from mlxlab.cli.main import main

    code = main(["register", str(tmp_path / "nope"), "--name", "x", "--uri",
                 f"sqlite:///{tmp_path}/mlflow.db"])
    assert code == 2 and "no run folder" in capsys.readouterr().err


@pytest.mark.slow
def test_registered_language_model_completes_prompts(make_cfg, tmp_path):
    from mlxlab.serving.registry import register_run
    from mlxlab.train import train

    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    cfg = make_cfg(
        "experiment=tinystories_nano",
        *TINY[:7],
        "model.dim=32",
        "model.num_layers=1",
        "model.num_heads=2",
        "data.packing.seq_len=32",
        "model.max_seq_len=64",
        "data.splits.val_examples=8",
        "data.tokenizer_sample=300",
        f"tracking.uri={uri}",
    )
    train(cfg)
    register_run(Path(cfg.paths.output_dir), "tiny-lm", "staging", uri)
    script = """
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model("models:/tiny-lm@staging")
out = model.predict(pd.DataFrame({"prompt": ["Once upon a time", "The dog"]}),
                    params={"max_new_tokens": 5})
print("RESULT", out.to_json(orient="records"))
"""
    out = run([PYTHON, "-c", script], tmp_path, env={"MLFLOW_TRACKING_URI": uri})
    records = json.loads(out.split("RESULT ", 1)[1].splitlines()[0])
    assert [r["prompt"] for r in records] == ["Once upon a time", "The dog"]
    assert all(isinstance(r["completion"], str) for r in records)


# --------------------------------------------------------------------------- real mlxlab-train sweeps


@pytest.mark.slow
def test_parallel_sweep_lands_every_run_then_resumes(tmp_path):
    """2 models x 2 learning rates on 2 joblib workers: exactly 4 finished child runs under one
    parent. The same command again says the sweep finished and runs nothing; after one run is
    deleted from the store, the sweep is unfinished: the same command runs exactly that one
    again, under the same parent."""
    command = [
        "--multirun",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "model.hidden_size=16,32",
        "optimizer.learning_rate=1e-3,3e-3",
        *TINY,
    ]
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    mlxlab_train(tmp_path, *command)
    client = client_for(uri)
    (parent,) = sweep_parents(client, "train")
    children = sweep_children(client, parent.info.run_id)
    assert len(children) == 4 and {r.info.status for r in children} == {"FINISHED"}
    assert {
        (r.data.params["model.hidden_size"], r.data.params["optimizer.learning_rate"])
        for r in children
    } == {("16", "0.001"), ("16", "0.003"), ("32", "0.001"), ("32", "0.003")}
    assert len({r.data.tags["mlxlab.config_hash"] for r in children}) == 4
    assert all("best/val/accuracy" in r.data.metrics for r in children)
    parent = client.get_run(parent.info.run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["mlxlab.num_finished"] == "4"

    out = mlxlab_train(tmp_path, *command)  # everything finished already: 0 new jobs
    assert f"sweep {parent.info.run_id} " in out and "already finished" in out
    assert len(training_runs(client, "train")) == 4

    client.delete_run(children[0].info.run_id)
    out = mlxlab_train(tmp_path, *command)  # the deleted one runs again, only it
    assert out.count("kept, not run again") == 3
    (again,) = sweep_parents(client, "train")
    assert again.info.run_id == parent.info.run_id and again.info.status == "FINISHED"
    runs = training_runs(client, "train")
    assert len(runs) == 4
    (new,) = [r for r in runs if r.info.run_id not in {c.info.run_id for c in children}]
    assert new.info.status == "FINISHED"
    assert new.data.tags["mlxlab.config_hash"] == children[0].data.tags["mlxlab.config_hash"]


@pytest.mark.slow
def test_titanic_optuna_sweep_with_failing_trials(tmp_path):
    """hparams_search=titanic_optuna on real training: sampler seed 15 draws (lr, heads) =
    (1e-3, 3) hidden 16 not divisible by 3, (inf, 2) NaN loss, (inf, 2) NaN, (1e-3, 2) good."""
    mlxlab_train(
        tmp_path,
        "--multirun",
        "hparams_search=titanic_optuna",
        "hydra.sweeper.n_trials=4",
        "hydra.sweeper.n_jobs=2",
        "hydra.sweeper.sampler.seed=15",
        "optimizer.learning_rate=choice(0.001,inf)",
        "model.num_heads=choice(2,3)",
        "model.hidden_size=16",
        "model.dropout=0.1",
        *[o for o in TINY if not o.startswith("model.num_heads")],
    )
    client = client_for(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    (parent,) = sweep_parents(client, "train")  # the run's task, not the preset's name
    children = sweep_children(client, parent.info.run_id)
    outcome = sorted(
        (r.data.params["optimizer.learning_rate"], r.data.params["model.num_heads"], r.info.status)
        for r in children
    )
    assert outcome == [
        ("0.001", "2", "FINISHED"),
        ("0.001", "3", "FAILED"),
        ("inf", "2", "FAILED"),
        ("inf", "2", "FAILED"),
    ]
    good = next(r for r in children if r.info.status == "FINISHED")
    parent = client.get_run(parent.info.run_id)
    best = parent.data.metrics["top_run/val/accuracy"]
    assert best == pytest.approx(good.data.metrics["best/val/accuracy"])
    assert parent.data.metrics["optuna/best_value"] == pytest.approx(best)
    assert parent.data.tags["optuna.best.model.num_heads"] == "2"
    assert math.isfinite(best) and parent.data.tags["mlxlab.num_failed"] == "3"
