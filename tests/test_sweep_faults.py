"""A killed grid continues: real `mlxlab-train -m` processes on Titanic, 2 configs x 3 seeds,
killed (SIGKILL, or Ctrl-C's SIGINT) in the middle of the 4th job once it committed a checkpoint,
then the same command again: one parent, each (config, seed) FINISHED exactly once, the killed
job resumed into its own run from its checkpoint, nothing RUNNING, and `mlxlab runs compare
latest` agreeing with scipy on its per-seed values."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.stats as st
from mlflow import MlflowClient

from conftest import MLXLAB, PYTHON
from mlxlab.cli import runs_compare
from mlxlab.tracking import tags as T
from run_helpers import committed_steps, kill_when

# 6 jobs of 12 steps, a checkpoint every 3: a job is ~1 s of training after its start-up
GRID = [
    "-m",
    "trainer.max_epochs=1",
    "trainer.max_steps=12",
    "trainer.eval_every_steps=6",
    "trainer.log_every_steps=1",
    "trainer.schedule.warmup_steps=0",
    "trainer.batch_size=32",
    "callbacks.progress.enabled=false",
    "checkpoint.save_every_steps=3",
    "checkpoint.save_every_minutes=null",
    "model.num_layers=1",
    "model.num_heads=2",
    "data.max_length=48",
    "tracking.background=false",
    "optimizer.learning_rate=3e-3",
    "replicates=3",
    "model.pooler=null,true",
]
KILLED_JOB = "3"  # the 4th job


def env_for(root: Path) -> dict[str, str]:
    env = {
        **os.environ,
        "MLXLAB_ROOT": str(root),
        "PYTHONUNBUFFERED": "1",
        "OPENBLAS_NUM_THREADS": "1",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def start_sweep(root: Path, *extra: str, new_session: bool = False) -> subprocess.Popen:
    return subprocess.Popen(
        [PYTHON, "-m", "mlxlab.train", *GRID, *extra],
        cwd=root,
        env=env_for(root),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=new_session,  # its own process group: a launcher and its workers
    )


def sweep(root: Path, *extra: str) -> str:
    proc = start_sweep(root, *extra)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    return out


def job_dir(root: Path, job: str) -> Path | None:
    found = sorted((root / "multirun" / "train").glob(f"*/{job}"))
    return found[-1] if found else None


def killed_job_checkpointed(root: Path) -> bool:
    """The 4th job committed a checkpoint: the moment the tests stop the sweep."""
    folder = job_dir(root, KILLED_JOB)
    return folder is not None and bool(committed_steps(folder))


def interrupt_4th_job(root: Path, how: signal.Signals) -> tuple[Path, int, float]:
    """Start the sweep; stop it by `how` once its 4th job committed a checkpoint. Returns the
    job's folder, its newest committed step, and when the signal went."""
    proc = start_sweep(root)

    if how == signal.SIGKILL:
        kill_when(proc, lambda: killed_job_checkpointed(root), timeout=300)
        sent, out = time.time(), proc.stdout.read()
    else:
        deadline = time.time() + 300
        while not killed_job_checkpointed(root):
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.01)
        sent = time.time()
        proc.send_signal(how)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 128 + how, out[-3000:]
    folder = job_dir(root, KILLED_JOB)
    return folder, max(committed_steps(folder)), sent, out


def store(root: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{root}/mlruns/mlflow.db")


def check_finished_once(root: Path, out: str, kept: int, rerun: int = 0) -> list:
    """After the same command again: one parent, FINISHED, with each (config, seed) job
    FINISHED exactly once, `kept` of them kept (not run again), nothing RUNNING in the store,
    and `mlxlab runs compare latest` agreeing with scipy on its per-seed values. `rerun`: jobs
    killed before their first checkpoint, run again in a new run (the killed one stays KILLED,
    as history). Returns the parent's FINISHED children."""
    client = store(root)
    (experiment,) = [e for e in client.search_experiments() if e.name == "train"]
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get(T.ROLE) == "sweep"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get(T.PARENT_RUN) == parents[0].info.run_id]
    history = [r for r in children if r.info.status != "FINISHED"]
    assert len(history) == rerun, [(r.info.run_id, r.info.status) for r in history]
    assert {(r.info.status, r.data.tags[T.RESUMABLE]) for r in history} <= {("KILLED", "false")}
    children = [r for r in children if r.info.status == "FINISHED"]
    jobs = sorted((r.data.params["model.pooler"], r.data.params["seed"]) for r in children)
    assert jobs == sorted((p, s) for p in ("None", "True") for s in ("42", "43", "44"))
    assert not [
        r for r in client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'")
    ]
    assert out.count("kept, not run again") == kept, out[-4000:]

    # `mlxlab runs compare` in this process: the same verb on the same store (a process would
    # add its start-up; the sweeps above are the processes under test)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = runs_compare.main(["latest", "--uri", f"sqlite:///{root}/mlruns/mlflow.db",
                                  "--metric", "val/loss", "--json"])
    assert code == 0, printed.getvalue()[-3000:]
    result = json.loads(printed.getvalue()[printed.getvalue().index("{") :])
    (c,) = result["comparisons"]
    per_seed = {
        p: {
            r.data.params["seed"]: r.data.metrics["best/val/loss"]
            for r in children
            if r.data.params["model.pooler"] == p
        }
        for p in ("None", "True")
    }
    a = np.array([per_seed["None"][s] for s in sorted(per_seed["None"])])
    b = np.array([per_seed["True"][s] for s in sorted(per_seed["True"])])
    assert c["n_pairs"] == 3
    assert c["t_p"] == pytest.approx(st.ttest_rel(b, a).pvalue)
    assert c["wilcoxon_p"] == pytest.approx(st.wilcoxon(b, a, method="exact").pvalue)
    return children


def check_continued(root: Path, folder: Path, step: int, continued_at: float, out: str) -> None:
    """After the same command again: every job FINISHED once with three kept (check_finished_once),
    and the killed job resumed into its own run, its metric history unbroken."""
    children = check_finished_once(root, out, kept=3)
    (resumed,) = [r for r in children if r.data.tags[T.RUN_DIR] == str(folder)]
    assert f"its run {resumed.info.run_id} resumes from {folder}" in out
    # the killed run's own history goes on: every step once, those after the checkpoint logged
    # by the continuing command, the first of them the checkpoint's step + 1
    history = store(root).get_metric_history(resumed.info.run_id, "train/loss")
    assert sorted(p.step for p in history) == list(range(1, 13))
    after = sorted(p.step for p in history if p.timestamp / 1000 > continued_at)
    assert after[0] == step + 1 and after == list(range(step + 1, 13))


@pytest.mark.slow  # the default run's 10-minute budget; run with -m slow
def test_a_sigkilled_grid_continues_with_the_same_command(tmp_path):
    folder, step, _, _ = interrupt_4th_job(tmp_path, signal.SIGKILL)
    client = store(tmp_path)
    assert {
        r.info.status
        for r in client.search_runs([client.get_experiment_by_name("train").experiment_id])
    } == {"FINISHED", "RUNNING"}
    continued_at = time.time()
    out = sweep(tmp_path)  # the same command
    check_continued(tmp_path, folder, step, continued_at, out)
    (parent,) = client.search_runs(
        [client.get_experiment_by_name("train").experiment_id], f"tags.`{T.ROLE}` = 'sweep'"
    )
    # its launcher died: said when the continuing command marked it; the FINISHED parent no
    # longer says it was killed, nor does the resumed job's run
    assert f"MLflow run {parent.info.run_id} was left RUNNING: marked KILLED (process " in out
    resumed = client.search_runs([parent.info.experiment_id], f"tags.`{T.RUN_DIR}` = '{folder}'")
    for run in (parent, *resumed):
        assert not {T.KILLED_AT, T.KILLED_REASON, T.RESUMABLE} & set(run.data.tags), run.data.tags
    again = sweep(tmp_path)  # a finished sweep: one line, nothing trained
    assert (
        f"sweep {parent.info.run_id} ({folder.parent}) already finished; add "
        "sweep.fresh=true to start a new one" in again
    )
    assert len(client.search_runs([parent.info.experiment_id])) == 7


@pytest.mark.slow
def test_ctrl_c_ends_the_parent_killed_and_prints_the_command_that_continues(tmp_path):
    folder, step, _, out = interrupt_4th_job(tmp_path, signal.SIGINT)
    client = store(tmp_path)
    (parent,) = client.search_runs(
        [client.get_experiment_by_name("train").experiment_id], f"tags.`{T.ROLE}` = 'sweep'"
    )
    assert parent.info.status == "KILLED", out[-3000:]
    assert parent.data.tags[T.KILLED_REASON] == "a job was stopped by SIGINT"
    hint = next(line for line in out.splitlines() if "stopped by SIGINT; checkpoint:" in line)
    assert hint.endswith("with the same command: python -m mlxlab.train " + " ".join(GRID))
    assert "resume=auto" not in hint
    continued_at = time.time()
    check_continued(tmp_path, folder, step, continued_at, sweep(tmp_path))


def closing(root: Path) -> bool:
    """Every job's run FINISHED while the sweep's parent is still RUNNING: the launcher is in
    its closing step (the last job's outcome, the summary, groups, verdict, the parent's end).
    Read with sqlite itself: a frozen writer's lock makes it answer False, not wait."""
    import sqlite3

    try:
        with contextlib.closing(
            sqlite3.connect(f"file:{root}/mlruns/mlflow.db?mode=ro", uri=True, timeout=0.05)
        ) as db:
            parent = db.execute(
                "SELECT r.run_uuid, r.status FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
                "WHERE t.key = ? AND t.value = 'sweep'",
                (T.ROLE,),
            ).fetchall()
            if len(parent) != 1 or parent[0][1] != "RUNNING":
                return False
            (finished,) = db.execute(
                "SELECT COUNT(*) FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
                "WHERE t.key = ? AND t.value = ? AND r.status = 'FINISHED'",
                (T.PARENT_RUN, parent[0][0]),
            ).fetchone()
            return finished == 6
    except sqlite3.Error:  # not made yet, or locked by the frozen launcher
        return False


@pytest.mark.slow
def test_a_grid_killed_while_its_parent_closes_finishes_with_the_same_command(tmp_path):
    """SIGKILL of the launcher after its 6 jobs finished, while the parent run closes (kill_when
    freezes it and checks again, so the kill lands in that step); the same command keeps every job,
    ends the parent FINISHED, leaves nothing RUNNING."""
    proc = start_sweep(tmp_path)
    kill_when(proc, lambda: closing(tmp_path), timeout=400)
    proc.stdout.read()
    client = store(tmp_path)
    (parent,) = client.search_runs(
        [client.get_experiment_by_name("train").experiment_id], f"tags.`{T.ROLE}` = 'sweep'"
    )
    assert parent.info.status == "RUNNING"  # killed before its end: the closing step's kill
    out = sweep(tmp_path)  # the same command
    check_finished_once(tmp_path, out, kept=6)
    assert "resumes from" not in out  # nothing trained again


# launchers that run jobs in other processes: joblib's workers (two jobs at once), and
# submitit's local executor (each job its own process, all at once; its logs in the sweep
# folder's .submitit/, the launcher's output has none of the jobs' lines)
LAUNCHERS = [
    pytest.param(("hydra/launcher=joblib", "hydra.launcher.n_jobs=2"), id="joblib"),
    pytest.param(
        ("hydra/launcher=submitit_local", "hydra.launcher.timeout_min=15"),
        id="submitit_local",
        marks=pytest.mark.skipif(
            importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None,
            reason="needs the slurm extra: pip install -e '.[slurm]'",
        ),
    ),
]


def submitit_logs(root: Path) -> dict[Path, str]:
    """The jobs' own logs a submitit launch wrote (one folder per job)."""
    return {p: p.read_text() for p in (root / "multirun").glob("*/*/.submitit/*/*_log.*")}


@pytest.mark.slow
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_a_grid_killed_with_its_workers_continues_with_the_same_command(tmp_path, launcher):
    """A launcher whose jobs run in other processes, its process group SIGKILLed (the launcher
    and its workers: a closed laptop, an OOM kill of the session) once the 4th job committed a
    checkpoint; the same command again: each job that had committed one resumes into its own
    run, one killed before its first runs again, finished ones are kept; each dead run marked
    KILLED once (a resumed run is never judged by its killed process while a sibling job starts
    beside it), nothing RUNNING, `runs compare latest` exits 0."""
    proc = start_sweep(tmp_path, *launcher, new_session=True)
    kill_when(proc, lambda: killed_job_checkpointed(tmp_path), timeout=300, group=True)
    proc.stdout.read()
    client = store(tmp_path)
    experiment_id = client.get_experiment_by_name("train").experiment_id
    runs = client.search_runs([experiment_id])
    finished = [r for r in runs if r.info.status == "FINISHED"]
    running = [r for r in runs if r.info.status == "RUNNING"]
    resumable = {
        r.info.run_id: r.data.tags[T.RUN_DIR]
        for r in running
        if r.data.tags.get(T.RUN_DIR) and committed_steps(Path(r.data.tags[T.RUN_DIR]))
    }
    assert len(running) >= 3 and str(job_dir(tmp_path, KILLED_JOB)) in resumable.values()
    # a job killed before its parent tag (right after its run was made) is no child: no re-run
    rerun = len([r for r in running if r.data.tags.get(T.PARENT_RUN)]) - len(resumable)
    earlier = submitit_logs(tmp_path)

    out = sweep(tmp_path, *launcher)  # the same command
    out += "".join(text for p, text in submitit_logs(tmp_path).items() if p not in earlier)
    children = check_finished_once(tmp_path, out, kept=len(finished), rerun=rerun)
    for run_id, folder in resumable.items():
        assert f"its run {run_id} resumes from {folder}" in out
        assert run_id in {r.info.run_id for r in children}
    assert out.count("was left RUNNING: marked KILLED") == len(running), out[-4000:]


def test_resume_on_a_multirun_is_refused_before_anything_starts(tmp_path):
    proc = subprocess.run(
        [PYTHON, "-m", "mlxlab.train", *GRID, "resume=auto"],
        cwd=tmp_path,
        env=env_for(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith(
            "mlxlab: error: resume=auto on a --multirun would continue every job from one run;"
        )
    )
    assert not (tmp_path / "multirun").exists() and not (tmp_path / "mlruns").exists()


@pytest.mark.slow
def test_a_continued_grid_says_what_an_uninterrupted_one_says(tmp_path):
    """The groups and the verdict of a grid killed in its 4th job and continued equal an
    uninterrupted grid's with the same seeds: every per-seed value bitwise."""
    killed_root, whole_root = tmp_path / "killed", tmp_path / "whole"
    killed_root.mkdir()
    whole_root.mkdir()
    interrupt_4th_job(killed_root, signal.SIGKILL)
    sweep(killed_root)
    sweep(whole_root)

    def outcome(root: Path) -> tuple[dict, dict, dict]:
        client = store(root)
        experiment = client.get_experiment_by_name("train")
        (parent,) = client.search_runs([experiment.experiment_id], f"tags.`{T.ROLE}` = 'sweep'")
        children = client.search_runs(
            [experiment.experiment_id], f"tags.`{T.PARENT_RUN}` = '{parent.info.run_id}'"
        )
        values = {
            (r.data.params["model.pooler"], r.data.params["seed"]): (
                r.data.metrics["best/val/loss"],
                r.data.metrics["val/accuracy"],
            )
            for r in children
        }
        groups = {k: v for k, v in parent.data.metrics.items() if k.startswith(("g1/", "g2/"))}
        verdict = {k: parent.data.tags[k] for k in (T.VERDICT, T.LEADER)}
        return values, groups, verdict

    continued, whole = outcome(killed_root), outcome(whole_root)
    assert len(continued[0]) == 6 and continued[0] == whole[0]  # bitwise, seed by seed
    assert continued[1] == whole[1] and continued[2] == whole[2]


def test_a_job_whose_run_still_runs_is_refused_not_trained_twice(tmp_path, make_cfg):
    """A worker that outlived its killed launcher (or a run of another host with a fresh
    heartbeat) is RUNNING under the parent: the same command must not train that job beside it
    (two runs of one job) nor resume into it (two writers): the plan is `busy`. A FINISHED run
    of the config is kept, a KILLED one without a checkpoint runs again."""
    from mlxlab.config import config_hash
    from mlxlab.sweeps.jobs import plan_job

    cfg = make_cfg("tracking=none")
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    experiment = client.create_experiment("busy")
    parent = client.create_run(experiment, run_name="sweep").info.run_id

    def child(status: str) -> str:
        run = client.create_run(experiment, tags={T.PARENT_RUN: parent,
                                                  T.CONFIG_HASH: config_hash(cfg),
                                                  T.RUN_DIR: str(tmp_path / "job")})
        if status != "RUNNING":
            client.set_terminated(run.info.run_id, status)
        return run.info.run_id

    killed = child("KILLED")
    assert plan_job(client, parent, cfg).action == "run"  # no checkpoint in its folder
    running = child("RUNNING")
    plan = plan_job(client, parent, cfg)
    assert (plan.action, plan.run_id) == ("busy", running) and running != killed
    client.set_terminated(running, "FINISHED")
    assert plan_job(client, parent, cfg).action == "keep"


def grid_args(**changes: str) -> list[str]:
    """GRID with some of its keys set otherwise (`replicates`, ...: the key with `.` as `__`)."""
    changed = {key.replace("__", "."): value for key, value in changes.items()}
    out = [a for a in GRID if a.split("=", 1)[0] not in changed]
    return [*out, *(f"{k}={v}" for k, v in changed.items())]


def run_grid(root: Path, args: list[str]) -> str:
    proc = subprocess.run([PYTHON, "-m", "mlxlab.train", *args], cwd=root, env=env_for(root),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_a_grown_sweep_adopts_its_finished_jobs_and_trains_only_the_new_ones(tmp_path):
    """A grid with replicates=2, then replicates=3 (one more seed), then another learning rate: each
    grown sweep keeps (adopts) the jobs already FINISHED under the same config and seed, trains only
    its new ones, says so, and `runs compare` sees the whole grown sweep."""
    run_grid(tmp_path, grid_args(replicates="2"))
    grown = run_grid(tmp_path, grid_args(replicates="3"))
    assert grown.count("adopted, not run again") == 4, grown[-4000:]
    assert "sweep: 4 of 6 jobs adopted from earlier sweeps" in grown
    wider = run_grid(tmp_path, grid_args(replicates="3", optimizer__learning_rate="3e-3,1e-3"))
    assert wider.count("adopted, not run again") == 6, wider[-4000:]

    client = store(tmp_path)
    experiment = client.get_experiment_by_name("train")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    jobs = [r for r in runs if r.data.tags.get(T.ROLE) != "sweep"]
    trained = sorted((r.data.params["optimizer.learning_rate"], r.data.params["model.pooler"],
                      r.data.params["seed"]) for r in jobs)
    # every (config, seed) trained once: 4 + 2 + 6 runs, not 4 + 6 + 12
    assert trained == sorted((lr, p, s) for lr in ("0.003", "0.001") for p in ("None", "True")
                             for s in ("42", "43", "44"))
    assert {r.info.status for r in runs} == {"FINISHED"}
    from mlxlab.sweeps.store import sweep_children

    parents = sorted((r for r in runs if r.data.tags.get(T.ROLE) == "sweep"),
                     key=lambda r: r.info.start_time)
    assert [len(sweep_children(client, p.info.run_id)) for p in parents] == [4, 6, 12]
    assert parents[-1].data.tags[T.NUM_FINISHED] == "12"
    compared = subprocess.run(
        [MLXLAB, "runs", "compare", "latest", "--metric", "val/loss", "--json"], cwd=tmp_path,
        env=env_for(tmp_path), capture_output=True, text=True, timeout=300)
    assert compared.returncode == 0, compared.stderr[-3000:]
    result = json.loads(compared.stdout[compared.stdout.index("{"):])
    assert {c["n_pairs"] for c in result["comparisons"]} == {3}
