"""tracking=csv writes plain files; tracking=[mlflow,csv] writes the same values to both."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from omegaconf import open_dict

from conftest import FAST, compose_cfg
from mlxlab.checkpoint import CheckpointState
from mlxlab.config import ConfigError
from mlxlab.launch.argv import check_group_choices
from mlxlab.tracking.csv_files import CsvTracker, read_metrics
from mlxlab.tracking.fanout import FanoutTracker, build_tracker
from mlxlab.train import train
from mlxlab.training.callbacks import Callback


def test_mlflow_and_csv_hold_the_same_metrics(make_cfg):
    cfg = make_cfg(*FAST, "tracking=[mlflow,csv]")
    assert "uri" in cfg.tracking and "csv" in cfg.tracking
    train(cfg)
    run_dir = Path(cfg.paths.output_dir)
    folder = run_dir / "tracking"
    in_csv = read_metrics(folder)

    client = MlflowClient(cfg.tracking.uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment_name)
    (run,) = client.search_runs([exp.experiment_id])
    in_mlflow = {key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
                 for key in run.data.metrics}
    assert set(in_csv) == set(in_mlflow) and "train/loss" in in_csv and "val/accuracy" in in_csv
    for key, rows in in_csv.items():
        assert sorted(rows) == in_mlflow[key], key  # same steps, bitwise the same values

    params = yaml.safe_load((folder / "params.yaml").read_text())
    assert params["trainer"]["max_steps"] == 4 == json.loads((folder / "params.json").read_text())[
        "trainer"]["max_steps"]
    tags = json.loads((folder / "tags.json").read_text())
    assert tags["mlxlab.config_hash"] == run.data.tags["mlxlab.config_hash"]
    assert tags["status"] == "FINISHED"
    assert (folder / "artifacts" / "plots" / "loss_curve.png").is_file()
    assert list((folder / "artifacts" / "checkpoint").glob("*.safetensors"))


def test_csv_alone_touches_no_mlflow_store(make_cfg, tmp_path):
    cfg = make_cfg(*FAST, "tracking=csv")
    metrics = train(cfg)
    rows = read_metrics(Path(cfg.paths.output_dir) / "tracking")
    assert rows["val/accuracy"][-1][1] == metrics["val/accuracy"]
    assert not (tmp_path / "mlruns").exists()


def test_csv_rewind_drops_replayed_steps_and_fanout_reaches_each(tmp_path):
    a, b = build_tracker(csv={"dir": str(tmp_path / "a")}), build_tracker(csv={"dir": str(tmp_path / "b")})
    both = FanoutTracker([a, b])
    both.start({"x": 1}, {"t": "1"})
    for step in range(1, 6):
        both.log_metrics({"loss": 1.0 / step}, step)
    both.rewind(3)  # not in the protocol: reaches every tracker that has it
    both.log_metrics({"loss": 0.5}, 4)
    both.end()
    for folder in ("a", "b"):
        assert read_metrics(tmp_path / folder)["loss"] == [(1, 1.0), (2, 0.5), (3, 1 / 3), (4, 0.5)]


def test_either_order_of_mlflow_and_csv_builds_both(make_cfg):
    """Both options name the one factory (tracking/fanout.py), so the merged node is the same."""
    from mlxlab.config import instantiate

    for order in ("[csv,mlflow]", "[mlflow,csv]"):
        cfg = make_cfg(*FAST, f"tracking={order}", "tracking.background=false")
        tracker = instantiate(cfg.tracking)
        assert [type(t).__name__ for t in tracker.trackers] == ["MlflowTracker", "CsvTracker"]


class InterruptAt(Callback):
    """Ctrl-C at `step`, after the rows of the steps since the last checkpoint were logged."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step(self, step: int, logs: dict[str, float]) -> None:
        if step == self.step:
            raise KeyboardInterrupt


RESUMABLE = [*FAST, "trainer.max_epochs=2", "trainer.max_steps=12", "trainer.eval_every_steps=6",
             "trainer.log_every_steps=1", "checkpoint.save_every_steps=4",
             "checkpoint.save_every_minutes=null", "callbacks.early_stopping.patience=0"]


def assert_same_csv_metrics(reference: Path, resumed: Path) -> None:
    """Two metrics.csv hold the same rows per metric (rates per second and the process's memory,
    system/: the steps only)."""
    expected, got = read_metrics(reference), read_metrics(resumed)
    assert got.keys() == expected.keys()
    for key, rows in expected.items():
        if key.endswith("_per_sec") or key.startswith("system/"):  # measured: the process's
            assert [s for s, _ in got[key]] == [s for s, _ in rows], key
        else:
            assert got[key] == rows, f"{key}:\n{got[key]}\nvs uninterrupted\n{rows}"


def test_resumed_csv_run_continues_the_killed_runs_files(tmp_path):
    """tracking=csv: a run stopped at step 10 (its last checkpoint: step 8; step 9's rows are in
    its metrics.csv) and resumed into a new folder holds one metrics.csv equal to an
    uninterrupted run's, and the killed run's params and tags."""
    out = tmp_path / "outputs"

    def run(folder: Path, *extra: str) -> None:
        cfg = compose_cfg(tmp_path, [*RESUMABLE, "tracking=csv", *extra])
        with open_dict(cfg):
            cfg.paths.output_dir = str(folder)
        train(cfg)

    run(out / "reference")
    killed = out / "killed"
    with pytest.raises(KeyboardInterrupt):
        run(killed, "+callbacks.stop={_target_: test_csv_tracking.InterruptAt, step: 10}")
    assert max(s for s, _ in read_metrics(killed / "tracking")["train/loss"]) == 9  # past step 8
    resumed = out / "resumed"
    run(resumed, f"resume={killed}")

    assert_same_csv_metrics(out / "reference" / "tracking", resumed / "tracking")
    tags = json.loads((resumed / "tracking" / "tags.json").read_text())
    assert tags["status"] == "FINISHED" and tags["mlxlab.run_dir"] == str(resumed)
    assert (resumed / "tracking" / "params.yaml").read_bytes() == (
        killed / "tracking" / "params.yaml").read_bytes()


def test_command_line_accepts_a_list_of_tracking_options():
    """`python -m mlxlab.train tracking=[mlflow,csv]` passes the one-line group check (the
    brackets are Hydra's list syntax, not part of an option's name)."""
    check_group_choices(["tracking=[mlflow,csv]", "callbacks=[per_example_losses, analysis]"])
    with pytest.raises(ConfigError, match="tracking=mlflw is not an option"):
        check_group_choices(["tracking=[mlflw,csv]"])


def test_csv_resume_into_the_same_folder_rewinds_and_drops_a_row_cut_by_a_kill(tmp_path):
    """resume=auto can resume a run in its own folder: its rows after the checkpoint go, and so
    does a last row a SIGKILL cut mid-write; the killed run's tags stay, its status does not."""
    first = CsvTracker()
    first.start({"x": 1}, {"mlxlab.run_dir": str(tmp_path), "kept": "yes"})
    for step in range(1, 6):
        first.log_metrics({"loss": 1.0 / step}, step)
    first.flush()
    with (tmp_path / "tracking" / "metrics.csv").open("a") as f:
        f.write("6,loss,0.16\n1")  # the start of step 10's row: the process died here
    resumed = CsvTracker()
    resumed.continue_from(tmp_path, 3)
    resumed.start({"x": 2}, {"mlxlab.run_dir": str(tmp_path)})
    resumed.log_metrics({"loss": 0.5}, 4)
    resumed.end()
    assert read_metrics(tmp_path / "tracking")["loss"] == [(1, 1.0), (2, 0.5), (3, 1 / 3), (4, 0.5)]
    tags = json.loads((tmp_path / "tracking" / "tags.json").read_text())
    assert tags["kept"] == "yes" and tags["status"] == "FINISHED"


def test_csv_resume_with_one_tracking_dir_for_both_runs_rewinds_it(tmp_path):
    """tracking.csv.dir=<one folder> for the killed run and its resume (new run folders): the
    record is that folder, not <killed run>/tracking; the rows after the checkpoint go once."""
    shared = tmp_path / "csv"
    first = CsvTracker(dir=str(shared))
    first.start({"x": 1}, {"mlxlab.run_dir": str(tmp_path / "killed")})
    for step in range(1, 6):
        first.log_metrics({"loss": float(step)}, step)
    first.flush()
    resumed = CsvTracker(dir=str(shared))
    resumed.continue_from(tmp_path / "killed", 3)
    resumed.start({"x": 1}, {"mlxlab.run_dir": str(tmp_path / "resumed")})
    resumed.log_metrics({"loss": 40.0}, 4)
    resumed.end()
    assert read_metrics(shared)["loss"] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]


def test_resume_rebuilds_the_trained_model_not_todays_defaults(tmp_path, caplog):
    """A run of its own model size and learning rate, stopped at step 10 and resumed naming
    neither: the resumed run builds the checkpoint's model (every weight loads) and logs what an
    uninterrupted run logs. A setting the resume names wins, with a warning and a tag."""
    out = tmp_path / "outputs"
    trained = ["model.hidden_size=24", "model.num_layers=1", "model.num_heads=2",
               "optimizer.learning_rate=3e-3"]
    common = [o for o in RESUMABLE if not o.startswith("model.")]  # the defaults: 128 wide, 2 deep

    def run(folder: Path, *extra: str) -> None:
        cfg = compose_cfg(tmp_path, [*common, "tracking=csv", *extra])
        with open_dict(cfg):
            cfg.paths.output_dir = str(folder)
        train(cfg)

    run(out / "reference", *trained)
    killed = out / "killed"
    with pytest.raises(KeyboardInterrupt):
        run(killed, *trained, "+callbacks.stop={_target_: test_csv_tracking.InterruptAt, step: 10}")
    resumed = out / "resumed"
    with caplog.at_level(logging.WARNING):
        run(resumed, f"resume={killed}")
    assert not [r for r in caplog.records if "weights did not all match" in r.message]
    assert_same_csv_metrics(out / "reference" / "tracking", resumed / "tracking")
    state = CheckpointState.read(sorted((resumed / "checkpoints").glob("step_*"))[-1])
    assert (state.config["model"]["hidden_size"], state.config["optimizer"]["learning_rate"]) == (
        24, 3e-3)

    run(out / "deeper", f"resume={killed}", "model.num_layers=2", "trainer.max_steps=11")
    tags = json.loads((out / "deeper" / "tracking" / "tags.json").read_text())
    assert tags["resume.changed.model.num_layers"] == "1 -> 2"
    assert tags["resume.changed.trainer.max_steps"] == "12 -> 11"
    assert "resume.changed.model.hidden_size" not in tags  # not named: still the checkpoint's 24
    assert "resume.load_report" in tags  # the asked-for second layer starts fresh, reported
