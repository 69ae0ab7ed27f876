"""Tools that misbehave, for the tests of where tools run (kept free of heavy imports: each tool
worker process imports this module)."""

from __future__ import annotations

import os
import sys
import time


def spin(seconds: float) -> str:
    """Spin on the CPU (forever when seconds < 0), then answer.

    Args:
        seconds: how long to spin; below 0: forever
    """
    end = time.monotonic() + seconds
    while seconds < 0 or time.monotonic() < end:
        pass
    return "spun"


def sleep(seconds: float) -> str:
    """Sleep, then answer.

    Args:
        seconds: how long to sleep
    """
    time.sleep(seconds)
    return "slept"


def huge(chars: int) -> str:
    """Answer a very long string.

    Args:
        chars: its length
    """
    return "x" * chars


def exits(code: int) -> str:
    """Raise SystemExit.

    Args:
        code: the exit code
    """
    sys.exit(code)


def dies(code: int) -> str:
    """End the process at once (no exception).

    Args:
        code: the exit code
    """
    os._exit(code)


def pid(tag: str) -> int:
    """The process id the tool runs in.

    Args:
        tag: anything
    """
    return os.getpid()
