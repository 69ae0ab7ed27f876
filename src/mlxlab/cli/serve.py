"""Serve a finished run or a registered model over HTTP with MLflow's model server.

    mlxlab serve outputs/train/<time>                    # http://127.0.0.1:5001/invocations
    mlxlab serve models:/titanic-bert@champion --port 5002
    curl -s http://127.0.0.1:5001/invocations -H 'Content-Type: application/json' \
        -d '{"dataframe_records": [{"PassengerId": 1, "Pclass": 3, "Sex": "male", ...}]}'

A run folder is saved as a pyfunc model in a temporary folder (removed on exit) and served; a
models:/ or runs:/ URI is loaded from the store (--uri, else $MLFLOW_TRACKING_URI, else
<project>/mlruns/mlflow.db). It runs `python -m mlflow models serve --env-manager local` (this
environment, no new virtualenv) bound to 127.0.0.1 unless --host says otherwise; Ctrl-C stops it.
Answers: classifier rows -> id, prediction, probability; prompts -> prompt, completion
(`"params": {"max_new_tokens": N}`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from mlxlab.cli.common import CHECKPOINT_CHOICES, CHECKPOINT_HELP, guarded, parser_for

URI_SCHEMES = ("models:/", "runs:/")


def main(argv: list[str]) -> int:
    parser = parser_for("serve", __doc__)
    parser.add_argument("target", metavar="RUN|MODEL_URI",
                        help="a run folder, or models:/<name>@<alias>, models:/<name>/<version>, "
                        "runs:/<run id>/model")
    parser.add_argument("--port", type=int, default=5001, help="default 5001 (5000 is the "
                        "tracking server's)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: local only)")
    parser.add_argument("--checkpoint", choices=CHECKPOINT_CHOICES, default="best",
                        help=CHECKPOINT_HELP)
    parser.add_argument("--uri", help="tracking URI for models:/ and runs:/ targets")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    tmp = None

    def body() -> int:
        nonlocal tmp
        env = dict(os.environ)
        # mlflow execs `uvicorn` by name: find this environment's, also when the venv is not
        # activated (.venv/bin/mlxlab serve ...).
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        if args.target.startswith(URI_SCHEMES):
            from mlxlab.tracking.mlflow import resolve_uri, sqlite_path

            uri = resolve_uri(args.uri)
            db = sqlite_path(uri)
            if db is not None and not db.exists():
                raise FileNotFoundError(f"no MLflow store at {db}: register the model first "
                                        "(mlxlab register) or pass --uri")
            env["MLFLOW_TRACKING_URI"] = env["MLFLOW_REGISTRY_URI"] = uri
            model = args.target
        elif Path(args.target).expanduser().exists():
            from mlxlab.serving.registry import save_run_model

            tmp = tempfile.mkdtemp(prefix="mlxlab-serve-")
            model = str(save_run_model(Path(args.target).expanduser(), Path(tmp) / "model",
                                       args.checkpoint))
        else:
            raise FileNotFoundError(f"{args.target}: no such run folder, and not a "
                                    f"{' or '.join(URI_SCHEMES)} URI")
        command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model,
                   "-h", args.host, "-p", str(args.port), "-w", str(args.workers),
                   "--env-manager", "local"]
        print(f"serving {args.target} on http://{args.host}:{args.port}/invocations "
              "(Ctrl-C stops)", flush=True)
        # Its own process group: mlflow starts the web server as a child; stopping the group
        # stops both. SIGTERM to us (and Ctrl-C) stops them, then the temporary model goes.
        server = subprocess.Popen(command, env=env, start_new_session=True)

        def stop(*_: object) -> None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGTERM)

        signal.signal(signal.SIGTERM, stop)
        try:
            return server.wait()
        except KeyboardInterrupt:
            stop()
            return server.wait()

    try:
        return guarded("serve", body)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
