"""The background thread that tokenizes and packs ahead of the trainer (`data.prefetch` ready
batches queued): only that bounded queue is ever held beside the stream's own buffers."""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterator

# One background thread tokenizes at ~0.5M tokens/s, far above what training consumes; the
# tokenizers thread pool would only compete with the BLAS threads of the training step.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_DONE = object()


def threaded(produce: Iterator, prefetch: int) -> Iterator:
    """Run a generator in a daemon thread, handing items over through a bounded queue."""
    items: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for item in produce:
                if not put(item):
                    return
            put(_DONE)
        except BaseException as e:  # re-raised in the consumer, with its traceback
            put(e)

    thread = threading.Thread(target=work, daemon=True, name="mlxlab-data")
    thread.start()
    try:
        while True:
            item = items.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()  # the consumer left early (break, exception): let the producer exit
        thread.join(timeout=5)

