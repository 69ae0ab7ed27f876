"""MLX's file-reading threads under an address-space limit (RLIMIT_AS, `ulimit -v`).

MLX (0.32.4) reads arrays from files on threads: `io::thread_pool()`, 4 threads made on the
first lazily loaded array of a process (`mx.load`, a checkpoint restored, the best weights loaded
back after training, a save that evaluates them) and kept; and, for a file read by path with a
tensor of 32 MiB or more, 4 more threads started for that read (ParallelFileReader's pool) and
ended after it. A thread's stack is mapped when it starts, so under an address-space limit,
after training filled the address space, a thread that must start then cannot, and MLX does not
survive that (measured with MLX 0.32.4, tests/test_memory_limits.py): when no
thread starts, mx.load raises "Resource temporarily unavailable"; when some start, the pool's
constructor throws with joinable threads (std::terminate) or the caller waits for ever on a task
no thread will run.

So the process starts the kept pool at once (`start_io_threads`, from training/startup.py's
prepare_device: a tiny file loaded), and mlxlab's own loads go through `load_arrays`, which under
an address-space limit hands MLX a plain Python stream: MLX then reads on the kept pool, one read
at a time, and starts no thread. Without a limit, threads cost no room and `load_arrays` is
`mx.load`.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import weakref
from pathlib import Path
from typing import TYPE_CHECKING

from mlxlab.runtime.memory.memory_limits import address_space_limit

if TYPE_CHECKING:
    import mlx.core as mx

log = logging.getLogger(__name__)

RELEASE_WAIT_S = 10.0

_started = False


def start_io_threads() -> bool:
    """Start MLX's kept file-reading pool now (once per process); True when it runs."""
    global _started
    if _started:
        return True
    import mlx.core as mx  # the training process's import (the supervising parent has none)

    try:
        with tempfile.TemporaryDirectory(prefix="mlxlab-io-") as tmp:
            small = Path(tmp) / "small.safetensors"
            mx.save_safetensors(str(small), {"x": mx.zeros((1,), dtype=mx.uint8)})
            mx.eval(mx.load(str(small))["x"])
    except (OSError, RuntimeError) as e:  # no room even now: later loads say it themselves
        log.warning("MLX's file-reading threads could not start (%s): loading arrays may fail "
                    "under this process's memory limit", e)
        return False
    _started = True
    return True


def load_arrays(path: str | Path) -> dict[str, mx.array]:
    """The arrays of a safetensors file: `mx.load` (lazy, read on parallel threads), or, under an
    address-space limit, read now through a file object on the kept pool (no thread started)."""
    import mlx.core as mx

    if address_space_limit() is None:
        return mx.load(str(path))
    with open(path, "rb") as f:
        reader = _PlainReader(f)
        released = threading.Event()
        weakref.finalize(reader, released.set)
        try:
            return mx.load(reader, format="safetensors")  # read before it returns
        finally:
            # MLX's worker lets go of the stream after the read (or a failed one), taking the
            # GIL to do it: wait for that here, as a process that ends meanwhile aborts there
            del reader
            released.wait(timeout=RELEASE_WAIT_S)


class _PlainReader:
    """A file as MLX's Python-stream reader sees it. MLX reads a real file object (one with a
    name and a descriptor) as it reads a path, on a pool started for the read; this wrapper has
    only what a stream needs, so the reads run on the kept pool, one after another."""

    def __init__(self, file) -> None:
        self._file = file

    @property
    def closed(self) -> bool:
        return self._file.closed

    def readinto(self, buffer) -> int:
        return self._file.readinto(buffer)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()
