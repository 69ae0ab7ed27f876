"""A tracking server that may not answer: the probe at start (`probe_store`, fail fast with
TrackingUnavailable) and MLflow's HTTP calls bounded to one try (`bounded_http`)."""

from __future__ import annotations

import contextlib
import math
import threading

from mlxlab.errors import UserError
from mlxlab.tracking.mlflow.environment import set_for_the_call
from mlxlab.tracking.mlflow.offline import reachable
from mlxlab.tracking.mlflow.store import resolve_uri, sqlite_path


class TrackingUnavailable(UserError, ConnectionError):
    """The tracking store named by the config does not answer; the message says what to do."""


def bounded_http(timeout: float) -> contextlib.AbstractContextManager[None]:
    """MLflow's HTTP calls inside fail after one try of at most `timeout` seconds, instead of
    its default 7 retries with backoff of up to 120 s each (minutes on a dead server). MLflow
    reads both only from the environment; bounded calls may nest (end() -> a reconnect)."""
    return set_for_the_call({
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, math.ceil(timeout))),
    })


def probe_store(uri: str | None, timeout: float = 5.0, request_timeout: float = 30.0) -> None:
    """Raise TrackingUnavailable unless the store at `uri` answers: a connection within
    `timeout` s (a dead port fails at once), then one API reply within `request_timeout` s (a
    fresh server builds its database on its first request).

    Local sqlite stores are not probed (ensure_store creates them). A server is asked once for
    one experiment, with MLflow's retries off, in a thread given a hard deadline.
    """
    uri = resolve_uri(uri)
    if sqlite_path(uri) is not None:
        return
    from mlflow import MlflowClient  # imported here: its first import alone can take seconds

    fix = ("start the server (scripts/mlflow_server.sh), fix tracking.uri, or train untracked "
           "with tracking=none")
    if uri.startswith(("http://", "https://")) and not reachable(uri, timeout):
        raise TrackingUnavailable(
            f"MLflow tracking server {uri} does not answer (no connection within {timeout:g} s, "
            f"tracking.connect_timeout): {fix}"
        )
    outcome: dict[str, BaseException | None] = {}

    def ask() -> None:
        try:
            with bounded_http(request_timeout):
                MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
            outcome["error"] = None
        except Exception as e:
            outcome["error"] = e

    thread = threading.Thread(target=ask, daemon=True, name="mlflow-probe")
    thread.start()
    thread.join(timeout + request_timeout + 1)
    if "error" not in outcome:
        raise TrackingUnavailable(
            f"MLflow tracking store {uri} did not answer within {request_timeout:g} s "
            f"(tracking.request_timeout): {fix}"
        )
    error = outcome["error"]
    if error is not None:
        text = str(error)
        if "timed out" in text.lower():
            reason = f"no reply within {request_timeout:g} s, tracking.request_timeout"
        elif "Max retries exceeded" in text or "Connection" in text:
            reason = "the connection failed"
        else:
            reason = text.strip().splitlines()[0][:160]
        raise TrackingUnavailable(f"MLflow tracking store {uri} does not answer ({reason}): {fix}")

