"""Read what a wandb offline run wrote, as `wandb sync` would upload it.

Offline, wandb writes no config.yaml or wandb-summary.json: everything is in the run's transaction
log, <dir>/wandb/offline-run-<time>-<id>/run-<id>.wandb, a LevelDB-style log of protobuf
`Record`s (wandb/proto/wandb_internal.proto): a 7-byte file header (":W&B", 0xBEE1, version 0),
then 32 KiB blocks of chunks, each with a 7-byte header (crc32, length, type: full / first /
middle / last) and zero padding where fewer than 7 bytes are left in a block.
"""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path):
    """The Record protobufs of one .wandb file, in the order they were written."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb transaction log"
    pos, parts = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # the block's tail is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        pos += HEADER
        chunk = data[pos:pos + length]
        pos += length
        if kind in (FULL, FIRST):
            parts = chunk
        elif kind in (MIDDLE, LAST):
            parts += chunk
        else:  # zeros after the last record
            break
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(parts)
            yield record


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


@dataclass
class OfflineRun:
    """One offline run folder: its id, config, history rows and final summary."""

    folder: Path
    id: str = ""
    config: dict = field(default_factory=dict)
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)
    exit_code: int | None = None
    files: list[str] = field(default_factory=list)


def read_offline_run(folder: Path) -> OfflineRun:
    (log,) = Path(folder).glob("run-*.wandb")
    run = OfflineRun(Path(folder))
    for r in records(log):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            run.id, run.tags = r.run.run_id, list(r.run.tags)
            run.config.update({_key(i): json.loads(i.value_json) for i in r.run.config.update})
        elif kind == "config":
            run.config.update({_key(i): json.loads(i.value_json) for i in r.config.update})
        elif kind == "history":
            row = {_key(i): json.loads(i.value_json) for i in r.history.item}
            for name, value in row.items():
                if not name.startswith("_"):
                    run.history.setdefault(name, []).append((r.history.step.num, value))
        elif kind == "summary":
            run.summary.update({_key(i): json.loads(i.value_json) for i in r.summary.update})
        elif kind == "files":
            run.files += [f.path for f in r.files.files]
        elif kind == "exit":
            run.exit_code = r.exit.exit_code
    return run


def _start_order(folder: Path) -> tuple[str, int]:
    """offline-run-<time>-<id>[-<n>]: by start time, then the suffix of a same-second restart."""
    parts = folder.name.split("-")  # offline, run, time, id[, n]
    return parts[2], int(parts[4]) if len(parts) > 4 else 0


def offline_runs(root: Path, run_id: str | None = None, timeout_s: float = 60) -> list[OfflineRun]:
    """Every finished offline run under root/wandb (of one id: a resumed run has a folder per
    process), oldest first. wandb's service process writes the log after run.finish() returns:
    each is read again until it holds the run's exit record (or `timeout_s` passes)."""
    # A folder is offline-run-<time>-<id>, with "-1", "-2".. added when a second process of the
    # same run starts within the same second: match on the id read from the log, not the name.
    folders = sorted(Path(root, "wandb").glob("offline-run-*"), key=_start_order)
    deadline = time.monotonic() + timeout_s
    runs = []
    for folder in folders:
        run = read_offline_run(folder)
        while run.exit_code is None and time.monotonic() < deadline:
            time.sleep(0.2)
            run = read_offline_run(folder)
        if run_id is None or run.id == run_id:
            runs.append(run)
    return runs
