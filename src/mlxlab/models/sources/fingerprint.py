"""What proves a pretrained base is the one a run trained on: the sha256 of each file the base
is built from (config.json and the weights mlx-lm loads), and one digest over them all.

A checkpoint that holds only the trained parameters (adapters, DoRA magnitudes, a trained head)
records its base's source and this fingerprint; whoever rebuilds the model from the source
compares the fingerprint first (`check_base`), so other weights are never loaded silently
under the adapters. Building the model from those files is deterministic (mlx-lm's loading,
quantization at load and the adapters' wrapping compute the same arrays from the same bytes).

A file's sha256 is computed once per file and kept in the cache (`<cache_dir>/file_sha256/`),
keyed by its resolved path, size and modification time, so an 8B base (16 GB) is read once, not
at every save or load. Editing a file changes its modification time, hence its key.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path

from mlxlab.errors import ConfigError, MissingFileError
from mlxlab.models.base import Model
from mlxlab.runtime import settings
from mlxlab.runtime.files.checksum import file_sha256

FINGERPRINTED = ("config.json", "model*.safetensors")  # what the base's weights are built from
HASHES_DIR = "file_sha256"  # under the cache root: one small file a hashed file version


def hashes_dir() -> Path:
    """Where the cached file hashes live (`mlxlab cache list` shows it)."""
    return settings.read().cache_dir.expanduser() / HASHES_DIR


def cached_sha256(path: Path) -> str:
    """The sha256 of `path`, read from the cache when this path, size and mtime were hashed."""
    real = path.resolve()  # a hub snapshot's files are links to its blobs
    stat = real.stat()
    key = hashlib.sha256(f"{real}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()
    entry = hashes_dir() / key[:32]
    try:
        digest = entry.read_text().strip()
        if len(digest) == 64:
            return digest
    except OSError:
        pass
    digest = file_sha256(real)
    try:  # a temporary name, then a rename: two processes hashing at once never half-write it
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_name(f".{entry.name}-{uuid.uuid4().hex[:8]}")
        tmp.write_text(digest)
        os.replace(tmp, entry)
    except OSError:  # a read-only cache: hashed again next time, nothing lost
        pass
    return digest


def folder_files(folder: Path) -> dict[str, str]:
    """{file name: sha256} of the files a model folder's base is built from."""
    names = sorted({p.name for pattern in FINGERPRINTED for p in folder.glob(pattern)})
    return {name: cached_sha256(folder / name) for name in names}


def combined(files: Mapping[str, str]) -> str:
    """One digest over the files' names and digests."""
    text = "\n".join(f"{name} {digest}" for name, digest in sorted(files.items()))
    return hashlib.sha256(text.encode()).hexdigest()


def base_record(pretrained: str, revision: str | None, folder: Path) -> dict:
    """What a checkpoint records of its base: the source as the user named it (and its hub
    revision), the folder it resolved to, the fingerprint and each file's digest."""
    files = folder_files(folder)
    return {"pretrained": str(pretrained), "revision": revision, "folder": str(folder),
            "fingerprint": combined(files), "files": files}


def check_base(recorded: Mapping, folder: Path | None, where: str) -> None:
    """The base at `folder` is the one `recorded` (a checkpoint's base record) was trained on;
    else one line naming the source, what differs and the fix. `where`: the checkpoint."""
    source = recorded.get("pretrained")
    fix = (f"put the base it was trained on back at {source}, or train with "
           "checkpoint.save_base=true for checkpoints that hold every weight")
    if folder is None or not Path(folder).is_dir():
        raise MissingFileError(f"{where} holds only the trained parameters of the base "
                               f"{source}, and that base is gone: {fix}")
    now = folder_files(Path(folder))
    if combined(now) == recorded.get("fingerprint"):
        return
    was = dict(recorded.get("files") or {})
    changed = sorted(n for n in set(was) | set(now) if was.get(n) != now.get(n))
    raise ConfigError(
        f"{where} holds only the trained parameters of the base {source}, and {folder} is not "
        f"that base any more (fingerprint {str(recorded.get('fingerprint'))[:12]} recorded, "
        f"{combined(now)[:12]} now; {', '.join(changed) or 'its files'} changed): {fix}")


def holds_base(model: Model, where: str) -> Callable[[dict], None]:
    """`verify_base` (checkpoint/restore.py) for loading a checkpoint into `model`: the base it
    was built from (Model.base_source) is the one the checkpoint recorded, by its files'
    fingerprint (cached: a stat a file), else check_base's one line. `where`: what is loaded."""
    def verify(recorded: dict) -> None:
        source = model.base_source
        check_base(recorded, Path(source["folder"]) if source else None, where)
    return verify
