"""tracking=csv writes plain files; tracking=[mlflow,csv] writes the same values to both."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import FAST
from mlxlab.config import ConfigError
from mlxlab.tracking.csv_files import read_metrics
from mlxlab.tracking.fanout import FanoutTracker, build_tracker
from mlxlab.train import train


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


def test_csv_listed_first_is_one_clear_error(make_cfg):
    with pytest.raises(ConfigError, match=r"tracking=\[mlflow,csv\]"):
        train(make_cfg(*FAST, "tracking=[csv,mlflow]"))
