"""Keep freed memory in the process's heap while training (glibc's allocator, Linux).

MLX's CPU backend allocates every intermediate array with malloc and frees it when the step is
done with it; a training step allocates and frees the same few hundred MB each time. glibc
hands large freed blocks back to the kernel (blocks over its mmap threshold are unmapped; the
heap's free top is trimmed), so the next step faults the same memory in again and the kernel
zeroes every page: measured on the nano step, 10-33 thousand page faults per step and ~14 % of
its CPU time in the kernel (the history record in benchmarks/results/history/). With mmap off and no trimming,
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
M_ARENA_MAX = -8
# Arenas under an address-space limit: each further thread that allocates gets one, reserving
# 64 MiB of address space (up to 8 per core), which RLIMIT_AS counts though little is touched
ARENAS_UNDER_LIMIT = 2

_done = False
_arenas_limited = False


def _mallopt():
    """glibc's mallopt, None elsewhere (macOS, musl) or when MLXLAB_MALLOC=default."""
    if not settings.current().keep_freed_memory:  # MLXLAB_MALLOC=default
        return None
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return None


def fewer_arenas_under_limit(address_limit: int | None) -> bool:
    """Under an address-space limit (RLIMIT_AS), glibc makes at most ARENAS_UNDER_LIMIT malloc
    arenas from now on (a thread's own arena reserves 64 MiB of address space), unless
    MALLOC_ARENA_MAX says how many; True when set.
    Measured on the tinystories_nano preset under `ulimit -v`: ~0.45 GB less address space at the
    peak, the same steps. Called at the training process's start, before its threads."""
    global _arenas_limited
    if address_limit is None or settings.current().malloc_arena_max:  # the user's own limit
        return False
    mallopt = _mallopt()
    if mallopt is None:
        return False
    _arenas_limited = bool(mallopt(M_ARENA_MAX, ARENAS_UNDER_LIMIT))
    return _arenas_limited


def arenas_limited() -> bool:
    """glibc's malloc arenas are few in this process (MALLOC_ARENA_MAX, or
    fewer_arenas_under_limit): a thread started later maps no arena of its own."""
    return _arenas_limited or settings.current().malloc_arena_max


def keep_freed_memory() -> bool:
    """Turn off glibc's returning of freed memory for this process (once); True when it is off."""
    global _done
    if _done:
        return True
    mallopt = _mallopt()
    if mallopt is None:
        return False
    # mmap max 0: large blocks come from the heap too; trim threshold: never shrink the heap.
    _done = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    if not _done:
        log.debug("mallopt refused; glibc keeps returning freed memory")
    return _done
