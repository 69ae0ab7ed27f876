"""What a new user trips over: run names, a tracking server that is down or goes away,
README and docs recipes run verbatim, listings that say which metric they show, silent runs.
Real Hydra, real MLflow stores (sqlite and a real `mlflow server`), real MLX training."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from conftest import FAST, PYTHON, REPO, compose_cfg, wait_for_server
from mlxlab.launch.wiring import seed_everything
from mlxlab.runtime import settings
from mlxlab.tracking import tags as T
from mlxlab.tracking.mlflow import (
    EXPERIMENT_KIND,
    MlflowTracker,
    TrackingUnavailable,
    ensure_store,
    probe_store,
    store_template_path,
)
from mlxlab.tracking.mlflow.offline import SPOOL_FILE, read_spool
from mlxlab.train import train

README = (REPO / "README.md").read_text()
# The README is a quickstart; the recipes below live on the docs site's guide pages.
TRAINING_GUIDE = (REPO / "docs" / "guide" / "training.md").read_text()
SCALING_GUIDE = (REPO / "docs" / "guide" / "scaling.md").read_text()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(args: list[str], cwd: Path, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "mlxlab.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def doc_block(after: str, language: str, text: str = README) -> str:
    """The first ```<language> block of `text` (the README, or a docs page) after the line
    containing `after`."""
    rest = text[text.index(after):]
    match = re.search(rf"```{language}\n(.*?)```", rest, re.S)
    assert match, f"no ```{language} block after {after!r}"
    return match.group(1)


# --------------------------------------------------------------------------- 1. run names


def test_seeding_leaves_global_generators_alone():
    random.seed(1234)
    np.random.seed(1234)
    before, before_np = random.getstate(), np.random.get_state()[1].copy()
    seed_everything(42)
    assert random.getstate() == before
    assert (np.random.get_state()[1] == before_np).all()


@pytest.mark.slow
def test_runs_are_named_after_the_task_and_time(make_cfg, tmp_path):
    train(make_cfg(*FAST))
    train(make_cfg(*FAST, "tracking.run_name=mine"))
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("train").experiment_id],
                              order_by=["attributes.start_time ASC"])
    names = [r.info.run_name for r in runs]
    assert re.fullmatch(r"train-\d{4}-\d{6}", names[0]), names
    assert names[1] == "mine"  # tracking.run_name still wins


# ----------------------------------------------- 1, 6, 9: a real multirun, as the UI sees it


@pytest.mark.slow
def test_sweep_runs_have_distinct_names_params_inputs_and_log_lines(tmp_path, cli_env):
    out = cli(["-m", "model.hidden_size=16,32", *FAST[:-3], "model.num_layers=1",
               "model.num_heads=2"], tmp_path, cli_env)
    assert out.returncode == 0, out.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    experiment = client.get_experiment_by_name("train")
    assert experiment.tags[T.EXPERIMENT_KIND] == EXPERIMENT_KIND  # not the GenAI view
    runs = [r for r in client.search_runs([experiment.experiment_id])
            if r.data.tags.get("mlxlab.role") != "sweep"]
    names = sorted(r.info.run_name for r in runs)
    assert len(set(names)) == 2
    assert names[0].endswith(" model.hidden_size=16") and names[1].endswith(" model.hidden_size=32")
    assert all(n.startswith("train-") for n in names)
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    for run in runs:
        params, tags = run.data.params, run.data.tags
        assert not [k for k in params if k.startswith(("paths.", "tracking.")) or "_target_" in k]
        assert int(params["num_parameters"]) > 0
        assert f"model.hidden_size={params['model.hidden_size']}" in tags["mlxlab.overrides"]
        assert tags.get("mlflow.source.git.commit") == commit
        (dataset,) = run.inputs.dataset_inputs
        assert dataset.dataset.name == "train" and json.loads(dataset.dataset.profile) == {
            "num_rows": 891}
        assert "titanic/train.csv" in dataset.dataset.source
    log_text = out.stdout + out.stderr
    assert re.search(r"step 4/4 epoch 1/1 .*val/accuracy \d\.\d{4}.*\| best val/accuracy", log_text)
    assert "parameters" in log_text and "open it: mlflow ui --backend-store-uri" in log_text


# --------------------------------------------------------------------------- 2. a dead server


@pytest.mark.slow  # two CLI starts; the run's own probe of the store: the test below
def test_dead_server_fails_fast_with_one_line(tmp_path, cli_env):
    from one_process import each_in_one_process

    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    start = time.monotonic()
    # the run, then a sweep (which fails before any job), in turn in one process
    (code, err, (names, ended), out), (sweep_code, sweep_err, _, sweep_out) = \
        each_in_one_process(
            [["mlxlab-train", f"tracking.uri={uri}", "trainer.max_epochs=1"],
             ["mlxlab-train", "-m", f"tracking.uri={uri}", "trainer.max_epochs=1,2"]],
            cli_env, cwd=tmp_path, after="one_process:names_and_time", timeout=240, stdout=True)
    elapsed = ended - start  # the process start and the run
    assert code == 2, (out[-2000:], err[-2000:])
    errors = [line for line in err.splitlines() if line.startswith("mlxlab: error:")]
    assert len(errors) == 1 and uri in errors[0] and "tracking=none" in errors[0], err
    assert elapsed < 60, f"took {elapsed:.0f} s"
    assert "outputs" not in names  # nothing trained, no empty run folder

    assert sweep_code == 2 and "mlxlab: error:" in sweep_err and "Launching" not in sweep_out


def test_the_run_itself_probes_the_store(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    cfg = compose_cfg(tmp_path, [*FAST, f"tracking.uri={uri}", "tracking.connect_timeout=1"])
    start = time.monotonic()
    with pytest.raises(TrackingUnavailable, match="tracking=none"):
        train(cfg)  # no Hydra callback here: train() probes on its own
    assert time.monotonic() - start < 20
    assert not (Path(cfg.paths.output_dir) / "checkpoints").exists()


def test_a_server_that_never_answers_is_bounded():
    with socket.socket() as listener:  # accepts connections (backlog), never answers HTTP
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        uri = f"http://127.0.0.1:{listener.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(TrackingUnavailable, match="no reply within 2 s"):
            probe_store(uri, timeout=1, request_timeout=2)
        assert time.monotonic() - start < 10


def start_server(mlruns: Path, port: int, path: str | None = None) -> tuple[subprocess.Popen, str]:
    """scripts/mlflow_server.sh on `mlruns`, waited for (its own process group)."""
    env = {**os.environ, "PORT": str(port), "WORKERS": "1", "MLRUNS_DIR": str(mlruns),
           "PYTHON": PYTHON, "PATH": path or os.environ["PATH"]}
    log_file = open(mlruns.parent / f"server-{port}-{time.time()}.log", "w")  # noqa: SIM115
    server = subprocess.Popen([str(REPO / "scripts/mlflow_server.sh")], env=env, stdout=log_file,
                              stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    wait_for_server(server, uri, Path(log_file.name), 120)
    return server, uri


def stop_server(server: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, sig)
    server.wait(timeout=30)


def wait_for_metrics(uri: str, timeout: float = 60.0) -> None:
    """Until the server holds a run with a train/loss value (the tracking process starts the run
    after this process logs "training: ..."; killing the server before that tests start-up)."""
    client, deadline = MlflowClient(uri), time.monotonic() + timeout
    while time.monotonic() < deadline:
        ids = [e.experiment_id for e in client.search_experiments()]
        if any("train/loss" in r.data.metrics for r in client.search_runs(ids)):
            return
        time.sleep(0.05)
    raise AssertionError(f"no run with train/loss on {uri} within {timeout:g} s")


@pytest.mark.slow
def test_server_killed_mid_run_keeps_the_metrics_and_says_so(tmp_path, cli_env):
    mlruns = tmp_path / "srv"
    mlruns.mkdir()
    port = free_port()
    server, uri = start_server(mlruns, port)
    try:
        run = subprocess.Popen(
            [PYTHON, "-m", "mlxlab.train", f"tracking.uri={uri}", "tracking.flush_every_steps=1",
             "tracking.connect_timeout=2", "trainer.max_epochs=100", "trainer.max_steps=600",
             "trainer.eval_every_steps=200", "trainer.log_every_steps=1", "callbacks.progress.enabled=false",
             "model.hidden_size=32", "model.num_layers=1", "model.num_heads=2"],
            cwd=tmp_path, env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = []
        for line in run.stdout:  # training has started, tracked: the server goes away
            lines.append(line)
            if "training: 600 steps" in line:
                wait_for_metrics(uri)  # the tracking process has started the run: now mid-run
                stop_server(server, signal.SIGKILL)
                break
        start = time.monotonic()
        lines += run.stdout.readlines()
        assert run.wait(timeout=300) == 0, "".join(lines)[-4000:]
        assert time.monotonic() - start < 240
    finally:
        stop_server(server, signal.SIGKILL)
    output = "".join(lines)
    assert "stopped answering at step" in output
    assert "has not answered since step" in output and SPOOL_FILE in output
    (spool,) = tmp_path.glob(f"outputs/train/*/{SPOOL_FILE}")
    header, rows, status = read_spool(spool)
    assert status["status"] == "FINISHED" and max(step for *_, step in rows) == 600
    assert {"train/loss", "val/accuracy", "best/val/accuracy"} <= {key for key, *_ in rows}

    server, uri = start_server(mlruns, port)  # back: the file is sent as the run's end said
    try:
        send = subprocess.run([PYTHON, "-m", "mlxlab.tracking.mlflow.offline", str(spool)],
                              capture_output=True, text=True, timeout=120)
        assert send.returncode == 0, send.stderr[-2000:]
        client = MlflowClient(uri)
        finished = client.get_run(header["run_id"])
        assert finished.info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(header["run_id"], "train/loss")]
        assert sorted(set(steps)) == list(range(1, 601))
    finally:
        stop_server(server)


@pytest.mark.slow
def test_metrics_kept_while_the_server_is_away_are_sent_when_it_returns(tmp_path):
    mlruns = tmp_path / "srv"
    mlruns.mkdir()
    port = free_port()
    server, uri = start_server(mlruns, port)
    tracker = MlflowTracker(uri=uri, experiment_name="away", async_logging=False,
                            flush_every_steps=1, connect_timeout=1, request_timeout=60)
    tracker.start({"a": 1}, {"mlxlab.run_dir": str(tmp_path / "run")})
    tracker.log_metrics({"loss": 1.0}, step=1)
    stop_server(server, signal.SIGKILL)
    started = time.monotonic()
    for step in range(2, 6):
        tracker.log_metrics({"loss": 1.0 / step}, step=step)
    assert time.monotonic() - started < 10  # one bounded failure, then quick checks
    assert tracker.offline_since == 2 and (tmp_path / "run" / SPOOL_FILE).is_file()  # noticed at 2
    server, _ = start_server(mlruns, port)
    try:
        tracker.log_metrics({"loss": 0.1}, step=6)
        tracker.end()
        assert "sent when it came back" in tracker.offline_report
        history = MlflowClient(uri).get_metric_history(tracker.run_id, "loss")
        assert sorted(m.step for m in history) == [1, 2, 3, 4, 5, 6]
        assert MlflowClient(uri).get_run(tracker.run_id).info.status == "FINISHED"
    finally:
        stop_server(server)


# --------------------------------------------------------------------------- 7. the UI's server


@pytest.mark.slow
def test_server_script_serves_the_store_runs_write(make_cfg, tmp_path):
    train(make_cfg(*FAST))  # writes <root>/mlruns/mlflow.db directly, as every run does
    no_venv = ":".join(p for p in os.environ["PATH"].split(":") if ".venv" not in p)
    server, uri = start_server(tmp_path / "mlruns", free_port(), path=no_venv)  # python -m mlflow
    try:
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name("train")
        assert experiment is not None
        (run,) = client.search_runs([experiment.experiment_id])
        assert run.info.status == "FINISHED"
        assert "plots" in [a.path for a in client.list_artifacts(run.info.run_id)]
    finally:
        stop_server(server)


# --------------------------------------------------------------------------- 3. the registry


@pytest.mark.slow
def test_readme_registry_lines_work_in_a_fresh_process(make_cfg, tmp_path):
    from mlxlab.serving.registry import register_run

    cfg = make_cfg(*FAST)
    train(cfg)
    (tmp_path / "pyproject.toml").write_text("")  # the user's project folder
    register = doc_block("## Model registry", "bash", SCALING_GUIDE).splitlines()[0]
    name = re.search(r"--name (\S+)", register).group(1)
    alias = re.search(r"--alias (\S+)", register).group(1)
    register_run(cfg.paths.output_dir, name, alias, cfg.tracking.uri)  # what that line runs
    rows = REPO / "src/mlxlab/assets/titanic/train.csv"
    (tmp_path / "test.csv").write_text("\n".join(rows.read_text().splitlines()[:9]))

    snippet = doc_block("Then, in any process", "python", SCALING_GUIDE)
    env = {k: v for k, v in os.environ.items() if k not in ("MLXLAB_ROOT", "MLFLOW_TRACKING_URI")}
    out = subprocess.run([PYTHON, "-c", snippet], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "prediction" in out.stdout and "probability" in out.stdout
    assert len([line for line in out.stdout.splitlines() if line.strip()]) >= 9
    assert not (tmp_path / "mlflow.db").exists()  # no stray store in the working directory


# --------------------------------------------------------------------------- 4. any CSV


def test_readme_csv_example_runs_verbatim(tmp_path, cli_env):
    command = re.search(r"`(mlxlab-train data=csv [^`]+)`", README).group(1)
    rng = np.random.default_rng(0)
    species = rng.choice(["setosa", "versicolor", "virginica"], size=90)
    width = {"setosa": 1.0, "versicolor": 3.0, "virginica": 5.0}
    lines = ["sepal_length,petal_width,species"]
    lines += [f"{rng.uniform(4, 8):.1f},{width[s] + rng.normal(0, 0.3):.1f},{s}" for s in species]
    (tmp_path / "iris.csv").write_text("\n".join(lines) + "\n")
    args = command.split()[1:]
    out = cli(args, tmp_path, cli_env)  # verbatim: the default model and epochs, ~30 steps
    assert out.returncode == 0, out.stderr[-3000:]
    assert "val/accuracy" in out.stdout
    assert "data.path=iris.csv" in args and "data.label_column=species" in args


def test_csv_without_path_or_label_says_what_to_add(tmp_path, cli_env):
    out = cli(["data=csv", "tracking=none"], tmp_path, cli_env)
    assert out.returncode == 2
    assert ("mlxlab: error: data.path, data.label_column must be set: add data.path=my.csv "
            "data.label_column=target to the command line") in out.stderr


def test_titanic_is_the_csv_option_with_its_columns(make_cfg):
    titanic, csv = make_cfg(), make_cfg("data=csv", "data.path=x.csv", "data.label_column=y")
    assert titanic.data._target_ == csv.data._target_
    assert csv.data.template is None and csv.data.bins is None and csv.data.id_column is None
    assert titanic.data.label_column == "Survived" and "Age" in titanic.data.bins


# --------------------------------------------------------------------------- 5. best vs last


def test_listings_show_the_best_metric_and_say_so(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    tracker = MlflowTracker(uri=uri, experiment_name="listed")
    tracker.start({}, {})
    tracker.log_metrics({"val/accuracy": 0.9565}, step=10)
    tracker.log_metrics({"val/accuracy": 0.9420}, step=20)  # the last is not the best
    tracker.log_metrics({"best/val/accuracy": 0.9565}, step=20)
    tracker.end()
    from mlxlab.cli import runs_list

    assert runs_list.main(["--uri", uri]) == 0
    best = capsys.readouterr().out
    assert runs_list.main(["--uri", uri, "--last"]) == 0
    last = capsys.readouterr().out
    assert "best val/accuracy" in best and "0.9565" in best and "0.9420" not in best
    assert "last val/accuracy" in last and "0.9420" in last


# --------------------------------------------------------------------------- 6. not silent


def test_early_stopping_and_evaluations_are_logged(make_cfg, caplog):
    cfg = make_cfg(*FAST, "tracking=none", "trainer.max_steps=12", "trainer.eval_every_steps=2",
                   "optimizer.learning_rate=1e-9", "callbacks.early_stopping.patience=1")
    with caplog.at_level(logging.INFO):
        train(cfg)
    text = caplog.text
    assert re.search(r"step 2/12 epoch 1/1 .*\| best val/accuracy \d\.\d{4} \(step 2\)", text)
    assert "early stopping at step 4: val/accuracy has not improved" in text
    assert re.search(r"model BertClassifier: [\d,]+ parameters", text)


def test_progress_bar_shows_the_epoch():
    from mlxlab.training.callbacks import ProgressBar

    bar = ProgressBar(steps_per_epoch=10, max_epochs=3)
    bar.on_train_start(30, 0)
    bar.on_step(12, {"train/loss": 0.5})
    assert bar.postfix["epoch"] == "2/3"
    bar.on_step(21, {})
    assert bar.postfix == {"epoch": "3/3", "loss": "0.5000"}
    bar.on_train_end()


# --------------------------------------------------------------------------- 8. sweeps installed


def test_first_install_command_pulls_what_the_readme_sweeps_need():
    pyproject = (REPO / "pyproject.toml").read_text()  # no tomllib: Python 3.10 is supported
    block = re.search(r"^dependencies = \[(.*?)^\]", pyproject, re.S | re.M).group(1)
    names = {re.split(r"[<>=;\s\[]", d, maxsplit=1)[0] for d in re.findall(r'^\s*"([^"]+)"', block, re.M)}
    sweeps = doc_block("## Sweeps", "bash")
    assert "hydra/launcher=joblib" in sweeps and "hydra-joblib-launcher" in names
    assert "hparams_search=" in sweeps and "optuna" in names  # mlxlab's own sweeper over Optuna


# --------------------------------------------------------------------------- 9. plots


def test_plots_carry_titles_and_label_names(make_cfg):
    from PIL import Image

    cfg = make_cfg(*FAST, "tracking=none")
    train(cfg)
    plots = Path(cfg.paths.output_dir) / "plots"
    matrix = Image.open(plots / "confusion_matrix.png").text
    assert matrix["Title"].startswith("validation confusion matrix, step")
    assert matrix["Description"] == "labels: 0, 1"  # Survived's values, not class indices
    assert Image.open(plots / "loss_curve.png").text["Title"] == "loss by step"


# --------------------------------------------------------------------------- 10. search presets


@pytest.mark.parametrize("search", ["titanic_optuna", "tinystories_optuna"])
def test_search_presets_follow_the_task(make_cfg, search):
    base = ["optimized_metric=val/loss", "optimized_mode=min"] if "tinystories" in search else []
    cfg = make_cfg(f"hparams_search={search}", "task_name=iris", *base)
    assert cfg.tracking.experiment_name == "iris" and cfg.hydra.sweeper.study_name == "iris"
    if search == "titanic_optuna":
        assert make_cfg(f"hparams_search={search}").tracking.experiment_name == "train"


# --------------------------------------------------------------------------- 12. tokenizer log


def test_tokenizer_cache_hit_is_logged_as_one(make_cfg, tmp_path, caplog):
    from mlxlab.config import instantiate

    cfg = make_cfg()
    with caplog.at_level(logging.INFO, logger="mlxlab.data.tokenizer"):
        instantiate(cfg.data).setup(tmp_path / "a")
        first = caplog.text
        caplog.clear()
        instantiate(cfg.data).setup(tmp_path / "b")
    assert "trained wordpiece tokenizer" in first
    assert "cache hit: wordpiece tokenizer" in caplog.text and "trained" not in caplog.text
    assert (tmp_path / "a/tokenizer.json").read_text() == (tmp_path / "b/tokenizer.json").read_text()


# --------------------------------------------------------------------------- 13. fast new stores


def test_a_new_store_is_a_copy_of_the_migrated_template(tmp_path, monkeypatch):
    import sqlite3

    monkeypatch.setenv("MLXLAB_CACHE_DIR", str(tmp_path / "cache"))
    settings.reload()  # mlxlab reads its variables once (runtime/settings.py)
    ensure_store(f"sqlite:///{tmp_path}/a/mlflow.db", "first")  # migrates, keeps a template
    assert store_template_path().is_file()
    start = time.monotonic()
    ensure_store(f"sqlite:///{tmp_path}/b/mlflow.db", "second")
    assert time.monotonic() - start < 5  # a full migration takes ~10 s on 2 cores

    def schema(db):
        with sqlite3.connect(db) as conn:
            return sorted(conn.execute("SELECT type, name, sql FROM sqlite_master").fetchall())

    assert schema(tmp_path / "a/mlflow.db") == schema(tmp_path / "b/mlflow.db")
    client = MlflowClient(f"sqlite:///{tmp_path}/b/mlflow.db")
    assert client.get_experiment("0").artifact_location == str(tmp_path / "b/artifacts/0")
    assert [e.name for e in client.search_experiments()] == ["second", "Default"]


# ------------------------------------------------- 14. users of the old scripts


def migration_rows() -> list[tuple[str, list[str]]]:
    """(old flags, mlxlab overrides) of the migration table (docs/guide/training.md); "—" rows
    map to none."""
    section = TRAINING_GUIDE[TRAINING_GUIDE.index("## Coming from the old training scripts"):]
    section = section[:section.index("## Your own presets")]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`--"):
            continue
        overrides = " ".join(re.findall(r"`([^`]+)`", cells[1])).split()
        rows.append((cells[0], overrides))
    return rows


def test_every_key_of_the_migration_table_composes(tmp_path):
    """Each old flag's mlxlab overrides compose with the real config (Hydra refuses a key the
    config does not have) and pass validation (a wrong group option or value fails there)."""
    from omegaconf import OmegaConf

    from mlxlab.config import validate

    rows = migration_rows()
    flags = " ".join(old for old, _ in rows)
    for flag in ("--train", "--epochs", "--batch-size", "--model-type", "--no-mlflow",
                 "--config configs/production.json", "--resume", "--dataset-id",
                 "--auto-vocab-size", "--cloud-provider"):
        assert flag in flags, f"the migration table lacks {flag}"
    # Rows merged into as few compositions as their keys allow (one per distinct group option).
    batches: list[dict[str, str]] = []
    for _, overrides in rows:
        pairs = dict(o.partition("=")[::2] for o in overrides)
        lm = any(k == "data" and v == "streaming" or k == "model" and v.startswith("transformer")
                 for k, v in pairs.items())
        if lm:
            pairs = {"data": "streaming", "optimized_metric": "val/loss", "optimized_mode": "min",
                     **pairs}
        # a row's keys mean the default option of their group where the row names none
        defaults = {"model": "bert", "data": "titanic", "trainer": "simple", "tracking": "mlflow"}
        pairs = {**{g: o for g, o in defaults.items()
                    if any(k.startswith(f"{g}.") for k in pairs)}, **pairs}
        for batch in batches:
            if batch["__lm"] == lm and all(batch.get(k, v) == v for k, v in pairs.items()):
                batch.update(pairs)
                break
        else:
            batches.append({"__lm": lm, **pairs})
    assert len(batches) < len(rows) / 4
    for batch in batches:
        overrides = [f"{k}={v}" for k, v in batch.items() if k != "__lm"]
        cfg = compose_cfg(tmp_path, overrides)
        validate(cfg)
        for key in batch:
            if "." in key and not key.startswith("hydra."):
                assert OmegaConf.select(cfg, key, throw_on_missing=False) is not None, key


def test_readme_config_dir_preset_runs_through_the_cli(tmp_path, cli_env):
    """The `--config-dir` example of docs/guide/training.md verbatim: its preset file in a folder
    of the user's own, its command (plus short-run overrides) through mlxlab-train's main in a
    process of its own."""
    from omegaconf import OmegaConf

    from one_process import each_in_one_process

    preset = doc_block("saved as `my_conf/experiment/my_preset.yaml`", "yaml", TRAINING_GUIDE)
    command = doc_block("runs with", "bash", TRAINING_GUIDE).strip()
    assert command == "mlxlab-train --config-dir ./my_conf experiment=my_preset"
    (tmp_path / "my_conf" / "experiment").mkdir(parents=True)
    (tmp_path / "my_conf" / "experiment" / "my_preset.yaml").write_text(preset)
    short = ["trainer.max_epochs=1", "trainer.max_steps=3", "callbacks.progress.enabled=false"]
    # the run and a misspelt preset in turn in one process (mlxlab-train's app, unsupervised)
    (code, err, _), (bad_code, bad_err, _) = each_in_one_process(
        [[*command.split(), *short],
         ["mlxlab-train", "--config-dir", "./my_conf", "experiment=my_presett"]],
        cli_env, cwd=tmp_path)
    assert code == 0, err[-3000:]
    (run_dir,) = (tmp_path / "outputs" / "my_preset").iterdir()  # the preset's task_name
    job = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    assert job["model"]["_target_"] == "mlxlab.models.encoders.cnn_hybrid.CNNHybrid"
    assert job["model"]["cnn_filters"] == 64 and job["optimizer"]["learning_rate"] == 3e-4
    assert job["objective"]["label_smoothing"] == 0.1 and job["trainer"]["max_steps"] == 3
    assert (run_dir / "tracking" / "metrics.csv").is_file()  # the preset's tracking=csv
    assert not (tmp_path / "mlruns").exists()
    assert list((run_dir / "checkpoints").glob("step_*"))
    assert bad_code == 2 and "'my_preset'" in bad_err.strip().splitlines()[-1]


# --------------------------------------------------------------------------- 11. README as written


def readme_example(verb: str) -> str:
    """The example command of `verb` in the README's table of commands."""
    return re.search(rf"^\| `{verb}` \| `([^`]+)`", README, re.M).group(1)


def stamped_run(make_cfg, root: Path, task: str, *overrides: str) -> Path:
    """A run trained in-process into outputs/<task>/<time>, as the CLI names its folders."""
    from omegaconf import open_dict

    cfg = make_cfg(*overrides)
    run_dir = root / "outputs" / task / "2026-11-25_12-00-00_000000"
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
    train(cfg)
    return run_dir


def run_readme_command(command: str, run_dir: Path, cwd: Path, env: dict):
    rel = run_dir.relative_to(cwd)
    args = command.replace(f"outputs/{rel.parts[1]}/<time>", str(rel)).split()
    assert args[0] == "mlxlab" and str(rel) in args, command
    return subprocess.run([str(Path(PYTHON).parent / "mlxlab"), *args[1:]], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_readme_lists_every_data_and_objective_option():
    """The sentence that lists the config groups' choices names every option there is."""
    from mlxlab.config import group_options

    for group, pattern in (("data", r"`data`\s*\(([^)]*)\)"),
                           ("objective", r"`objective`\s*\(what it trains\s+toward: ([^)]*)\)")):
        listed = re.findall(r"`([^`]+)`", re.search(pattern, README).group(1))
        assert sorted(listed) == group_options(group), group


def test_readme_first_command_puts_the_verbs_on_path_for_the_blocks_below(tmp_path, cli_env):
    """`.venv/bin/mlxlab-train` and then bare `mlxlab runs list` was "command not found": the
    first command activates the environment; in a folder whose .venv is this one, the rest of
    that line and the store block's first line run as written."""
    first = doc_block("## The two commands", "bash").strip()
    steps = [s.strip() for s in first.split("&&")]
    assert steps[0] == "python3 -m venv .venv" and steps[1].startswith(".venv/bin/pip install")
    assert steps[2] == ". .venv/bin/activate" and steps[3] == "mlxlab-train"
    (tmp_path / ".venv").symlink_to(Path(PYTHON).parent.parent)
    listing = doc_block("the nearest folder above the working", "bash").splitlines()[0]
    listing = listing.split("#")[0].strip()
    assert listing == "mlxlab runs list"
    path = ":".join(p for p in cli_env["PATH"].split(":") if ".venv" not in p)
    done = subprocess.run(["bash", "-c", f"{steps[2]} && {listing}"], cwd=tmp_path,
                          env={**cli_env, "PATH": path}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_readme_predict_example_runs_on_the_default_run(make_cfg, tmp_path, cli_env):
    """The predict row read a test.csv the clone does not have: it names the shipped file."""
    (tmp_path / "src").symlink_to(REPO / "src")  # a fresh clone's files
    run_dir = stamped_run(make_cfg, tmp_path, "train", *FAST, "tracking=none")
    done = run_readme_command(readme_example("predict"), run_dir, tmp_path, cli_env)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = (tmp_path / "submission.csv").read_text().splitlines()
    assert rows[0] == "PassengerId,Survived" and len(rows) == 892


@pytest.mark.slow
def test_readme_export_example_runs_on_its_run(make_cfg, tmp_path, cli_env):
    """The export row exported the default BERT run, which --format hf refuses (pre-norm, no
    pooler): it names a run that exports, and says how the BERT run does."""
    command = readme_example("export")
    assert "outputs/tinystories_nano/<time>" in command
    run_dir = stamped_run(make_cfg, tmp_path, "tinystories_nano", "experiment=tinystories_nano",
                          "tracking=none", "trainer.max_steps=2", "trainer.eval_every_steps=2",
                          "callbacks.progress.enabled=false")
    done = run_readme_command(command, run_dir, tmp_path, cli_env)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / command.split("--out ")[1].split()[0]
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
