"""Runs that are killed or stopped resume as if nothing had happened (real subprocesses)."""

from __future__ import annotations

import json
import math
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from conftest import MLXLAB, PYTHON, same_array, same_values
from run_helpers import (
    STREAMING,
    TITANIC,
    committed_steps,
    final_weights,
    kill_when,
    run,
    start,
)
from test_csv_tracking import assert_same_csv_metrics


def run_id_of(run_dir: Path) -> str:
    last = max(committed_steps(run_dir))
    return json.loads((run_dir / "checkpoints" / f"step_{last:08d}" / "state.json").read_text())["run_id"]


TIMING = ("train/samples_per_sec", "train/tokens_per_sec")  # wall-clock rates: steps only
MEASURED = "system/"  # the process's memory (training/memory_watch.py): steps only, like rates


def metric_history(uri: str, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """Every metric of one MLflow run as [(step, value)] by step; a step logged twice fails."""
    client = MlflowClient(uri)
    history = {}
    for key in sorted(client.get_run(run_id).data.metrics):
        rows = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        steps = [step for step, _ in rows]
        assert len(steps) == len(set(steps)), f"{key}: steps logged twice: {steps}"
        measured = key in TIMING or key.startswith(MEASURED)
        history[key] = [(step, math.nan if measured else value) for step, value in rows]
    return history


def final_state(run_dir: Path) -> dict:
    last = max(committed_steps(run_dir))
    return json.loads((run_dir / "checkpoints" / f"step_{last:08d}" / "state.json").read_text())


def assert_same_history(uri: str, reference: Path, resumed: Path, label: str) -> None:
    """MLflow values and steps, the history in state.json and the loss-curve data all equal an
    uninterrupted run's (rates per second are compared by step only)."""
    expected, got = metric_history(uri, run_id_of(reference)), metric_history(uri, run_id_of(resumed))
    assert got.keys() == expected.keys(), label
    for key in expected:
        assert [s for s, _ in got[key]] == [s for s, _ in expected[key]], f"{label}: {key} steps"
        # bitwise on the CPU, to GPU_RTOL on a GPU (conftest.same_values)
        same = same_values([v for _, v in got[key]], [v for _, v in expected[key]])
        assert same, f"{label}: {key} differs:\n{got[key]}\nvs uninterrupted\n{expected[key]}"
    # state.json's history is what the loss-curve PNG is drawn from
    assert same_values(final_state(resumed)["history"], final_state(reference)["history"]), label


def assert_same_weights(reference: Path, resumed: Path, label: str) -> None:
    """Bitwise on the CPU; to GPU_RTOL on a GPU, whose kernels are not reproducible to the bit."""
    expected, got = final_weights(reference), final_weights(resumed)
    assert expected.keys() == got.keys()
    for key in expected:
        assert same_array(expected[key], got[key]), f"{label}: {key} differs after resume"


def tmp_dirs(run_dir: Path) -> list[Path]:
    return list((run_dir / "checkpoints").glob(".tmp-step_*"))


def resumed_step(output: str) -> int:
    return int(re.search(r"resumed from \S+ at step (\d+)", output).group(1))


@pytest.mark.parametrize(
    ("name", "args", "log_every"),
    [("titanic", TITANIC, 5),
     pytest.param("titanic-grad-accum", [*TITANIC, "trainer.grad_accum=2",
                                         "trainer.max_epochs=6"], 5, marks=pytest.mark.slow),
     pytest.param("streaming", [*STREAMING, "trainer.max_steps=36"], 5, marks=pytest.mark.slow)],
)
def test_sigkills_keep_weights_and_history_exact(tmp_path, cli_env, name, args, log_every):
    """Killed during a checkpoint write, resumed, killed again, resumed: the weights are bitwise
    those of an uninterrupted run, and so is the whole metric history (MLflow, state.json, plot),
    with resumes from checkpoints that are not on a multiple of log_every_steps. The per-example
    losses (callbacks=per_example_losses, a background thread) are the same parquet rows too, and
    the CSV files beside MLflow (tracking=[mlflow,csv]) hold one uninterrupted record."""
    args = [*args, f"trainer.log_every_steps={log_every}", "callbacks=per_example_losses",
            "tracking=[mlflow,csv]"]
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    reference = tmp_path / "reference"
    run(args, reference, cli_env)
    total = max(committed_steps(reference))

    def latest(run_dir: Path) -> int:
        return max(committed_steps(run_dir), default=0)

    # Kill 1: while a checkpoint is being written, after metrics past the last commit were flushed.
    first = tmp_path / "first"
    proc = start(args, first, cli_env)
    kill_when(proc, lambda: bool(tmp_dirs(first)) and latest(first) >= 9
              and latest(first) % log_every != 0)
    assert tmp_dirs(first), "not killed mid-write"
    killed_at = latest(first)
    logged = MlflowClient(uri).get_metric_history(run_id_of(first), "train/loss")
    assert max(m.step for m in logged) > killed_at  # the store ran ahead of the checkpoint

    # Kill 2: the resumed run, later, again at a step that is not a multiple of log_every_steps.
    second = tmp_path / "second"
    proc = start([*args, f"resume={first}"], second, cli_env)
    kill_when(proc, lambda: latest(second) >= killed_at + 9 and latest(second) % log_every != 0)
    assert latest(second) < total

    third = tmp_path / "third"
    out = run([*args, f"resume={second}"], third, cli_env)
    assert resumed_step(out.stdout) % log_every != 0

    assert_same_weights(reference, third, name)
    assert run_id_of(third) == run_id_of(first)  # every resume appends to the first run
    assert_same_history(uri, reference, third, name)
    png = "plots/loss_curve.png"
    assert (third / png).read_bytes() == (reference / png).read_bytes()
    assert_same_per_example_losses(uri, reference, third, name)
    assert_same_csv_metrics(reference / "tracking", third / "tracking")


def assert_same_per_example_losses(uri: str, reference: Path, resumed: Path, label: str) -> None:
    """The per_example parquet artifacts of the resumed MLflow run (written by the killed and the
    resumed processes) hold exactly the rows of the uninterrupted run's."""
    import pandas as pd
    from mlflow.artifacts import download_artifacts

    def frames(run_dir: Path) -> dict[str, pd.DataFrame]:
        local = Path(download_artifacts(run_id=run_id_of(run_dir), artifact_path="per_example",
                                        dst_path=str(run_dir / "downloaded"), tracking_uri=uri))
        return {f.name: pd.read_parquet(f) for f in sorted(local.glob("*.parquet"))}

    expected, got = frames(reference), frames(resumed)
    epochs = 1 if label == "streaming" else 2  # a stream has no epochs: one file at the end
    assert got.keys() == expected.keys() and len(expected) >= epochs, (label, got.keys())
    for name in expected:
        pd.testing.assert_frame_equal(got[name], expected[name], check_exact=True, obj=name)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "args", "kill_after"),
    [("titanic-mid-epoch", TITANIC, 5),  # the default run keeps one; the others are slow
     pytest.param("titanic-next-epoch", TITANIC, 15, marks=pytest.mark.slow),
     pytest.param("streaming", STREAMING, 7, marks=pytest.mark.slow),
     # the curriculum's draws and token counts, and a remapped vocabulary, resume too
     pytest.param("titanic-curriculum", [*TITANIC, "data.curriculum={score: rarity}"], 5,
                  marks=pytest.mark.slow),
     pytest.param("streaming-curriculum-vocab-remap", [
         *STREAMING, "data.curriculum={score: length}", "data.vocab_remap.mode=used"], 7,
         marks=pytest.mark.slow)],
)
def test_sigkill_then_resume_is_bitwise_identical(tmp_path, cli_env, name, args, kill_after):
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    reference = tmp_path / "reference"
    run(args, reference, cli_env)

    killed = tmp_path / "killed"
    proc = start(args, killed, cli_env)
    kill_when(proc, lambda: any(s >= kill_after for s in committed_steps(killed)))
    assert max(committed_steps(killed)) < max(committed_steps(reference))

    resumed = tmp_path / "resumed"
    run([*args, f"resume={killed}"], resumed, cli_env)
    assert_same_weights(reference, resumed, name)
    assert run_id_of(resumed) == run_id_of(killed)  # the resumed run appends to the killed one
    assert_same_history(uri, reference, resumed, name)


def test_sigterm_checkpoints_marks_killed_and_resume_auto_finishes(tmp_path, cli_env):
    args = [*TITANIC, "checkpoint.save_every_steps=null", "trainer.max_epochs=40",
            "task_name=sigterm"]
    run_dir = tmp_path / "outputs" / "sigterm" / "first"
    run_dir.parent.mkdir(parents=True)
    proc = start(args, run_dir, cli_env)
    while not (run_dir / "checkpoints").is_dir():  # the first epoch-end checkpoint
        assert proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "SIGTERM received" in err
    stopped_at = max(committed_steps(run_dir))
    assert stopped_at % 12 != 0 or stopped_at > 12  # the emergency checkpoint, not only epoch ends

    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name("sigterm")
    [killed_run] = client.search_runs([exp.experiment_id])
    assert killed_run.info.status == "KILLED"

    again = tmp_path / "outputs" / "sigterm" / "second"
    out = run([*args, "trainer.max_epochs=4", "resume=auto"], again, cli_env)
    assert max(committed_steps(again)) == 48
    [finished] = client.search_runs([exp.experiment_id])
    assert finished.info.run_id == killed_run.info.run_id
    assert finished.info.status == "FINISHED"
    assert finished.data.tags.get("resume.changed.trainer.max_epochs") == "40 -> 4"
    assert "resume: trainer.max_epochs changed" in out.stdout + out.stderr


def start_merged(args: list[str], run_dir: Path, env: dict) -> subprocess.Popen:
    """Like start(), with the log (stdout) and errors in one pipe read line by line."""
    return subprocess.Popen(
        [PYTHON, "-m", "mlxlab.train", *args, f"hydra.run.dir={run_dir}"], cwd=run_dir.parent,
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def kill_at_line(proc: subprocess.Popen, text: str) -> str:
    """SIGKILL `proc` as soon as it prints a line containing `text`; returns what it printed."""
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if text in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert text in "".join(seen), "".join(seen)[-3000:]
    return "".join(seen)


@pytest.mark.slow  # resume=auto also in test_sigterm_checkpoints_marks_killed_and_resume_auto_finishes
def test_resume_auto_takes_the_highest_committed_step_not_the_newest_folder(tmp_path, cli_env):
    """R1 is killed after a periodic checkpoint past its best/; R2 (resume=auto) adopts R1's
    best/ into its own folder and is killed before its first checkpoint; R3 (resume=auto) must
    continue from R1's newest checkpoint, not from the copy of best/ in the newer R2 folder."""
    args = [*TITANIC, "task_name=autopick", "trainer.max_epochs=6", "tracking=none"]
    outputs = tmp_path / "outputs" / "autopick"
    outputs.mkdir(parents=True)
    r1 = outputs / "r1"
    proc = start(args, r1, cli_env)
    kill_when(proc, lambda: (r1 / "checkpoints" / "best" / "COMMITTED").exists()
              and max(committed_steps(r1)) > 12)  # best/ is step 12 (the first evaluation)
    r1_step = max(committed_steps(r1))

    r2 = outputs / "r2"
    kill_at_line(start_merged([*args, "resume=auto"], r2, cli_env), "resumed from")
    assert committed_steps(r2) == [] and (r2 / "checkpoints" / "best" / "COMMITTED").exists()

    r3 = outputs / "r3"
    out = kill_at_line(start_merged([*args, "resume=auto"], r3, cli_env), "resumed from")
    assert f"resumed from {r1}/checkpoints/step_{r1_step:08d} at step {r1_step}" in out, out[-3000:]
    assert re.search(rf"skipped {r2} \(the newest run folder\): its newest committed checkpoint "
                     rf"is best at step 12, behind step {r1_step}", out), out[-3000:]


def unlocked(read):
    """read(), again while another process holds the sqlite store's write lock (runs of the
    test write to the store it reads)."""
    for _ in range(100):
        try:
            return read()
        except MlflowException as e:
            if "database is locked" not in str(e):
                raise
            time.sleep(0.1)
    raise AssertionError("the store stayed locked for 10 s")


@pytest.mark.slow
def test_runs_killed_before_a_checkpoint_are_marked_killed(tmp_path, cli_env):
    """A run SIGKILLed before its first checkpoint is RUNNING in the store; `mlxlab runs
    list` and the next start of the task mark it KILLED with the reason; a live run of the task
    stays RUNNING."""
    from mlxlab.tracking import tags as T

    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    client = MlflowClient(uri)
    # batch_size=2: ~350 steps before the first (epoch-end) checkpoint
    args = [*TITANIC, "task_name=doomed", "trainer.batch_size=2", "trainer.max_epochs=1000",
            "checkpoint.save_every_steps=null"]

    def run_of(run_dir: Path):
        if not (tmp_path / "mlruns" / "mlflow.db").exists():
            return None
        exp = unlocked(lambda: client.get_experiment_by_name("doomed"))
        runs = unlocked(lambda: client.search_runs(
            [exp.experiment_id], f"tags.`mlxlab.run_dir` = '{run_dir}'")) if exp else []
        return runs[0] if runs else None

    def started(name: str) -> tuple[subprocess.Popen, Path]:
        run_dir = tmp_path / name
        return start(args, run_dir, cli_env), run_dir

    def wait_registered(proc: subprocess.Popen, run_dir: Path) -> None:
        deadline = time.time() + 300
        while run_of(run_dir) is None:
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.05)

    def killed_before_checkpoint(name: str) -> str:
        proc, run_dir = started(name)
        # the store is read before the kill, not while the run is frozen: a run frozen in the
        # middle of a write holds the store's lock
        wait_registered(proc, run_dir)
        kill_when(proc, lambda: not committed_steps(run_dir))
        assert run_of(run_dir).info.status == "RUNNING"
        return run_of(run_dir).info.run_id

    first = killed_before_checkpoint("first")
    listing = subprocess.run([MLXLAB, "runs", "list", "--uri", uri],
                             env=cli_env, capture_output=True, text=True, timeout=300)
    assert listing.returncode == 0, listing.stderr[-2000:]
    marked = unlocked(lambda: client.get_run(first))
    assert marked.info.status == "KILLED"
    assert "is gone" in marked.data.tags[T.KILLED_REASON]
    assert marked.data.tags[T.RESUMABLE] == "false" and marked.data.tags[T.KILLED_AT]

    live, live_dir = started("live")
    try:
        wait_registered(live, live_dir)
        second = killed_before_checkpoint("second")
        run([*TITANIC, "task_name=doomed", "trainer.max_steps=1"], tmp_path / "next", cli_env)
        assert unlocked(lambda: client.get_run(second)).info.status == "KILLED"
        assert run_of(live_dir).info.status == "RUNNING"
    finally:
        live.kill()
        live.wait()


@pytest.mark.slow
def test_tracking_none_resume_does_not_claim_the_source_mlflow_run(tmp_path, cli_env):
    args = [*TITANIC, "trainer.max_epochs=1"]
    source = tmp_path / "source"
    run(args, source, cli_env)
    source_id = run_id_of(source)
    out = run([*args, "trainer.max_epochs=2", "tracking=none", f"resume={source}"],
              tmp_path / "again", cli_env)
    assert "mlflow run: - (tracking=none)" in out.stdout
    assert source_id not in out.stdout + out.stderr
    assert run_id_of(tmp_path / "again") == source_id  # a later tracked resume continues it


@pytest.mark.slow
def test_resume_on_other_data_reports_it_and_resets_the_best_metric(tmp_path, cli_env):
    """Changed data and seed are reported like changed hyperparameters, and best/ metrics are
    measured on the new validation set only, never compared across data sets."""
    rng = np.random.default_rng(0)
    letters = np.array(list("qxzjkvwy"))
    other = tmp_path / "noise.txt"  # far harder than the stories: its val/loss is far higher
    other.write_text("\n\n".join(" ".join("".join(rng.choice(letters, 5)) for _ in range(30))
                                 for _ in range(200)) + "\n")
    args = [*STREAMING, "trainer.eval_every_steps=6", "checkpoint.save_every_steps=null"]
    first = tmp_path / "first"
    run([*args, "trainer.max_steps=6"], first, cli_env)
    out = run([*args, "trainer.max_steps=12", f"resume={first}", f"data.source.data_files={other}",
               "data.packing.seq_len=16", "seed=7"], tmp_path / "second", cli_env)
    log = out.stdout + out.stderr
    for change in ("data.source.data_files changed", "data.packing.seq_len changed 32 -> 16",
                   "seed changed 42 -> 7", "the validation set changed"):
        assert f"resume: {change}" in log, log[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    mlflow_run = client.get_run(run_id_of(first))
    tags, metrics = mlflow_run.data.tags, mlflow_run.data.metrics
    assert tags["resume.changed.seed"] == "42 -> 7"
    assert tags["resume.changed.data.packing.seq_len"] == "32 -> 16"
    assert "resume.changed.validation_set" in tags
    val = {m.step: m.value for m in client.get_metric_history(run_id_of(first), "val/loss")}
    assert val[12] > val[6]  # the new data is harder ...
    assert metrics["best/best_step"] == 12 and metrics["best/val/loss"] == val[12]  # ... yet best


def test_resume_auto_stays_in_the_newest_folders_run(tmp_path):
    """resume=auto takes the highest committed step among the folders continuing the newest
    folder's MLflow run: not the copy of best/ in a newer folder, nor an unrelated longer run."""
    import os

    import mlx.nn as nn

    from mlxlab.checkpoint import CheckpointManager
    from mlxlab.runs import latest_run_with_checkpoints

    model, task = nn.Linear(2, 2), tmp_path / "outputs" / "t"

    def folder(name: str, run_id: str, steps: list[int], age: int) -> Path:
        manager = CheckpointManager(task / name / "checkpoints", monitor="val/loss", mode="min")
        for step in steps:  # the first is the best (lowest loss), later ones only periodic
            manager.save(model, None, {"step": step, "run_id": run_id}, metric=float(step))
        os.utime(task / name, (time.time() - age,) * 2)
        return task / name

    folder("unrelated", "X", [100], age=300)
    r1 = folder("r1", "A", [50, 60], age=200)
    r2 = task / "r2"
    CheckpointManager(r2 / "checkpoints").adopt_best(r1 / "checkpoints")  # killed at once
    here = tmp_path / "outputs" / "t" / "now"
    assert latest_run_with_checkpoints(tmp_path, "t", here) == r1.resolve()
    fresh = folder("fresh", "B", [10], age=0)  # a new run killed early: continue it
    assert latest_run_with_checkpoints(tmp_path, "t", here) == fresh.resolve()


def test_resume_auto_continues_only_a_run_of_the_same_objective(tmp_path):
    """Two kinds of run in one task (the default classifier and a GRPO run both in task `train`):
    resume=auto continues the newest run of its own objective, never the other kind's."""
    import os

    import mlx.nn as nn

    from mlxlab.checkpoint import CheckpointManager
    from mlxlab.runs import latest_run_with_checkpoints

    model, task = nn.Linear(2, 2), tmp_path / "outputs" / "train"
    supervised = "mlxlab.objectives.supervised.Supervised"
    grpo = "mlxlab.objectives.rl.grpo.GRPO"

    def folder(name: str, run_id: str, objective: str, age: int) -> Path:
        manager = CheckpointManager(task / name / "checkpoints", monitor="val/loss", mode="min")
        manager.save(model, None, {"step": 10, "run_id": run_id,
                                   "config": {"objective": {"_target_": objective}}}, metric=1.0)
        os.utime(task / name, (time.time() - age,) * 2)
        return task / name

    titanic = folder("titanic", "A", supervised, age=100)
    folder("grpo", "B", grpo, age=0)  # newer, another objective
    here = task / "now"
    assert latest_run_with_checkpoints(tmp_path, "train", here, supervised) == titanic.resolve()
    assert latest_run_with_checkpoints(tmp_path, "train", here, grpo) == (task / "grpo").resolve()
    assert latest_run_with_checkpoints(tmp_path, "train", here, "x.Other") is None


@pytest.mark.slow
def test_sigusr1_checkpoints_requeues_the_slurm_job_and_the_requeued_start_resumes(
        tmp_path, cli_env):
    """What `sbatch --signal=USR1@90` and trainer.requeue=true do: SIGUSR1 checkpoints the step
    and stops; the run calls `scontrol requeue $SLURM_JOB_ID` (here a recording stand-in on
    PATH: no Slurm on this machine); the job's next start (SLURM_RESTART_COUNT=1, the same
    command line) resumes from that checkpoint into the same MLflow run and finishes."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol.calls"
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    scontrol.chmod(0o755)
    env = {**cli_env, "PATH": f"{bin_dir}:{cli_env['PATH']}", "SLURM_JOB_ID": "4242"}
    args = [*TITANIC, "checkpoint.save_every_steps=null", "trainer.max_epochs=4",
            "task_name=preempted", "trainer.requeue=true"]
    first = tmp_path / "outputs" / "preempted" / "first"
    first.parent.mkdir(parents=True)
    proc = start(args, first, env)
    while not (first / "checkpoints").is_dir():  # training has started
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGUSR1, err[-2000:]
    assert "SIGUSR1 received" in err
    assert calls.read_text().split() == ["requeue", "4242"]
    stopped_at = max(committed_steps(first))
    assert stopped_at < 48

    again = tmp_path / "outputs" / "preempted" / "second"
    out = run(args, again, {**env, "SLURM_RESTART_COUNT": "1"})  # the same command line
    log = out.stdout + out.stderr
    assert "a requeued Slurm job: resume=auto" in log
    assert f"at step {stopped_at}" in log, log[-3000:]
    assert max(committed_steps(again)) == 48
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    [finished] = client.search_runs([client.get_experiment_by_name("preempted").experiment_id])
    assert finished.info.status == "FINISHED"
    assert calls.read_text().split() == ["requeue", "4242"]  # a finished run requeues nothing


@pytest.mark.slow
def test_resume_naming_the_trained_preset_rebuilds_the_checkpoints_model(tmp_path, cli_env):
    """`debug=fast model.num_layers=3`, then `debug=fast resume=auto` (a preset has to be named
    again: it sets the task whose runs resume=auto searches): the preset is the one the run was
    trained with, so the resume builds the checkpoint's 3 layers, every weight loads and no model
    change is reported. Naming another preset asks for the run as that one composes it."""
    tiny = ["model.hidden_size=32", "model.num_heads=2", "tracking=csv"]
    outputs = tmp_path / "outputs" / "debug"
    outputs.mkdir(parents=True)
    run(["debug=fast", *tiny, "model.num_layers=3"], outputs / "trained", cli_env)

    resumed = outputs / "resumed"
    out = run(["debug=fast", "resume=auto", "trainer.max_steps=6", "tracking=csv"], resumed,
              cli_env)
    log = out.stdout + out.stderr
    assert "weights did not all match" not in log, log[-3000:]
    assert final_state(resumed)["config"]["model"]["num_layers"] == 3
    assert final_state(resumed)["step"] == 6
    tags = json.loads((resumed / "tracking" / "tags.json").read_text())
    assert tags["resume.changed.trainer.max_steps"] == "4 -> 6"
    assert not [t for t in tags if t.startswith("resume.changed.model")], tags

    other = run(["debug=overfit", "resume=auto", "trainer.max_steps=8",
                 "tracking=csv"], outputs / "other", cli_env)
    assert "debug named: the run is built from this command line" in other.stdout + other.stderr
    assert final_state(outputs / "other")["config"]["model"]["num_layers"] == 2


@pytest.mark.slow
def test_a_resumed_runs_folder_and_mlflow_run_say_what_it_trained(tmp_path, cli_env):
    """`mlxlab train debug=fast model.num_layers=3`, then `mlxlab-train debug=fast resume=auto
    trainer.max_steps=6`: the resumed run trains the checkpoint's 3 layers, and its folder's
    .hydra/config.yaml says so (with max_steps 6), not the default's 2; .hydra/
    resumed_from.yaml and the MLflow tag name the run it went on from; the MLflow run's params
    and `mlxlab runs show` say 3 layers. The run's Source is the entry point as typed, not the
    tracking process's file (background.py), and its command line is a tag."""
    from mlxlab.tracking import tags as T

    outputs = tmp_path / "outputs" / "debug"
    outputs.mkdir(parents=True)
    trained, resumed = outputs / "trained", outputs / "resumed"
    tiny = ["model.hidden_size=32", "model.num_heads=2"]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")

    def launch(command: list[str], run_dir: Path) -> None:
        done = subprocess.run([*command, f"hydra.run.dir={run_dir}"], cwd=tmp_path, env=cli_env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]

    launch([MLXLAB, "train", "debug=fast", *tiny, "model.num_layers=3"], trained)
    run = client.get_run(run_id_of(trained))
    assert run.data.tags[T.SOURCE_NAME] == "mlxlab train"
    assert run.data.tags[T.COMMAND] == (f"mlxlab train debug=fast {' '.join(tiny)} "
                                        f"model.num_layers=3 hydra.run.dir={trained}")

    entry = str(Path(MLXLAB).with_name("mlxlab-train"))
    launch([entry, "debug=fast", "resume=auto", "trainer.max_steps=6"], resumed)
    config = yaml.safe_load((resumed / ".hydra" / "config.yaml").read_text())
    assert config["model"]["num_layers"] == 3 and config["model"]["hidden_size"] == 32
    assert config["trainer"]["max_steps"] == 6
    assert final_state(resumed)["config"]["model"]["num_layers"] == 3
    record = yaml.safe_load((resumed / ".hydra" / "resumed_from.yaml").read_text())
    assert record["run_dir"] == str(trained.resolve()) and record["resume"] == "auto"

    assert run_id_of(resumed) == run.info.run_id  # the MLflow run goes on
    run = client.get_run(run.info.run_id)
    assert run.data.params["model.num_layers"] == "3"
    assert run.data.tags[T.RESUMED_FROM] == str(trained.resolve())
    assert run.data.tags[T.SOURCE_NAME] == "mlxlab-train"
    assert run.data.tags[T.COMMAND] == ("mlxlab-train debug=fast resume=auto trainer.max_steps=6 "
                                        f"hydra.run.dir={resumed}")
    shown = subprocess.run([MLXLAB, "runs", "show", str(resumed)], cwd=tmp_path, env=cli_env,
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert re.search(r"model\.num_layers\s+3\b", shown.stdout), shown.stdout


# A monitor whose best is the first evaluation, for a run killed after it: this tiny model's
# accuracy and F1 plateau (it predicts the majority class) and a tie goes to the lower
# val/loss, late; its ROC-AUC rises at every evaluation, so its lowest is the first.
BEST_EARLY = [*TITANIC[:3], "optimized_metric=val/roc_auc", "optimized_mode=min",
              "trainer.max_steps=12",
              "trainer.eval_every_steps=2",
              "trainer.schedule.warmup_steps=4", "trainer.log_every_steps=2",
              "callbacks.early_stopping.patience=0", "callbacks.progress.enabled=false",
              "checkpoint.save_every_steps=2",
              "checkpoint.save_every_minutes=null"]


def best_step(run_dir: Path) -> int:
    return int(json.loads((run_dir / "checkpoints/best/state.json").read_text())
               ["best_metrics"]["best_step"])


@pytest.mark.slow
def test_a_run_killed_after_its_best_evaluation_writes_the_same_predictions(tmp_path, cli_env):
    """predictions/val_best.csv (what McNemar and the row bootstrap read) is written from the
    best evaluation, which a resume must remember: a run SIGKILLed after its best
    evaluation and resumed writes the file byte for byte as an uninterrupted run does."""
    reference = tmp_path / "reference"
    run(BEST_EARLY, reference, cli_env)
    best = best_step(reference)  # the first evaluation's (step 2): BEST_EARLY
    assert best < 8, "the premise: the best evaluation happens before the kill point"

    killed = tmp_path / "killed"
    proc = start(BEST_EARLY, killed, cli_env)
    kill_when(proc, lambda: any(s >= best + 4 for s in committed_steps(killed)))
    assert not (killed / "predictions").exists()

    resumed = tmp_path / "resumed"
    run([*BEST_EARLY, f"resume={killed}"], resumed, cli_env)
    assert best_step(resumed) == best < min(committed_steps(resumed))  # no new best after it
    expected = (reference / "predictions/val_best.csv").read_bytes()
    assert (resumed / "predictions/val_best.csv").read_bytes() == expected
    assert len(expected.splitlines()) == 179  # a header and Titanic's 178 validation rows


def assert_resumes_bitwise(args: list[str], tmp_path: Path, env: dict, label: str,
                           kill_at: int = 5, steps: int = 10) -> None:
    """`args` (saving a checkpoint every `kill_at` steps, `steps` in all) SIGKILLed once the
    checkpoint of step `kill_at` is committed and resumed: its weights, run id and whole MLflow
    history (the store under tmp_path) equal an uninterrupted run's."""
    killed = tmp_path / "killed"
    proc = start(args, killed, env)
    kill_when(proc, lambda: any(s >= kill_at for s in committed_steps(killed)))
    assert max(committed_steps(killed)) < steps
    resumed = tmp_path / "resumed"
    run([*args, f"resume={killed}"], resumed, env)
    reference = tmp_path / "reference"
    run(args, reference, env)
    assert_same_weights(reference, resumed, label)
    assert run_id_of(resumed) == run_id_of(killed)
    assert_same_history(f"sqlite:///{tmp_path}/mlruns/mlflow.db", reference, resumed, label)
