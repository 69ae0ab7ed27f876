"""The sha256 of a file, read in chunks so a multi-GB model file never sits in memory whole:
what a checkpoint's checksums.json records (checkpoint/atomic.py), what keys a converted GGUF
file's cache folder (models/sources/gguf.py), what the tests check a downloaded wheel against."""

from __future__ import annotations

import hashlib
from pathlib import Path

CHUNK = 1 << 22  # 4 MiB a read


def file_sha256(path: str | Path) -> str:
    """The hex sha256 of the file at `path`."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
