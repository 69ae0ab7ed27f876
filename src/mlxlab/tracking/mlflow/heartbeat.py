"""A run's heartbeat: a tag the tracking side rewrites every `tracking.heartbeat_every_seconds`.

A RUNNING run of another host (a submitit job, a run logging to a tracking server) cannot be
checked by its process id from here; a heartbeat older than a few intervals says its process is
gone (stale.py). The writer is a daemon thread of the process that holds the run: the tracking
child of a background tracker, which exits with the training process, or the sweep's launcher.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from mlxlab.tracking import tags as T
from mlxlab.tracking.mlflow.calls import retrying

log = logging.getLogger(__name__)


def heartbeat_tags(every_s: float) -> dict[str, str]:
    """The heartbeat as of now, and the interval the next ones keep."""
    return {T.HEARTBEAT: f"{time.time():.0f}", T.HEARTBEAT_EVERY: f"{every_s:g}"}


class Heartbeat:
    """Writes `run_id`'s heartbeat tag every `every_s` seconds until stop(); a failed write is
    skipped (the next one tries again): a store that is away must not stop a run."""

    def __init__(self, client: Any, run_id: str, every_s: float) -> None:
        self.client, self.run_id, self.every_s = client, run_id, float(every_s)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._beat, daemon=True, name="mlxlab-heartbeat")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._thread = None

    def _beat(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                retrying(self.client.set_tag, self.run_id, T.HEARTBEAT, f"{time.time():.0f}")
            except Exception as e:  # noqa: BLE001 - the next beat tries again
                log.debug("heartbeat of run %s not written: %s", self.run_id, e)
