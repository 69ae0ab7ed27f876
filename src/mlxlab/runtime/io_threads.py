"""MLX's file-reading thread pools, started while the process still has room for threads.

MLX (0.32) reads arrays from files with two pools of 4 threads each, both made on first use:
`io::thread_pool()` (every lazily loaded array: `mx.load`, a checkpoint restored, the best
weights loaded back after training, a save that evaluates them) and
`ParallelFileReader::thread_pool()` (a single tensor of 32 MiB or more, read in 32 MiB pieces).
A thread's stack is mapped when it starts, so under an address-space limit (RLIMIT_AS, `ulimit
-v`) a pool made late, after training filled the address space, cannot start its threads, and MLX
does not survive that (measured with MLX 0.32.4, benchmarks/faults/mlx_io_pool_deadlock.py):
when no thread starts, mx.load raises "Resource temporarily unavailable" (and a checkpoint write
that evaluates loaded arrays fails with it); when some start, the pool's constructor throws with
joinable threads (std::terminate) or the caller waits for ever on a task no thread will run.

`start_io_threads()` makes both pools at process start (train.py, through
training/startup.py's prepare_device): a tiny file, and a sparse one holding one 32 MiB tensor
(no disk written, no page of it read from a disk), are loaded once. Their threads then exist for
the life of the process, and the memory they reserve is part of the address space the
micro-batch budget sees (runtime/memory_limits.py).
"""

from __future__ import annotations

import json
import logging
import struct
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

LARGE_READ = 1 << 25  # ParallelFileReader's piece: a tensor this large or larger uses its pool

_started = False


def start_io_threads() -> bool:
    """Start MLX's two file-reading pools now (once per process); True when they run."""
    global _started
    if _started:
        return True
    import mlx.core as mx  # the training process's import (the supervising parent has none)

    try:
        with tempfile.TemporaryDirectory(prefix="mlxlab-io-") as tmp:
            small = Path(tmp) / "small.safetensors"
            mx.save_safetensors(str(small), {"x": mx.zeros((1,), dtype=mx.uint8)})
            large = Path(tmp) / "large.safetensors"
            _sparse_safetensors(large, LARGE_READ)
            mx.eval(mx.load(str(small))["x"], mx.load(str(large))["x"])
    except (OSError, RuntimeError) as e:  # no room even now: later loads say it themselves
        log.warning("MLX's file-reading threads could not start (%s): loading arrays may fail "
                    "under this process's memory limit", e)
        return False
    _started = True
    return True


def _sparse_safetensors(path: Path, nbytes: int) -> None:
    """A safetensors file of one uint8 tensor of `nbytes` zeros, written as a hole."""
    header = json.dumps({"x": {"dtype": "U8", "shape": [nbytes],
                               "data_offsets": [0, nbytes]}}).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + nbytes)
