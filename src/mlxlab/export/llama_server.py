"""The shell script beside a GGUF export that starts llama.cpp's server on it (`ft.gguf` ->
`ft.llama-server.sh`): run from the folder it lies in, so files named relative to it move with
the folder; its own arguments go on to llama-server (--port 8080, -ngl 99 for a GPU)."""

from __future__ import annotations

import shlex
import stat
from pathlib import Path


def command_path(gguf_file: Path) -> Path:
    """The script that starts llama.cpp's server on the export: `ft.llama-server.sh`."""
    return gguf_file.with_name(f"{gguf_file.stem}.llama-server.sh")


def llama_server_script(comment: str, args: list[str]) -> str:
    """`#!/bin/sh`, `comment` as comment lines, then `exec llama-server ARGS "$@"` from the
    script's folder."""
    notes = "\n".join(f"# {line}".rstrip() for line in comment.strip().splitlines())
    return f"""#!/bin/sh
{notes}
cd "$(dirname "$0")" || exit 1
exec llama-server {shlex.join(args)} "$@"
"""


def write_script(path: Path, text: str) -> None:
    """The script at `path`, executable."""
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
