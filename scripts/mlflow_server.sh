#!/usr/bin/env bash
# Start a local MLflow tracking server (UI + REST API) backed by sqlite, serving artifacts itself.
#
#   scripts/mlflow_server.sh                       # http://127.0.0.1:5000
#   PORT=5001 WORKERS=1 scripts/mlflow_server.sh   # another port, one worker
#   MLRUNS_DIR=/data/mlruns scripts/mlflow_server.sh
#
# Then point runs at it:
#   mlxlab-train tracking.uri=http://127.0.0.1:5000
#   MLFLOW_TRACKING_URI=http://127.0.0.1:5000 mlxlab-train --multirun trainer.learning_rate=1e-4,3e-4
#
# The server keeps its own store (<mlruns>/server.db, artifacts in <mlruns>/server-artifacts),
# apart from the file store <mlruns>/mlflow.db that runs write to directly. For a PostgreSQL
# backend pass BACKEND_STORE_URI=postgresql://user:pass@host/db. Extra arguments go to
# `mlflow server` unchanged. It listens on loopback only: put a proxy with auth in front before
# exposing it.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mlruns="${MLRUNS_DIR:-$root/mlruns}"
mlflow="${MLFLOW:-$root/.venv/bin/mlflow}"
[[ -x "$mlflow" ]] || mlflow="mlflow"
mkdir -p "$mlruns/server-artifacts"

exec "$mlflow" server \
  --backend-store-uri "${BACKEND_STORE_URI:-sqlite:///$mlruns/server.db}" \
  --artifacts-destination "$mlruns/server-artifacts" \
  --host 127.0.0.1 \
  --port "${PORT:-5000}" \
  --workers "${WORKERS:-2}" \
  "$@"
