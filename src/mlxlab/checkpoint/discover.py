"""Which checkpoint directories exist, which are complete, and which to try for a resume."""

from __future__ import annotations

import json
from pathlib import Path

from mlxlab.checkpoint.layout import (
    BEST,
    CHECKPOINTS_DIR,
    CHECKSUMS_FILE,
    MARKER,
    MODEL_FILE,
    STATE_FILE,
    STEP_PREFIX,
    step_of,
)
from mlxlab.runtime.files.checksum import file_sha256


def check_committed(path: Path, full: bool = True) -> str | None:
    """None when `path` is a complete checkpoint, else the reason it is not.

    `full=False` checks the marker, checksums.json and file sizes only (cheap, for listing);
    `full=True` also re-hashes every file.
    """
    path = Path(path)
    if not path.is_dir():
        return "not a directory"
    if not (path / MARKER).exists():
        return f"no {MARKER} marker (the save never finished)"
    try:
        sums = json.loads((path / CHECKSUMS_FILE).read_text())
    except (OSError, ValueError) as e:
        return f"{CHECKSUMS_FILE} unreadable ({e})"
    if not isinstance(sums, dict) or not all(
        isinstance(v, dict) and {"sha256", "bytes"} <= v.keys() for v in sums.values()
    ):
        return f"{CHECKSUMS_FILE} malformed"
    for name in (MODEL_FILE, STATE_FILE):
        if name not in sums:
            return f"{name} missing from {CHECKSUMS_FILE}"
    for name, expect in sums.items():
        file = path / name
        if not file.exists():
            return f"{name} is missing"
        size = file.stat().st_size
        if size != expect["bytes"]:
            return f"{name} is {size} bytes, expected {expect['bytes']} (truncated?)"
        if full and file_sha256(file) != expect["sha256"]:
            return f"{name} checksum mismatch (file modified or corrupted)"
    return None


def step_dirs(directory: Path) -> list[Path]:
    """step_* directories, newest first, committed or not."""
    if not directory.is_dir():
        return []
    dirs = [p for p in directory.iterdir() if p.name.startswith(STEP_PREFIX) and step_of(p) >= 0]
    return sorted(dirs, key=step_of, reverse=True)


def committed_step_dirs(directory: Path) -> list[Path]:
    """Committed step checkpoints, newest first (marker and sizes; hashes checked at load)."""
    return [p for p in step_dirs(directory) if check_committed(p, full=False) is None]


def is_checkpoint_dir(path: Path) -> bool:
    """`path` is one checkpoint (committed or not), not a directory of them."""
    return any((path / name).exists() for name in (MODEL_FILE, MARKER, STATE_FILE))


def resume_candidates(directory: Path) -> list[Path]:
    """What resume tries in `directory` (a checkpoints/ folder): step_* newest first, then best/.
    Uncommitted ones are included so loading can say why it skipped them."""
    found = step_dirs(directory)
    if (directory / BEST).is_dir():
        found.append(directory / BEST)
    return found


def run_checkpoint_dirs(path: Path) -> list[Path]:
    """`resume_candidates` for a run directory, its checkpoints/ directory, or one checkpoint."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"resume path {path} does not exist: pass a run directory, its "
            "checkpoints/ directory, or one step_XXXXXXXX directory"
        )
    if is_checkpoint_dir(path):
        return [path]
    directory = path / CHECKPOINTS_DIR if (path / CHECKPOINTS_DIR).is_dir() else path
    found = resume_candidates(directory)
    if not found:
        raise FileNotFoundError(
            f"no checkpoints under {path}: pass a run directory, its "
            "checkpoints/ directory, or one step_XXXXXXXX directory"
        )
    return found
