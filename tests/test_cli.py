"""The `mlxlab` command as a user runs it: --help on every verb, `runs list|show|compare`,
`register` then loading the registered model, `serve` answering /invocations."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request

import pandas as pd
import pytest

from conftest import MLXLAB, mlxlab
from mlxlab.cli.main import VERBS, main
from mlxlab.cli.runs import ACTIONS
from mlxlab.runs.inference import load_run, predict_frame


def test_every_verb_has_help(capsys):
    done = mlxlab("--help")
    assert done.returncode == 0
    assert all(f"  {verb} " in done.stdout for verb in VERBS), done.stdout
    unknown = mlxlab("frobnicate")
    assert unknown.returncode == 2 and "unknown command 'frobnicate'" in unknown.stderr
    for verb in [v for v in VERBS if v not in ("train", "runs")] + [f"runs {a}" for a in ACTIONS]:
        with pytest.raises(SystemExit) as exit_:
            main([*verb.split(), "--help"])
        assert exit_.value.code == 0, verb
        assert capsys.readouterr().out.startswith(f"usage: mlxlab {verb}"), verb
    assert main(["runs", "--help"]) == 0 and "runs compare" in capsys.readouterr().out


@pytest.mark.parametrize("verb", ["generate", "eval"])
def test_verbs_that_take_any_model_say_so_in_their_help(capsys, verb):
    """generate and eval load any model source (models/sources), not only a run folder."""
    with pytest.raises(SystemExit):
        main([verb, "--help"])
    usage = " ".join(capsys.readouterr().out.split())
    assert "MODEL a finished run folder" in usage and "a .gguf file, ollama:NAME[:TAG] or a hub " \
        "id ORG/NAME" in usage
    assert "checkpoint dir" not in usage


def run_id_of(run_dir) -> str:
    return json.loads((run_dir / "checkpoints" / "best" / "state.json").read_text())["run_id"]


def test_runs_list_show_compare_make_best_and_last_explicit(classifier_run, capsys):
    run_dir, metrics, _, uri = classifier_run
    run_id = run_id_of(run_dir)

    # in-process where a subprocess test of the same verb exists elsewhere (test_tracking)
    assert main(["runs", "list", "--uri", uri]) == 0
    listing = capsys.readouterr().out
    row = next(line for line in listing.splitlines() if run_id in line)
    assert "FINISHED" in row and f"{metrics['val/accuracy']:.4f}" in row
    assert "best val/accuracy" in listing

    # show and compare too: test_dead_runs and test_resume run `runs show`, test_eval_tasks and
    # others `runs compare`, as processes of their own
    assert main(["runs", "show", str(run_dir), "--uri", uri]) == 0  # by folder: its MLflow run
    show = capsys.readouterr().out
    assert f"run {run_id}" in show and "best checkpoint: step" in show
    assert "last checkpoint: step 100" in show
    accuracy = next(line for line in show.splitlines() if line.split()[:1] == ["val/accuracy"])
    assert accuracy.split()[1] == f"{metrics['val/accuracy']:.4f}"  # the best column
    assert "optimizer.learning_rate" in show  # params

    assert main(["runs", "compare", run_id, str(run_dir), "--uri", uri, "--all-params"]) == 0
    lines = capsys.readouterr().out.splitlines()
    best = next(line for line in lines if line.strip().startswith("best val/accuracy")).split()
    assert best[2:] == [f"{metrics['val/accuracy']:.4f}"] * 2
    assert any(line.strip().startswith("last val/accuracy") for line in lines)

    assert main(["runs", "show", "no-such-run", "--uri", uri]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("mlxlab runs show: error: no-such-run is neither a run folder")


def test_register_then_load_the_registered_model(classifier_run):
    """`mlxlab register` logs the run's best checkpoint as a pyfunc model on its own MLflow run;
    mlxlab.load_model gives the same predictions as `predict_frame` on the run folder."""
    import mlxlab as package

    run_dir, _, titanic, uri = classifier_run
    done = mlxlab("register", run_dir, "--name", "titanic-tiny", "--alias", "champion",
                  "--uri", uri)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"(run {run_id_of(run_dir)})" in done.stdout  # the training run holds the model
    assert "mlxlab serve models:/titanic-tiny@champion" in done.stdout

    rows = titanic.head(12).drop(columns=["Survived"])
    served = package.load_model("titanic-tiny@champion", uri).predict(rows)
    direct = predict_frame(load_run(run_dir), rows, probability=True)
    pd.testing.assert_frame_equal(served, direct.rename(columns={"Survived": "prediction"}))


def test_serve_bad_target_is_one_clear_line(tmp_path):
    done = mlxlab("serve", tmp_path / "nope", "--uri", f"sqlite:///{tmp_path}/mlflow.db")
    assert done.returncode == 2
    assert done.stderr.strip() == (f"mlxlab serve: error: {tmp_path / 'nope'}: no such run "
                                   "folder, and not a models:/ or runs:/ URI or a model folder "
                                   "(config.json, *.safetensors, tokenizer.json; an embedder's "
                                   "modules.json)")


def test_serve_refuses_language_model_settings_for_a_classifier(classifier_run, monkeypatch,
                                                                capsys):
    """MLflow's model server checks no key and no body size and has no draft: a setting asked
    for is not ignored. (In-process: test_serve_bad_target_is_one_clear_line runs `mlxlab serve`'s
    exit 2 as a process of its own.)"""
    from mlxlab.cli import serve
    from mlxlab.runtime import settings

    def started(*_):  # a setting let through would start MLflow's server: fail, not hang
        raise AssertionError("the classifier's server was started")

    monkeypatch.setattr(serve, "_mlflow", started)
    run_dir = classifier_run[0]
    for argv, key in (([], "k"), (["--max-request-mib", "1"], None),
                      (["--draft", str(run_dir)], None)):
        if key:
            monkeypatch.setenv("MLXLAB_API_KEY", key)
        else:
            monkeypatch.delenv("MLXLAB_API_KEY", raising=False)
        settings.reload()
        assert main(["serve", str(run_dir), *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.strip().startswith("mlxlab serve: error: an API key (--api-key, "
                                      "MLXLAB_API_KEY), --max-request-mib and --draft "
                                      "are for language models"), err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_serve_answers_invocations_like_predict(classifier_run, tmp_path):
    """A run folder served by `mlxlab serve` answers /invocations with the run's predictions;
    SIGTERM stops the server (its web workers too)."""
    run_dir, _, titanic, _ = classifier_run
    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        server = subprocess.Popen([MLXLAB, "serve", str(run_dir), "--port", str(port)],
                                  stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                assert server.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, "no answer in 240 s"
                time.sleep(0.5)
        rows = titanic.head(5).drop(columns=["Survived"])
        body = json.dumps({"dataframe_records": json.loads(rows.to_json(orient="records"))})
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", body.encode(),
                                         {"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(request, timeout=60).read())["predictions"]
        direct = predict_frame(load_run(run_dir), rows, probability=True)
        assert [r["prediction"] for r in answer] == direct["Survived"].tolist()
        assert [r["PassengerId"] for r in answer] == rows["PassengerId"].tolist()
        assert [r["probability"] for r in answer] == pytest.approx(direct["probability"].tolist())
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
    assert os.path.exists(run_dir)  # serving never touches the run folder


def test_pointing_mlflow_at_a_store_leaves_its_globals_unset(tmp_path, monkeypatch):
    """register/load point MLflow's fluent globals at a store for a moment; afterwards a client
    built without a registry URI must follow its own tracking URI again, not that store (this
    leak registered another test's model in the wrong store)."""
    import os

    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    from mlxlab.serving.registry import pointed_at

    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(registry_utils, "_registry_uri", None)
    monkeypatch.setattr(tracking_utils, "_tracking_uri", None)
    with pointed_at(f"sqlite:///{tmp_path}/store.db"):
        assert registry_utils._registry_uri.endswith("store.db")
    assert registry_utils._registry_uri is None and tracking_utils._tracking_uri is None
    assert "MLFLOW_REGISTRY_URI" not in os.environ and "MLFLOW_TRACKING_URI" not in os.environ


def test_serve_prints_its_url_once_the_port_accepts(tmp_path, monkeypatch):
    """MLflow's model server takes seconds to bind its port: `mlxlab serve` prints the URL only
    once a connection to it is accepted (a client started on the printed line is answered)."""
    import io
    import socket
    import sys as system

    from mlxlab.cli import serve

    port = free_port()
    late_server = ("import socket, time; time.sleep(1.5); s = socket.socket(); "
                   "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
                   f"s.bind(('127.0.0.1', {port})); s.listen(); time.sleep(2)")
    real_popen = subprocess.Popen
    monkeypatch.setattr(serve.subprocess, "Popen", lambda command, **kw: real_popen(
        [system.executable, "-c", late_server], start_new_session=True))
    monkeypatch.setattr(serve.signal, "signal", lambda *a: None)
    seen = []

    class Out(io.StringIO):
        def write(self, text: str) -> int:
            if "serving" in text:
                with socket.socket() as probe:
                    seen.append(probe.connect_ex(("127.0.0.1", port)) == 0)
            return super().write(text)

    monkeypatch.setattr(system, "stdout", Out())
    (tmp_path / "mlflow.db").touch()
    args = serve.argparse.Namespace(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", host="127.0.0.1",
                                    port=port, workers=None)
    assert serve._mlflow(args, "models:/titanic-bert@champion", str(tmp_path)) == 0
    assert seen == [True]
