#!/usr/bin/env bash
# Start a local MLflow tracking server (UI + REST API) on the central store that runs write,
# <project>/mlruns/mlflow.db, serving the artifacts in <project>/mlruns/artifacts itself.
#
#   scripts/mlflow_server.sh                       # http://127.0.0.1:5000
#   PORT=5001 WORKERS=1 scripts/mlflow_server.sh   # another port, one worker
#   MLRUNS_DIR=/data/mlruns scripts/mlflow_server.sh
#
# Runs that write the sqlite file directly (the default) and runs pointed at the server see the
# same experiments:
#   mlxlab-train tracking.uri=http://127.0.0.1:5000
#   MLFLOW_TRACKING_URI=http://127.0.0.1:5000 mlxlab-train --multirun optimizer.learning_rate=1e-4,3e-4
#
# mlflow runs as `python -m mlflow` with $PYTHON, else <project>/.venv/bin/python, else the
# python3 on PATH. For a PostgreSQL backend pass BACKEND_STORE_URI=postgresql://user:pass@host/db.
# Extra arguments go to `mlflow server` unchanged. It listens on loopback only: put a proxy with
# auth in front before exposing it.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mlruns="${MLRUNS_DIR:-$root/mlruns}"
python="${PYTHON:-$root/.venv/bin/python}"
[[ -x "$python" ]] || python="$(command -v python3 || command -v python)"
mkdir -p "$mlruns/artifacts"

exec "$python" -m mlflow server \
  --backend-store-uri "${BACKEND_STORE_URI:-sqlite:///$mlruns/mlflow.db}" \
  --artifacts-destination "$mlruns/artifacts" \
  --host 127.0.0.1 \
  --port "${PORT:-5000}" \
  --workers "${WORKERS:-2}" \
  "$@"
