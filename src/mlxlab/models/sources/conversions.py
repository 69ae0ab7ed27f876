"""The conversion cache: each GGUF file converted once into an mlx-lm folder, kept by content.

`<cache_dir>/models/gguf/<first 16 hex digits of the file's sha256>/` holds one conversion:
config.json, model.safetensors, the tokenizer, `source.json` (the file and source that made it,
when, by which mlxlab) and `.complete`, written last, once the folder has loaded in mlx-lm. The
key is the sha256 of the whole file (what a run records as its provenance anyway), so a copy of
a file under another name, or an Ollama blob of the same file, reuses the conversion.

A conversion is written into a hidden temporary folder beside it (`.<key>-XXXXXXXX`) holding
`writer.json`, the writing process's record (runtime/files/processes.py: host, pid, pid namespace,
start time), and renamed into place when whole. A temporary whose writer is dead (killed while
converting) is removed by the next conversion; a live writer's, or one of another host, is
left alone. A temporary without a record (an older mlxlab's) is removed once nothing has
touched it for UNRECORDED_STALE_S.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from mlxlab.runtime import settings
from mlxlab.runtime.files.cache import CacheEntry, disk_size
from mlxlab.runtime.files.processes import gone_reason, this_process

COMPLETE = ".complete"  # written last into a finished, verified folder
SOURCE = "source.json"
WRITER = "writer.json"
KEY_DIGITS = 16
UNRECORDED_STALE_S = 3600.0


def conversions_root() -> Path:
    return settings.read().cache_dir / "models" / "gguf"


def conversion_folder(digest: str) -> Path:
    """Where the conversion of the file whose sha256 is `digest` lives (or will)."""
    return conversions_root() / digest[:KEY_DIGITS]


def is_complete(folder: Path) -> bool:
    return (folder / COMPLETE).is_file()


def new_temporary(folder: Path) -> Path:
    """A hidden temporary folder beside `folder`, recording this process as its writer."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    record = {**this_process(), "started": time.time()}
    (tmp / WRITER).write_text(json.dumps(record, indent=2) + "\n")
    return tmp


def publish(tmp: Path, folder: Path, provenance: dict) -> None:
    """Mark the verified temporary complete and rename it to `folder` (another process that
    finished the same file first keeps its folder); the temporary is gone after."""
    try:
        (tmp / WRITER).unlink(missing_ok=True)
        record = {**provenance, "converted_at": time.time()}
        (tmp / SOURCE).write_text(json.dumps(record, indent=2) + "\n")
        (tmp / COMPLETE).write_text("")
        try:
            os.rename(tmp, folder)
        except OSError:  # the folder exists: another process finished first, or a broken one
            if not is_complete(folder):
                shutil.rmtree(folder, ignore_errors=True)
                os.rename(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def writer_state(tmp: Path, now: float | None = None) -> tuple[str, str | None]:
    """(who writes temporary `tmp`, why it is stale or None while its writer may live)."""
    try:
        record = json.loads((tmp / WRITER).read_text())
    except (OSError, ValueError):
        age = (now or time.time()) - tmp.stat().st_mtime
        who = "a writer without a record (an older mlxlab)"
        return who, (f"{who}, untouched for {age:.0f} s" if age > UNRECORDED_STALE_S else None)
    who = f"process {record.get('pid')} on {record.get('host')}"
    return who, gone_reason(str(record.get("pid", "")), record.get("host"),
                            record.get("pid_namespace"), record.get("start"))


def remove_stale_temporaries(root: Path | None = None) -> list[Path]:
    """Remove the temporaries under `root` (the conversions' by default) whose writer is dead;
    returns them."""
    removed = []
    for tmp in _temporaries(root or conversions_root()):
        try:
            _, stale = writer_state(tmp)
        except OSError:  # gone already: another process cleaned it
            continue
        if stale is not None:
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


def entries() -> list[CacheEntry]:
    """The conversions and unfinished temporaries, for `mlxlab cache list`."""
    root = conversions_root()
    found = []
    for tmp in _temporaries(root):
        try:
            who, stale = writer_state(tmp)
            found.append(CacheEntry(tmp, "unfinished GGUF conversion", disk_size(tmp),
                                    stale or f"{who}, may be running",
                                    tmp.stat().st_mtime, busy="" if stale else f"{who} may still write it"))
        except OSError:
            continue
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) \
        if root.is_dir() else []
    for folder in folders:
        try:
            record = json.loads((folder / SOURCE).read_text())
        except (OSError, ValueError):
            record = {}
        source = record.get("file") or record.get("source") or "unknown"
        if record.get("source") and record.get("source") != record.get("file"):
            source = f"{record['source']} ({source})"
        kind = "GGUF conversion" if is_complete(folder) else "GGUF conversion, incomplete"
        found.append(CacheEntry(folder, kind, disk_size(folder), source,
                                record.get("converted_at") or folder.stat().st_mtime))
    return found


def _temporaries(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("."))
