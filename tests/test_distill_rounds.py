"""objective.rounds: each round's student teaches the next (chain) or joins the teachers
(ensemble, learned weights); one parent MLflow run, a child per round, a manifest."""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

import mlx.core as mx
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from conftest import FAST
from mlxlab.config import ConfigError, compose_config, instantiate
from mlxlab.launch.rounds import MANIFEST, train_rounds
from mlxlab.objectives.supervised.teacher_weights import fit_teacher_weights
from mlxlab.sweeps.store import sweep_children
from mlxlab.tracking import tags as T
from mlxlab.tracking.csv_files import read_metrics
from mlxlab.train import train
from test_losses import FixedLogits
from test_resume import (
    TITANIC,
    assert_same_history,
    assert_same_weights,
    committed_steps,
    kill_when,
    metric_history,
    resumed_step,
    run,
    start,
)

STUDENT = ["experiment=distill_titanic", "model.hidden_size=16", "model.cnn_filters=16"]


def teacher_run(make_cfg, tmp_path: Path) -> str:
    cfg = make_cfg(*FAST, "tracking=none", "trainer.max_steps=4", "model.hidden_size=32",
                   "model.num_layers=1", "model.num_heads=2")
    cfg.paths.output_dir = str(tmp_path / "outputs" / "teacher")
    train(cfg)
    return cfg.paths.output_dir


@pytest.mark.parametrize(("mode", "rounds"),
                         [("chain", 2), pytest.param("ensemble", 3, marks=pytest.mark.slow)])
def test_rounds_are_child_runs_taught_by_the_previous_students(make_cfg, tmp_path, mode, rounds):
    teacher = teacher_run(make_cfg, tmp_path)
    cfg = make_cfg(*FAST, *STUDENT, f"objective.teachers=[{{run: '{teacher}'}}]",
                   f"objective.rounds={rounds}", f"objective.round_teachers={mode}",
                   "objective.teacher_weights=learned", "callbacks=per_example_losses")
    last = train(cfg)
    run_dir = Path(cfg.paths.output_dir)
    manifest = json.loads((run_dir / "distill_rounds.json").read_text())
    assert [r["round"] for r in manifest["rounds"]] == list(range(1, rounds + 1))
    students = [str(run_dir / f"round_{r}") for r in range(1, rounds + 1)]
    expected = [[teacher], [teacher, students[0]], [teacher, *students[:2]]] if mode == "ensemble" \
        else [[teacher], [students[0]]]
    assert [[t["run"] for t in r["teachers"]] for r in manifest["rounds"]] == expected
    assert manifest["rounds"][-1]["metrics"] == last

    client = MlflowClient(cfg.tracking.uri)
    parent = client.get_run(manifest["parent_run_id"])
    assert "distill_rounds.json" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    accuracy = client.get_metric_history(parent.info.run_id, "rounds/val/accuracy")
    assert [(m.step, m.value) for m in accuracy] == [
        (r["round"], r["metrics"]["val/accuracy"]) for r in manifest["rounds"]]
    for entry in manifest["rounds"]:
        child = client.get_run(entry["run_id"])
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.tags["mlxlab.distill.round"] == str(entry["round"])
        weights = json.loads(child.data.tags["mlxlab.distill.teacher_weights"])
        assert len(weights) == len(entry["teachers"]) and abs(sum(weights) - 1) < 1e-3
        # each round records its teachers' per-example losses: a later round's teacher is an
        # earlier student, so they differ from round 1's
        frame = pd.read_parquet(Path(entry["run_dir"]) / "per_example" / "epoch_0001.parquet")
        assert frame["teacher_loss"].notna().all()
        entry["teacher_loss"] = frame.set_index("example_id")["teacher_loss"]
    first, second = manifest["rounds"][0]["teacher_loss"], manifest["rounds"][1]["teacher_loss"]
    common = first.index.intersection(second.index)
    assert len(common) > 10 and not np.allclose(first[common], second[common])


def test_learned_weights_favour_the_teacher_that_is_right():
    labels = np.array([0, 1, 2, 1, 0, 2, 2, 1])
    right = np.eye(3)[labels] * 6.0          # confident and right
    wrong = np.eye(3)[(labels + 1) % 3] * 2.0  # fairly sure and wrong
    batch = {"input_ids": mx.zeros((8, 4), mx.int32), "labels": mx.array(labels)}
    weights = fit_teacher_weights([FixedLogits(wrong), FixedLogits(right)], [batch])
    assert weights[1] > 0.95 and abs(sum(weights) - 1.0) < 1e-6


@pytest.mark.slow
def test_resume_after_a_finished_round_skips_it_and_keeps_one_parent(make_cfg, tmp_path):
    """The process dies right after round 1's run finished, before the manifest says so (the
    window a SIGKILL can hit at a round boundary): the resume takes round 1 from the store as it
    is, trains round 2 taught by it, and the store holds one parent with two children."""
    teacher = teacher_run(make_cfg, tmp_path)
    args = [*FAST, *STUDENT, f"objective.teachers=[{{run: '{teacher}'}}]",
            "objective.rounds=2"]
    outputs = tmp_path / "outputs" / "distill_titanic"
    cfg = make_cfg(*args)
    cfg.paths.output_dir = str(outputs / "killed")
    returned = []

    class Killed(BaseException):
        pass

    def train_then_die(round_cfg):
        returned.append(train(round_cfg))
        raise Killed

    with pytest.raises(Killed):
        train_rounds(cfg, train_then_die, instantiate(cfg.tracking), {})
    killed = Path(cfg.paths.output_dir)
    manifest = json.loads((killed / MANIFEST).read_text())
    assert manifest["rounds"] == [] and manifest["running"]["round"] == 1

    resumed = outputs / "resumed"
    cfg = make_cfg(*args, "resume=auto")  # finds this task's newest manifest: killed's
    cfg.paths.output_dir = str(resumed)
    last = train(cfg)
    manifest = json.loads((resumed / MANIFEST).read_text())
    first, second = manifest["rounds"]
    assert first["run_dir"] == str(killed / "round_1") and first["metrics"] == returned[0]
    assert second["run_dir"] == str(resumed / "round_2") and second["metrics"] == last
    assert second["teachers"] == [{"run": str(killed / "round_1")}]
    assert not (resumed / "round_1").exists() and manifest["running"] is None

    client = MlflowClient(cfg.tracking.uri)
    parents = client.search_runs([client.get_experiment_by_name("distill_titanic").experiment_id],
                                 f"tags.`{T.DISTILL_ROUNDS}` = '2'")
    assert [p.info.run_id for p in parents] == [manifest["parent_run_id"]]
    assert parents[0].info.status == "FINISHED"
    children = sweep_children(client, manifest["parent_run_id"])
    assert sorted((c.data.tags[T.DISTILL_ROUND], c.info.run_id, c.info.status) for c in children) \
        == [("1", first["run_id"], "FINISHED"), ("2", second["run_id"], "FINISHED")]
    for run_id in (manifest["parent_run_id"], first["run_id"], second["run_id"]):
        metric_history(cfg.tracking.uri, run_id)  # fails on a step logged twice
    accuracy = client.get_metric_history(manifest["parent_run_id"], "rounds/val/accuracy")
    assert sorted((m.step, m.value) for m in accuracy) == [
        (1, first["metrics"]["val/accuracy"]), (2, second["metrics"]["val/accuracy"])]

    # Resuming with other rounds than the manifest's is one line naming the option and the fix.
    for bad, fix in (("objective.rounds=3", "objective.rounds=2"),
                     ("objective.round_teachers=ensemble", "objective.round_teachers=chain"),
                     (f"objective.teachers=[{{run: '{killed}'}}]",
                      f"objective.teachers=[{{run: '{teacher}'}}]")):
        with pytest.raises(ConfigError, match=f'pass "{re.escape(fix)}" to resume it'):
            train(make_cfg(*args, bad, f"resume={killed}"))
        assert compose_config(tmp_path, [*args, fix])  # the override it names is one Hydra takes
    with pytest.raises(ConfigError, match="no distill_rounds.json"):
        train(make_cfg(*args, f"resume={teacher}"))


def test_csv_parent_resumed_holds_every_rounds_rows_and_bad_manifests_are_one_line(make_cfg,
                                                                                   tmp_path):
    """tracking=csv: the resumed parent's metrics.csv (new folder) starts with the killed parent's
    rounds/* rows of its finished rounds, as the reopened MLflow parent does, so it holds every
    round once. Each round's training is a plain function here: what is checked is the parent's
    record, which train_rounds writes whatever the rounds do."""
    args = [*FAST, *STUDENT, "tracking=csv", "objective.teachers=[{run: /t, weight: null}]",
            "objective.rounds=3"]
    outputs = tmp_path / "outputs" / "distill_titanic"

    class Killed(BaseException):
        pass

    def accuracy(round_cfg) -> dict[str, float]:
        return {"val/accuracy": int(round_cfg.tags[T.DISTILL_ROUND]) / 10}

    def die_in_round_3(round_cfg) -> dict[str, float]:
        if round_cfg.tags[T.DISTILL_ROUND] == "3":
            raise Killed
        return accuracy(round_cfg)

    def rounds(folder: Path, train_one, *extra: str) -> None:
        cfg = make_cfg(*args, *extra)
        cfg.paths.output_dir = str(folder)
        train_rounds(cfg, train_one, instantiate(cfg.tracking), {T.RUN_DIR: str(folder)})

    with pytest.raises(Killed):
        rounds(outputs / "killed", die_in_round_3)
    rounds(outputs / "resumed", accuracy, f"resume={outputs / 'killed'}")
    record = outputs / "resumed" / "tracking"
    assert read_metrics(record)["rounds/val/accuracy"] == [(1, 0.1), (2, 0.2), (3, 0.3)]
    assert json.loads((record / "tags.json").read_text())["status"] == "FINISHED"

    # the fix a refusal names is an override Hydra reads back as the manifest's value (null)
    with pytest.raises(ConfigError, match=re.escape("{run: '/t', weight: null}]\" to resume")):
        rounds(outputs / "other", accuracy, f"resume={outputs / 'killed'}",
               "objective.teachers=[{run: /u}]")
    with pytest.raises(ConfigError, match="tracking.csv.dir names one folder"):
        rounds(outputs / "shared", accuracy, f"tracking.csv.dir={tmp_path / 'csv'}")
    (outputs / "cut" / MANIFEST).parent.mkdir()
    (outputs / "cut" / MANIFEST).write_text('{"rounds": [{"round": 1, "run_')
    with pytest.raises(ConfigError, match=f"resume: .*{MANIFEST} cannot be read"):
        rounds(outputs / "again", accuracy, f"resume={outputs / 'cut'}")


def test_rounds_probe_a_store_that_does_not_answer_before_writing_anything(make_cfg):
    from mlxlab.tracking.mlflow import TrackingUnavailable
    from test_new_user import free_port

    teacher = Path(__file__).parent  # a folder: the teachers' check passes, nothing loads it
    cfg = make_cfg(*FAST, *STUDENT, f"objective.teachers=[{{run: {teacher}}}]",
                   "objective.rounds=2", f"tracking.uri=http://127.0.0.1:{free_port()}",
                   "tracking.connect_timeout=1")
    with pytest.raises(TrackingUnavailable, match="tracking=none"):
        train(cfg)
    assert not (Path(cfg.paths.output_dir) / MANIFEST).exists()


def test_rounds_need_teachers_and_a_count(make_cfg):
    with pytest.raises(ConfigError, match="objective.teachers"):
        train(make_cfg(*FAST, *STUDENT, "tracking=none", "objective.rounds=2"))
    with pytest.raises(ConfigError, match="rounds must be an integer"):
        train(make_cfg(*FAST, *STUDENT, "tracking=none", "objective.rounds=0"))


ROUNDS = [
    "experiment=distill_titanic", "model.hidden_size=16", "model.cnn_filters=16",
    "trainer.batch_size=64", "trainer.max_epochs=2",  # 713 rows -> 12 steps an epoch
    "trainer.schedule.warmup_steps=4", "trainer.log_every_steps=1", "objective.rounds=2",
    "callbacks.early_stopping.patience=0", "callbacks.progress.enabled=false",
    "checkpoint.save_every_steps=3", "checkpoint.save_every_minutes=null",
]


def round_finished(store: Path, folder: Path) -> bool:
    """Whether the MLflow run of a round's folder is FINISHED (read straight from sqlite: fast
    enough to catch the moment between a round's end and the manifest's update)."""
    states = [s for s in folder.glob("checkpoints/step_*/state.json")
              if (s.parent / "COMMITTED").exists()]
    if not states or not store.exists():
        return False
    run_id = json.loads(states[0].read_text())["run_id"]
    db = sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=0.05)
    try:
        row = db.execute("select status from runs where run_uuid = ?", (run_id,)).fetchone()
    except sqlite3.OperationalError:  # busy: ask again
        return False
    finally:
        db.close()
    return row is not None and row[0] == "FINISHED"


def manifest_of(folder: Path) -> dict:
    return json.loads((folder / MANIFEST).read_text())


@pytest.mark.slow
@pytest.mark.parametrize("kill", ["in round 2", "after round 1"])
def test_sigkill_across_rounds_resumes_bitwise_under_the_same_parent(tmp_path, cli_env, kill):
    """Rounds SIGKILLed during round 2 (after its checkpoint at step 6), or right after round 1's
    run finished and before the manifest said so, then resumed: round 1 is not trained again,
    round 2 continues from its checkpoint (or starts), and the final student's weights and every
    run's metric history equal an uninterrupted run's; the store holds one parent with two
    FINISHED children for the killed-and-resumed rounds, and no metric step twice."""
    teacher = tmp_path / "teacher"
    run([*TITANIC, "trainer.max_steps=4", "tracking=none"], teacher, cli_env)
    args = [*ROUNDS, f"objective.teachers=[{{run: '{teacher}'}}]"]
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    reference = tmp_path / "reference"
    run(args, reference, cli_env)

    killed = tmp_path / "killed"
    proc = start(args, killed, cli_env)
    if kill == "in round 2":
        kill_when(proc, lambda: any(s >= 6 for s in committed_steps(killed / "round_2")))
        assert max(committed_steps(killed / "round_2")) < max(committed_steps(reference / "round_2"))
    else:
        # the window: round 1's run is FINISHED, the manifest does not list it yet (a miss
        # leaves the run to finish and fails in kill_when)
        kill_when(proc, lambda: round_finished(tmp_path / "mlruns" / "mlflow.db",
                                               killed / "round_1")
                  and not manifest_of(killed)["rounds"])
        assert not (killed / "round_2").exists()
    running = manifest_of(killed)
    assert running["running"]["round"] == len(running["rounds"]) + 1 == int(kill[-1])

    resumed = tmp_path / "resumed"
    out = run([*args, f"resume={killed}"], resumed, cli_env)
    if kill == "in round 2":
        assert resumed_step(out.stdout + out.stderr) >= 6
    assert not (resumed / "round_1").exists()  # round 1's student stayed where it was
    for r, folder in ((1, killed / "round_1"), (2, resumed / "round_2")):
        assert_same_weights(reference / f"round_{r}", folder, f"round {r}")
        assert_same_history(uri, reference / f"round_{r}", folder, f"round {r}")

    expected, got = manifest_of(reference), manifest_of(resumed)
    assert [e["metrics"] for e in got["rounds"]] == [e["metrics"] for e in expected["rounds"]]
    assert got["parent_run_id"] == running["parent_run_id"]
    assert metric_history(uri, got["parent_run_id"]) == metric_history(
        uri, expected["parent_run_id"])
    client = MlflowClient(uri)
    parents = client.search_runs([client.get_experiment_by_name("distill_titanic").experiment_id],
                                 f"tags.`{T.DISTILL_ROUNDS}` = '2'")
    assert sorted(p.info.run_id for p in parents) == sorted(
        m["parent_run_id"] for m in (expected, got))
    for manifest in (expected, got):
        assert client.get_run(manifest["parent_run_id"]).info.status == "FINISHED"
        children = sweep_children(client, manifest["parent_run_id"])
        assert sorted((c.data.tags[T.DISTILL_ROUND], c.info.run_id, c.info.status)
                      for c in children) == [
            (str(e["round"]), e["run_id"], "FINISHED") for e in manifest["rounds"]]
