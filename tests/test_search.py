"""The search (sweeps/search/): mlxlab's Hydra sweeper over Optuna with a study in RDB storage.

Real Hydra multiruns of real (tiny) training, a real sqlite MLflow store and Optuna study in a
temp folder, real joblib worker processes; the PostgreSQL test starts a real server (slow)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from conftest import PYTHON
from mlxlab.errors import ConfigError
from mlxlab.sweeps.search.space import override_text, split_space
from mlxlab.sweeps.search.sweeper import replicate_arguments
from test_sweeps import TINY, client_for, mlxlab_train, run, sweep_parents, training_runs

SEARCH = [
    *TINY, "trainer.max_steps=12", "trainer.eval_every_steps=3",
    "checkpoint.save_every_steps=3", "tracking.background=false",
    "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")


def study(root: Path, name: str):
    import optuna

    return optuna.load_study(study_name=name, storage=f"sqlite:///{root}/mlruns/optuna.db")


# --------------------------------------------------------------------------- pieces


def test_replicates_become_a_seed_range():
    assert replicate_arguments(["replicates=3", "model.pooler=null,true"], 1, 42) == [
        "model.pooler=null,true", "seed=range(42,45)", "replicates=3"]  # jobs log replicates=3
    assert replicate_arguments(["a=1"], 4, 7) == [  # from a config file
        "a=1", "seed=range(7,11)", "replicates=4"]
    assert replicate_arguments(["replicates=1", "a=1,2"], 1, 42) == ["a=1,2"]
    with pytest.raises(ConfigError, match="give one or the other"):
        replicate_arguments(["replicates=3", "seed=1,2"], 1, 42)


def test_search_space_in_hydras_grammar():
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    space, fixed = split_space(
        {"optimizer.learning_rate": "tag(log, interval(1e-4, 3e-3))", "model.num_layers": "range(1, 3)"},
        ["model.hidden_size=choice(64,128)", "trainer.max_epochs=5", "model.dropout=interval(0,0.3)"])
    assert space["optimizer.learning_rate"] == FloatDistribution(1e-4, 3e-3, log=True)
    assert space["model.num_layers"] == IntDistribution(1, 3)  # both ends, as the plugin had it
    assert space["model.hidden_size"] == CategoricalDistribution([64, 128])
    assert space["model.dropout"] == FloatDistribution(0.0, 0.3)
    assert fixed == ["trainer.max_epochs=5"]
    assert override_text("model.pooler", None) == "model.pooler=null"
    assert override_text("x", True) == "x=true"


def test_a_study_refuses_other_settings_under_its_name(tmp_path):
    from mlxlab.sweeps.search import study as S

    storage = S.open_storage(f"sqlite:///{tmp_path}/optuna.db")
    S.load_or_create(storage, "s", "maximize", {"space": {"a": "1"}})
    S.load_or_create(storage, "s", "maximize", {"space": {"a": "1"}})  # the same: resumes
    with pytest.raises(ConfigError, match="hydra.sweeper.study_name"):
        S.load_or_create(storage, "s", "maximize", {"space": {"a": "2"}})


def test_a_database_that_cannot_be_reached_is_one_line():
    from mlxlab.sweeps.search import study as S

    port = _free_port()
    with pytest.raises(ConfigError, match=r"storage=postgresql://me:\*\*\*@127.0.0.1"):
        S.open_storage(f"postgresql://me:secret@127.0.0.1:{port}/db?connect_timeout=2")


def test_replicates_need_a_multirun(tmp_path):
    proc = subprocess.run([PYTHON, "-m", "mlxlab.train", "replicates=3", "tracking=none"],
                          cwd=tmp_path, env={**os.environ, "MLXLAB_ROOT": str(tmp_path)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "mlxlab: error: replicates=3 runs each config on 3 seeds: add --multirun" in proc.stderr


def test_the_split_seed_keeps_the_validation_rows_across_seeds(tmp_path):
    from mlxlab.config import asset_path
    from mlxlab.data.tabular import TabularText

    def val_rows(seed, split_seed):
        data = TabularText(path=asset_path("titanic/train.csv"), label_column="Survived",
                           id_column="PassengerId", seed=seed, split_seed=split_seed,
                           cache_dir=str(tmp_path))
        data.setup(tmp_path / f"{seed}-{split_seed}")
        return data.val_idx.tolist()

    assert val_rows(1, 42) == val_rows(2, 42)
    assert val_rows(1, None) != val_rows(2, None)  # split_seed=null: the rows move with the seed


# --------------------------------------------------------------------------- real searches


@pytest.mark.slow
def test_pruned_and_out_of_memory_trials_are_recorded_and_the_search_goes_on(tmp_path):
    """Sampler seed 41 draws (lr, intermediate size) = (3e-3, 16), (1e-8, 16), (1e-8, 1e9):
    the second trails the first at its first evaluation and is pruned; the third asks for a
    400 GB weight and its worker process dies; the search ends with every trial accounted for."""
    out = mlxlab_train(
        tmp_path, "-m", *SEARCH, "optimized_metric=val/loss", "optimized_mode=min",
        "hydra.sweeper.n_trials=3", "hydra.sweeper.sampler.seed=41",
        "hydra.sweeper.pruner=median",
        "hydra.sweeper.pruner_args={n_startup_trials: 1, n_warmup_steps: 0}",
        "optimizer.learning_rate=choice(0.003,1e-8)",
        "model.intermediate_size=choice(16,1000000000)")
    trials = study(tmp_path, "train").trials
    assert [t.state.name for t in trials] == ["COMPLETE", "PRUNED", "FAIL"], out[-3000:]
    assert trials[1].params["optimizer.learning_rate"] == 1e-8
    pruned_at = trials[1].user_attrs["pruned_at_step"]
    assert pruned_at == 3 and trials[1].user_attrs["steps_trained"] == 3
    assert trials[0].user_attrs["steps_trained"] == 12
    assert "out of memory" in trials[2].user_attrs["fail_reason"]
    client = client_for(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    runs = {r.data.tags.get("mlxlab.search.trial"): r for r in training_runs(client, "train")}
    pruned = runs["1"]
    assert pruned.data.tags["mlxlab.search.state"] == "PRUNED"
    assert pruned.data.tags["mlxlab.search.pruned_at_step"] == "3"
    assert pruned.info.status == "FINISHED"  # a pruned run keeps its checkpoint and metrics
    crashed = [r for r in training_runs(client, "train") if r.info.status == "FAILED"]
    assert len(crashed) == 1 and "out of memory" in crashed[0].data.tags["mlxlab.error"]
    (parent,) = sweep_parents(client, "train")
    metrics = client.get_run(parent.info.run_id).data.metrics
    assert (metrics["search/trials_complete"], metrics["search/trials_pruned"],
            metrics["search/trials_fail"]) == (1, 1, 1)
    assert metrics["search/steps_trained"] == 12 + 3
    assert "trial 1 pruned" in out and "trial 2 failed: out of memory" in out


@pytest.mark.slow  # ~65 s: a real search killed and continued (the default run stays < 10 min)
def test_a_killed_search_resumes_with_the_trials_it_would_have_run(tmp_path):
    """SIGKILL the sweeper while trial 1 trains (after its first checkpoint); its worker stops
    itself with a checkpoint; the same command finishes the study: no finished trial runs
    again, trial 1 resumes from its checkpoint, 3 trials in all, and every trial's params and
    value equal an uninterrupted search's with the same seed."""
    space = ["optimizer.learning_rate=tag(log,interval(1e-4,1e-2))", "model.hidden_size=choice(16,32)"]
    args = [*SEARCH, "hydra.sweeper.n_trials=3", *space]
    env = {**os.environ, "MLXLAB_ROOT": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    cmd = [PYTHON, "-m", "mlxlab.train", "-m", *args, "hydra.sweeper.study_name=killed",
           "hydra.sweep.dir=multirun/killed"]
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    trial1 = tmp_path / "multirun/killed/1/checkpoints"
    deadline = time.monotonic() + 240
    while not any(trial1.glob("step_*/COMMITTED")):
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert [t.state.name for t in study(tmp_path, "killed").trials] == ["COMPLETE", "RUNNING"]
    out = run(cmd, tmp_path, env)
    assert "trial 1 was left running by a search that is gone" in out
    assert "multirun/killed/1 resumes from its checkpoint" in out
    assert "search: trial 0:" not in out  # trial 0 finished: never launched again
    killed = study(tmp_path, "killed").trials
    assert [t.state.name for t in killed] == ["COMPLETE"] * 3

    # the uninterrupted one with two trial slots (joblib's 2 workers): the trials it asks are
    # the same (a sampler seeded per trial number); two slots once broke ask() with a KeyError
    # in Optuna's cached storage (a trial made beside the cache, not through it)
    mlxlab_train(tmp_path, "-m", *args, "hydra.sweeper.study_name=whole",
                 "hydra.sweep.dir=multirun/whole", "hydra.sweeper.n_jobs=2")
    whole = study(tmp_path, "whole").trials
    assert [t.params for t in killed] == [t.params for t in whole]
    assert [t.value for t in killed] == pytest.approx([t.value for t in whole], abs=1e-6)
    client = client_for(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    parents = {p.data.tags.get("mlxlab.search.study"): p for p in sweep_parents(client, "train")}
    children = [r for r in training_runs(client, "train")
                if r.data.tags.get("mlflow.parentRunId") == parents["killed"].info.run_id]
    assert sorted(r.data.tags["mlxlab.search.trial"] for r in children) == ["0", "1", "2"]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("initdb") is None, reason="needs PostgreSQL's initdb and pg_ctl")
def test_two_sweepers_share_one_study_on_a_real_postgresql_server(tmp_path):
    """Two sweepers (as on two machines) with the same command and a PostgreSQL storage: the
    study gets exactly the trials asked for, each run once, told by whichever sweeper ran it."""
    url = _postgres(tmp_path)
    args = ["-m", *SEARCH, "hydra.sweeper.n_trials=4", f"hydra.sweeper.storage={url}",
            "hydra.sweeper.study_name=shared", "optimizer.learning_rate=tag(log,interval(1e-4,1e-2))"]
    env = {**os.environ, "MLXLAB_ROOT": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    procs = [subprocess.Popen([PYTHON, "-m", "mlxlab.train", *args,
                               f"hydra.sweep.dir=multirun/machine{i}"], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    import optuna

    trials = optuna.load_study(study_name="shared", storage=url).trials
    assert len(trials) == 4 and all(t.state.name == "COMPLETE" for t in trials)
    launched = [line for out in outs for line in out.splitlines() if "search: trial" in line
                and ": optimizer" in line]
    assert len(launched) == 4 and all("machine" not in line for line in launched)
    assert all(any(f"search: trial {t.number}:" in out for out in outs) for t in trials)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _postgres(tmp_path: Path) -> str:
    """A PostgreSQL server of its own on 127.0.0.1 (stopped at the end of the test session).
    As root, the server runs as the `postgres` user, in a folder that user can reach (pytest's
    tmp folders are root's alone)."""
    import atexit
    import tempfile

    port = _free_port()
    home = Path(tempfile.mkdtemp(prefix="mlxlab-pg-"))
    pre = None
    if os.geteuid() == 0:
        import pwd

        user = pwd.getpwnam("postgres")
        home.chmod(0o755)
        os.chown(home, user.pw_uid, user.pw_gid)

        def pre() -> None:
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)

    data = home / "data"
    subprocess.run(["initdb", "-D", str(data), "-U", "mlxlab", "--auth=trust"], check=True,
                   capture_output=True, preexec_fn=pre, cwd=home)
    subprocess.run(["pg_ctl", "-D", str(data), "-o", f"-p {port} -k {home} -h 127.0.0.1",
                    "-l", str(home / "pg.log"), "-w", "start"], check=True,
                   capture_output=True, preexec_fn=pre, cwd=home)
    atexit.register(subprocess.run, ["pg_ctl", "-D", str(data), "-m", "immediate", "stop"],
                    capture_output=True, preexec_fn=pre, cwd=home)
    return f"postgresql+psycopg2://mlxlab@127.0.0.1:{port}/postgres"


@pytest.mark.slow  # 4 tiny trainings: ~35 s of CPU
def test_a_searchs_best_trials_rerun_carry_their_interval_and_a_verdict(tmp_path):
    """Once the top-k trials are re-run on more seeds, the parent's leader tag carries the interval
    of the leading config (n = rerun_seeds) and the verdict compares it with the other re-run
    config, paired seed by seed; no bare winner is named."""
    import json
    import tempfile

    mlxlab_train(
        tmp_path, "-m", *SEARCH, "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.seed=41",
        "hydra.sweeper.pruner=none", "hydra.sweeper.rerun_top_k=2",
        "hydra.sweeper.rerun_seeds=2", "optimizer.learning_rate=choice(0.003,1e-8)")
    client = client_for(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    (parent,) = sweep_parents(client, "train")
    parent = client.get_run(parent.info.run_id)
    children = training_runs(client, "train")
    assert len(children) == 4
    by_group = {}
    for r in children:
        by_group.setdefault(r.data.tags["mlxlab.group"], set()).add(r.data.params["seed"])
    assert sorted(by_group) == ["g1", "g2"] and all(len(s) == 2 for s in by_group.values())
    tags = parent.data.tags
    assert "n=2)" in tags["mlxlab.leader"]
    result = json.loads(Path(client.download_artifacts(
        parent.info.run_id, "comparison.json", tempfile.mkdtemp())).read_text())
    (c,) = result["comparisons"]
    assert c["paired"] and c["n_pairs"] == 2 and result["baseline"] == c["a"]
    # two seed pairs: the exact signed-rank test cannot reach 0.05 at any difference: never "better"
    assert not result["significant"] and tags["mlxlab.verdict"] == "too few replicates"
    assert "(not significant)" in tags["mlxlab.leader"] or tags["mlxlab.leader"].startswith(
        "none: ")


@pytest.mark.slow
def test_a_search_without_a_preset_resumes_in_its_study_folder(tmp_path):
    """A search from the command line alone (no hparams_search preset, Hydra's basic launcher:
    trials in the sweeper's process), SIGKILLed while trial 1 trains after its first checkpoint,
    then the same command: the study's folder found again (not a new stamped one), trial 1 resumed
    from its checkpoint into its own run, one parent, 3 trials exactly."""
    args = [*TINY, "trainer.max_steps=12", "trainer.eval_every_steps=6",
            "checkpoint.save_every_steps=3", "tracking.background=false",
            "optimizer.learning_rate=tag(log,interval(1e-4,3e-3))", "model.dropout=interval(0,0.3)",
            "hydra.sweeper.n_trials=3"]
    env = {**os.environ, "MLXLAB_ROOT": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [PYTHON, "-m", "mlxlab.train", "-m", *args]
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    while not list(tmp_path.glob("multirun/train/*/1/checkpoints/step_*/COMMITTED")):
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (folder,) = tmp_path.glob("multirun/train/*")
    assert folder.name == "study_train"  # the study's folder, as the presets name it
    out = run(cmd, tmp_path, env)
    assert "multirun/train/study_train/1 resumes from its checkpoint" in out, out[-4000:]
    assert [f.name for f in tmp_path.glob("multirun/train/*")] == ["study_train"]
    assert [t.state.name for t in study(tmp_path, "train").trials] == ["COMPLETE"] * 3
    client = client_for(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    (parent,) = sweep_parents(client, "train")
    assert parent.info.status == "FINISHED"
    children = training_runs(client, "train")
    assert sorted(r.data.tags["mlxlab.search.trial"] for r in children) == ["0", "1", "2"]
    assert {r.info.status for r in children} == {"FINISHED"}
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    (resumed,) = [r for r in children if r.data.tags["mlxlab.search.trial"] == "1"]
    steps = [m.step for m in client.get_metric_history(resumed.info.run_id, "train/loss")]
    assert sorted(steps) == list(range(1, 13))  # one history, each step once
    assert not {"mlxlab.killed_reason", "mlxlab.killed_at"} & set(resumed.data.tags)
