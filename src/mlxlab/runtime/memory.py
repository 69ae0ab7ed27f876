"""Keep freed memory in the process's heap while training (glibc's allocator, Linux).

MLX's CPU backend allocates every intermediate array with malloc and frees it when the step is
done with it; a training step allocates and frees the same few hundred MB each time. glibc
hands large freed blocks back to the kernel (blocks over its mmap threshold are unmapped; the
heap's free top is trimmed), so the next step faults the same memory in again and the kernel
zeroes every page: measured on the nano step, 10-33 thousand page faults per step and ~14 % of
its CPU time in the kernel (docs/benchmarks-history.md). With mmap off and no trimming,
the heap keeps its peak and the steps reuse it. The peak (max RSS) does not change; the memory is
just not given back until the process exits.

`Trainer.fit` calls `keep_freed_memory()` before the first step. MLXLAB_MALLOC=default leaves the
allocator as it is. Elsewhere (macOS, musl) this does nothing.
"""

from __future__ import annotations

import ctypes
import logging
import platform
import sys

from mlxlab.runtime import settings

log = logging.getLogger(__name__)

# mallopt(3) parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4

_done = False


def keep_freed_memory() -> bool:
    """Turn off glibc's returning of freed memory for this process (once); True when it is off."""
    global _done
    if _done:
        return True
    if not settings.current().keep_freed_memory:  # MLXLAB_MALLOC=default
        return False
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    # mmap max 0: large blocks come from the heap too; trim threshold: never shrink the heap.
    _done = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    if not _done:
        log.debug("mallopt refused; glibc keeps returning freed memory")
    return _done
