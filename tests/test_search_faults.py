"""Parallel starts, bad input first, faults loud (sweeps/checks.py, runtime/files/locks.py,
sweeps/search/study.py, sweeps/search/sweeper.py).

Real `mlxlab-train` processes on a real root (sqlite MLflow store, Optuna sqlite study, Hydra
multirun). Each bad input: exit 2, its one line, and the store exactly as before (the database's
bytes, the root's folders: no parent run, no multirun folder, no study). The parallel start and
the Ctrl-C of a search train for real and are `slow`."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

import parallel_starts as starts
from conftest import PYTHON, REPO
from one_process import each_in_one_process

SMALL = [
    "debug=fast",
    "model.hidden_size=32",
    "model.num_layers=1",
    "model.num_heads=2",
    "trainer.max_steps=2",
    "trainer.eval_every_steps=2",
]
SEARCH = ["hparams_search=titanic_optuna", *SMALL]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")


def env_for(root: Path) -> dict[str, str]:
    return {**os.environ, "MLXLAB_ROOT": str(root), "PYTHONUNBUFFERED": "1"}


def train(root: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, "-m", "mlxlab.train", *args],
        cwd=root,
        env=env_for(root),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def snapshot(root: Path) -> dict[str, str]:
    """Every file under root (bar the lock files a start may leave) and its content's hash."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.endswith(".lock")
    }


@pytest.fixture(scope="module")
def grid_with_a_failing_job(tmp_path_factory):
    """A real grid: model.hidden_size=33 is not divisible by the 2 heads (the model's
    constructor refuses it: config checks cannot know), 32 trains. Its store is also the one the bad inputs below must leave unchanged."""
    root = tmp_path_factory.mktemp("grid")
    proc = train(root, "-m", *SMALL, "model.hidden_size=32,33")
    # the other job trained; the sweep whose parent FAILED says so and exits 1, not 0
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("mlxlab: error: sweep ") and " ended FAILED: " in last, last
    assert "the same command continues it: " in last
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root}/mlruns/mlflow.db")
    return root, client


@pytest.fixture
def root(grid_with_a_failing_job, tmp_path) -> Path:
    """A root whose store holds a user's earlier sweep (the grid below)."""
    shutil.copytree(grid_with_a_failing_job[0] / "mlruns", tmp_path / "mlruns")
    return tmp_path


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.strip()]


# --------------------------------------------------------------------------- bad input first


def left_in() -> list:
    """What a start left in the root it ran in (the working directory): the snapshot, the
    root's folders, whether a study database exists."""
    root = Path.cwd()
    return [snapshot(root), sorted(p.name for p in root.iterdir()),
            (root / "mlruns" / "optuna.db").exists()]


BAD_SWEEPS = {
    "replicates=0": (
        ["-m", *SMALL, "model.num_layers=1,2", "replicates=0"],
        "mlxlab: error: replicates=0: give a whole number >= 1 (seeds per config",
    ),
    "replicates=abc": (
        ["-m", *SMALL, "model.num_layers=1,2", "replicates=abc"],
        "mlxlab: error: replicates=abc: give a whole number >= 1",
    ),
    "n_trials=abc": (
        ["-m", *SEARCH, "hydra.sweeper.n_trials=abc"],
        "mlxlab: error: hydra.sweeper.n_trials=abc: give a whole number >= 1",
    ),
    "n_trials=0": (
        ["-m", *SEARCH, "hydra.sweeper.n_trials=0"],
        "mlxlab: error: hydra.sweeper.n_trials=0: give a whole number >= 1",
    ),
    "n_trials=-2": (
        ["-m", *SEARCH, "hydra.sweeper.n_trials=-2"],
        "mlxlab: error: hydra.sweeper.n_trials=-2: give a whole number >= 1",
    ),
    "max_epochs=two,3": (
        ["-m", *SMALL, "trainer.max_epochs=two,3"],
        "mlxlab: error: trainer.max_epochs must be an integer, got 'two': fix the override, e.g. "
        "trainer.max_epochs=4 (in the job trainer.max_epochs=two); nothing was started",
    ),
    "replicates-in-a-search": (
        ["-m", *SEARCH, "hydra.sweeper.n_trials=2", "replicates=3"],
        "mlxlab: error: replicates= is for grids; a search re-runs its best trials",
    ),
}


@pytest.fixture(scope="module")
def bad_sweeps(grid_with_a_failing_job, tmp_path_factory) -> dict[str, tuple[dict, list]]:
    """The bad sweep inputs in turn in one process (`python -m mlxlab.train`'s main) on a root
    holding the grid's store: {case: (the root's snapshot before, (exit status, stderr, what
    it left: left_in))}."""
    root = tmp_path_factory.mktemp("bad-sweeps")
    shutil.copytree(grid_with_a_failing_job[0] / "mlruns", root / "mlruns")
    before = snapshot(root)
    env = env_for(root)
    env.pop("MLFLOW_TRACKING_URI", None)
    done = each_in_one_process([["mlxlab-train", *args] for args, _ in BAD_SWEEPS.values()],
                               env, cwd=root, after="test_search_faults:left_in")
    return {case: (before, r) for case, r in zip(BAD_SWEEPS, done, strict=True)}


@pytest.mark.parametrize("case", BAD_SWEEPS)
def test_bad_sweep_input_is_one_line_and_leaves_the_store_unchanged(bad_sweeps, case):
    line = BAD_SWEEPS[case][1]
    before, (code, stderr, (after, folders, study)) = bad_sweeps[case]
    lines = [x for x in stderr.splitlines() if x.strip()]
    assert code == 2, stderr[-3000:]
    assert lines == [lines[0]] and lines[0].startswith(line), stderr[-3000:]
    assert after == before  # no parent run (the database's bytes), no study
    assert folders == ["mlruns"]  # no multirun/, no outputs/
    assert not study


@contextlib.contextmanager
def read_only(folder: Path):
    """`folder` read-only for the processes started inside: a read-only bind mount when this is
    root (permission bits do not stop root), else the bits."""
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [folder, *folder.rglob("*")]}
        for p in modes:
            p.chmod(0o555 if p.is_dir() else 0o444)
        try:
            yield
        finally:
            for p, mode in modes.items():
                p.chmod(mode)
        return
    mounted = subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"no read-only bind mount here: {mounted.stderr.decode().strip()}")
    try:
        remount = subprocess.run(
            ["mount", "-o", "remount,bind,ro", str(folder)], capture_output=True
        )
        if remount.returncode != 0:
            pytest.skip(f"no read-only remount here: {remount.stderr.decode().strip()}")
        yield
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def left_and_when() -> list:
    """An `after`: what the start left (left_in) and the time it ended."""
    return [*left_in(), time.monotonic()]


@pytest.fixture(scope="module")
def unwritable_store(grid_with_a_failing_job, tmp_path_factory) -> tuple[Path, dict, dict]:
    """A sweep and a single run started in turn in one process on a root whose copied store is
    read-only: (the root, its snapshot before, {case: (exit status, stderr, seconds it took,
    snapshot after, the root's names)}); the first case's seconds count the process start."""
    root = tmp_path_factory.mktemp("unwritable")
    shutil.copytree(grid_with_a_failing_job[0] / "mlruns", root / "mlruns")
    before = snapshot(root)
    cases = {"sweep": ["-m", *SMALL, "model.num_layers=1,2"], "single-run": SMALL}
    env = env_for(root)
    env.pop("MLFLOW_TRACKING_URI", None)
    with read_only(root / "mlruns"):
        started = time.monotonic()
        done = each_in_one_process([["mlxlab-train", *args] for args in cases.values()], env,
                                   cwd=root, after="test_search_faults:left_and_when")
    results = {}
    for case, (code, stderr, (after, folders, _, ended)) in zip(cases, done, strict=True):
        results[case] = (code, stderr, ended - started, after, folders)
        started = ended
    return root, before, results


@pytest.mark.parametrize("case", ["sweep", "single-run"])
def test_a_store_that_cannot_be_written_stops_within_seconds(unwritable_store, case):
    root, before, results = unwritable_store
    code, stderr, took, after, folders = results[case]
    assert code == 2, stderr[-3000:]
    (line,) = [x for x in stderr.splitlines() if x.strip()]  # was: every job trained untracked,
    assert line.startswith(  # ~310 lines of tracebacks
        f"mlxlab: error: MLflow store {root / 'mlruns' / 'mlflow.db'} cannot "
        "be written (OperationalError: attempt to write a readonly database)"
    )
    assert "tracking=none" in line
    assert took < 20, took  # a process start and one write: no training
    assert after == before and folders == ["mlruns"]


def test_a_corrupt_study_database_names_the_right_fix(root):
    db = root / "mlruns" / "optuna.db"
    db.write_bytes(b"this is not sqlite" * 1000)
    before = snapshot(root)
    proc = train(root, "-m", *SEARCH, "hydra.sweeper.n_trials=2")
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = error_lines(proc)
    assert "file is not a database" in line
    assert f"remove {db}" in line and "hydra.sweeper.storage=sqlite:///<new file>" in line
    assert "start the database" not in line  # was the fix it named
    assert snapshot(root) == before  # no parent run made before the study failed to open
    assert sorted(p.name for p in root.iterdir()) == ["mlruns"]


# --------------------------------------------------------------------------- a job that fails


def runs_of(client) -> list:
    return client.search_runs(
        [e.experiment_id for e in client.search_experiments()], max_results=1000
    )


def test_a_failed_jobs_reason_reaches_its_mlflow_run(grid_with_a_failing_job):
    _, client = grid_with_a_failing_job
    (failed,) = [
        r
        for r in runs_of(client)
        if r.info.status == "FAILED" and r.data.tags.get("mlxlab.role") != "sweep"
    ]
    assert failed.data.tags["mlxlab.error"] == (  # was "float: nan"
        "hidden_size=33 is not divisible by num_heads=2; pick num_heads that divides hidden_size"
    )


def test_a_grids_jobs_group_under_one_parent(grid_with_a_failing_job):
    """Both jobs of the grid (the one that trained and the one that failed) are child runs of
    its one parent run, each with the value it swept."""
    _, client = grid_with_a_failing_job
    runs = runs_of(client)
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(children) == 2 and len(parents) == 1
    assert parents[0].data.tags.get("mlxlab.role") == "sweep"
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    assert {int(r.data.params["model.hidden_size"]) for r in children} == {32, 33}
    assert sorted(r.info.status for r in children) == ["FAILED", "FINISHED"]


def test_a_failed_or_empty_sweep_is_never_latest(grid_with_a_failing_job, capsys):
    """Newer than the real sweep: a FAILED parent with no runs (what a refused start left
    before this check) and a FINISHED one with none (n_trials=-2 made it). `mlxlab runs list`
    in this process (the same reads; a process would add MLflow's import)."""
    from mlxlab.cli import runs_list

    root, client = grid_with_a_failing_job
    (good,) = [r for r in runs_of(client) if r.data.tags.get("mlxlab.role") == "sweep"]
    empty = []
    for status in ("FAILED", "FINISHED"):
        run = client.create_run(
            good.info.experiment_id, run_name=f"empty {status}", tags={"mlxlab.role": "sweep"}
        )
        client.set_terminated(run.info.run_id, status)
        empty.append(run.info.run_id)
    uri = f"sqlite:///{root}/mlruns/mlflow.db"
    assert runs_list.main(["--uri", uri, "--sweep", "latest"]) == 0
    assert capsys.readouterr().out.startswith(f"sweep {good.info.run_id} ")
    assert runs_list.main(["--uri", uri, "--sweep", empty[1]]) == 0  # was a TypeError
    assert "0 runs" in capsys.readouterr().out


# --------------------------------------------------------------------------- parallel starts


@pytest.mark.slow
def test_two_searches_started_at_the_same_moment_share_one_study(tmp_path):
    """Both processes wait at a file barrier until both are up, then start Hydra together on
    a fresh root (no store, no study): 8 trials in all, 8 parameter sets (the sampler's seed
    is fixed: each trial's is seed + its number), one parent, nothing RUNNING."""
    procs = starts.start_together([tmp_path, tmp_path], starts.search_args(8, 2), REPO / "src")
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[-3000:] for o in outputs]
    found = starts.check_round(tmp_path)
    assert (
        found["trials"],
        found["distinct"],
        found["parents"],
        found["running"],
        found["running_trials"],
    ) == (8, 8, 1, 0, 0), found


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("initdb") is None, reason="needs PostgreSQL's initdb and pg_ctl")
def test_two_searches_started_together_on_postgresql_make_n_trials(tmp_path):
    """The same on a real PostgreSQL server (as two machines would: each its own sweep folder,
    so its own parent run): the count and creation of a trial under the server's advisory lock."""
    from test_search import _postgres

    url = _postgres(tmp_path)
    args = [*starts.search_args(4, 2), f"hydra.sweeper.storage={url}"]
    procs = starts.start_together([tmp_path / "machine0", tmp_path / "machine1"], args, REPO / "src")
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[-3000:] for o in outputs]
    import optuna

    trials = optuna.load_study(study_name="debug", storage=url).trials
    assert len(trials) == 4 and all(t.state.is_finished() for t in trials)
    assert len({json.dumps(t.params, sort_keys=True) for t in trials}) == 4


# --------------------------------------------------------------------------- Ctrl-C of a search


LONG = ["trainer.max_epochs=50", "trainer.max_steps=400", "trainer.eval_every_steps=100"]


def ctrl_c_after_first_checkpoint(root: Path, *args: str) -> tuple[int, str]:
    """`mlxlab-train -m ARGS` in its own process group, sent SIGINT (what a terminal's Ctrl-C
    sends to the group, workers too) once job 0 has a checkpoint: (exit code, stderr)."""
    proc = subprocess.Popen(
        [PYTHON, "-m", "mlxlab.train", "-m", *args, *LONG],
        cwd=root,
        env=env_for(root),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while not list(root.glob("multirun/*/*/0/checkpoints/step_*")):
        assert time.monotonic() < deadline, "the first job never checkpointed"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


def parent_and_job_statuses(root: Path) -> tuple[list[str], list[str]]:
    from mlflow import MlflowClient

    runs = runs_of(MlflowClient(tracking_uri=f"sqlite:///{root}/mlruns/mlflow.db"))
    parents = [r.info.status for r in runs if r.data.tags.get("mlxlab.role") == "sweep"]
    return parents, [r.info.status for r in runs if r.data.tags.get("mlxlab.role") != "sweep"]


@pytest.mark.slow
def test_ctrl_c_of_a_search_ends_its_trial_runs_and_parent_killed(tmp_path):
    import optuna

    code, err = ctrl_c_after_first_checkpoint(tmp_path, *SEARCH, "hydra.sweeper.n_trials=3")
    assert code == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert "mlxlab: search stopped by a signal: trial(s) [0] marked FAIL" in err
    study = optuna.load_study(study_name="debug", storage=f"sqlite:///{tmp_path}/mlruns/optuna.db")
    (trial,) = study.trials
    assert trial.state.name == "FAIL"
    assert trial.user_attrs["fail_reason"].startswith("stopped by a signal (exit 130)")
    assert parent_and_job_statuses(tmp_path) == (["KILLED"], ["KILLED"])  # FAILED, RUNNING


@pytest.mark.slow
def test_ctrl_c_of_a_grid_ends_its_parent_killed(tmp_path):
    """A grid's job stopped by Ctrl-C saves, ends its run KILLED and exits 130; the sweep's
    parent ends KILLED too (the stop written into the sweep folder: sweeps/parent.py), not
    FAILED."""
    code, err = ctrl_c_after_first_checkpoint(tmp_path, *SMALL, "model.dropout=0.0,0.1")
    assert code == 130, err[-3000:]
    assert parent_and_job_statuses(tmp_path) == (["KILLED"], ["KILLED"])  # the parent was FAILED
