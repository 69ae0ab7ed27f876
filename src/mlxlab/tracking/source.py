"""What started this run, as the user typed it: the MLflow run's Source and its command line.

MLflow names a run's Source (tag `mlflow.source.name`) after the creating process's argv[0]. The
MLflow tracker runs in a child process by default (tracking/background.py), whose argv[0] is
background.py, so the run page would say "Source: background.py". The training process
computes these tags from its own argv and hands them to the tracker instead.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from mlxlab.tracking import tags as T

PACKAGE = Path(__file__).resolve().parents[1]  # src/mlxlab


def entry_point(argv0: str | None = None) -> str:
    """`mlxlab-train`, `mlxlab train` (cli/train.py sets that argv[0]), or `python -m
    mlxlab.train` for a module of this package run with -m; else argv[0]'s file name."""
    argv0 = sys.argv[0] if argv0 is None else argv0
    path = Path(argv0)
    if path.suffix == ".py":
        try:
            inside = path.resolve().relative_to(PACKAGE.parent).with_suffix("")
        except ValueError:
            return path.name
        module = ".".join(inside.parts).removesuffix(".__main__")
        return f"python -m {module}"
    return path.name


def command_line(argv: list[str] | None = None) -> str:
    """The command line as typed: the entry point, then its arguments shell-quoted."""
    argv = sys.argv if argv is None else argv
    return " ".join([entry_point(argv[0]), shlex.join(argv[1:])]).strip() if argv else ""


def source_tags(argv: list[str] | None = None) -> dict[str, str]:
    """The run's Source and command line, for Tracker.start's tags."""
    argv = sys.argv if argv is None else argv
    return {T.SOURCE_NAME: entry_point(argv[0] if argv else ""), T.COMMAND: command_line(argv)}
