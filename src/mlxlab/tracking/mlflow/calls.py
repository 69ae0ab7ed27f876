"""How mlxlab calls MLflow: retried while a sqlite store is locked, in batches within
`log_batch`'s limits. Every module of this package calls the store through these."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

MAX_PARAMS_PER_BATCH = 100  # MLflow log_batch limits
MAX_TAGS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
# MLflow already makes sqlite wait 20 s for a lock (PRAGMA busy_timeout); a store still locked
# after that, or a server answering "database is locked", gets ~7 s more of backoff in all.
RETRY_ATTEMPTS = 8


def is_transient(error: BaseException) -> bool:
    """A locked sqlite store: the same call works once the other writer is done."""
    message = str(error).lower()
    return "database is locked" in message or "database table is locked" in message


def is_transient_http(error: BaseException) -> bool:
    """A timeout, a refused or reset connection, a 5xx: the same call may work later."""
    text = str(error)
    return any(m in text for m in ("timed out", "Max retries exceeded", "Connection", " 502",
                                   " 503", " 504", "database is locked"))


def retrying(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """fn(*args, **kwargs), retried with jittered exponential backoff while sqlite is locked."""
    for attempt in range(RETRY_ATTEMPTS):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if attempt == RETRY_ATTEMPTS - 1 or not is_transient(e):
                raise
            time.sleep(min(2.0, 0.05 * 2**attempt) * random.uniform(1.0, 1.5))
    raise AssertionError("unreachable")


def chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    """`items` in slices of at most `size` (a batch limit above)."""
    for i in range(0, len(items), size):
        yield items[i : i + size]
