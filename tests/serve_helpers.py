"""`mlxlab serve` started as a user starts it, for the tests that talk to it over HTTP."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from conftest import MLXLAB


@contextmanager
def serving(args: list[str], log: Path, env: dict, wait_s: float = 240) -> Iterator[str]:
    """`mlxlab serve ARGS --port 0` (a free port, printed), its output in `log`: yields the
    base URL (http://127.0.0.1:PORT/v1) once the server says it listens; then SIGTERM, and it
    must exit 0."""
    with open(log, "w") as out:
        proc = subprocess.Popen([MLXLAB, "serve", *args, "--port", "0"], stdout=out,
                                stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + wait_s
        while not (found := re.search(r"on http://127\.0\.0\.1:(\d+)/v1", log.read_text())):
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"no server in {wait_s:.0f} s"
            time.sleep(0.3)
        yield f"http://127.0.0.1:{found.group(1)}/v1"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
