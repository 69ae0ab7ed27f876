"""What the user-level cache holds, as entries the rooms that write them describe.

The cache root is `Settings.cache_dir` ($MLXLAB_CACHE_DIR, else $XDG_CACHE_HOME/mlxlab, else
~/.cache/mlxlab). Each room that keeps something there lists its own entries (models/sources/
conversions.py: GGUF conversions and their unfinished temporaries; the fused kernels' builds and
MLflow's empty-store template, where they lie under the root); `mlxlab cache list|clear` shows
and removes them. Everything in it can be made again: removing an entry costs its next user the
time to remake it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CacheEntry:
    """One thing in the cache: its file or folder, what it is, its size on disk in bytes, what
    made it, when (seconds since the epoch); `kept_by_all`: why `cache clear --all` keeps it
    ("" when it does not; the kernels this install loads); `busy`: why nothing removes it (a
    writer that may still run), "" when it may go."""

    path: Path
    kind: str
    size: int
    source: str
    when: float
    kept_by_all: str = ""
    busy: str = ""


def disk_size(path: Path) -> int:
    """Bytes of a file, or of every file under a folder (links not followed)."""
    if not path.is_dir():
        return path.lstat().st_size if path.exists() or path.is_symlink() else 0
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):  # removed while we walk (a writer finishing)
                total += (Path(folder) / name).lstat().st_size
    return total


def remove(path: Path) -> None:
    """Remove a cache entry: a folder with everything in it, or a file."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
