"""Command lines that each end at once (bad input: exit 2 and one line) run in turn in ONE fresh
process, as the console scripts run them: `mlxlab VERB ...` through mlxlab.cli.main's main,
`mlxlab-train ...` through mlxlab.train's main in-process (python -m mlxlab.train). A check of N
refusals pays one process start (~3-4 s of CPU: mlxlab, Hydra, MLflow imported) instead of N.

Each command's stderr is what reached file descriptor 2 while it ran (Python's sys.stderr, every
logging handler, C code), so a stray log line or warning counts as a line, as in a process of
its own; a warning Python shows once per process shows in the first command that raises it. Its
stdout (file descriptor 1) is kept the same way, for the callers that ask for it."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from conftest import PYTHON, REPO

DRIVER = r"""
import json, os, sys, tempfile, importlib
argvs, after = json.loads(sys.argv[1]), sys.argv[2]
check = None
if after:
    module, name = after.split(":")
    check = getattr(importlib.import_module(module), name)
results = []
saved, saved_out = os.dup(2), os.dup(1)
for argv in argvs:
    sys.stderr.flush()
    sys.stdout.flush()
    with tempfile.TemporaryFile() as err, tempfile.TemporaryFile() as out:
        os.dup2(err.fileno(), 2)
        os.dup2(out.fileno(), 1)
        try:
            if argv[0] == "mlxlab-train":
                from mlxlab.train import main as train
                sys.argv = list(argv)
                train(supervised=False)
                code = 0
            else:
                from mlxlab.cli.main import main
                sys.argv = list(argv)
                code = main(argv[1:])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        finally:
            sys.stderr.flush()
            sys.stdout.flush()
            os.dup2(saved, 2)
            os.dup2(saved_out, 1)
        err.seek(0)
        text = err.read().decode(errors="replace")
        out.seek(0)
        printed = out.read().decode(errors="replace")
    results.append([code, text, check() if check else None, printed])
print("\nRESULTS " + json.dumps(results))
"""


def names_here() -> list[str]:
    """An `after`: the names in the working directory (what a refused start left there)."""
    return sorted(p.name for p in Path.cwd().iterdir())


def names_and_time() -> list:
    """An `after`: names_here and the moment the command ended (time.monotonic)."""
    return [names_here(), time.monotonic()]


def each_in_one_process(argvs: list[list[str]], env: dict, cwd: Path | None = None,
                        after: str = "", timeout: float = 600,
                        stdout: bool = False) -> list[tuple]:
    """(exit status, stderr, `after`'s answer) of each command line (["mlxlab", VERB, ...] or
    ["mlxlab-train", ...]) run in turn in one process, and its stdout last where `stdout`;
    `after` ("module:function", a module of tests/) is called with no argument after each one,
    in that process (what it left)."""
    env = {**env, "PYTHONPATH": os.pathsep.join(
        [str(REPO / "tests"), *filter(None, [env.get("PYTHONPATH")])])}
    done = subprocess.run([PYTHON, "-c", DRIVER, json.dumps([[*map(str, a)] for a in argvs]),
                           after], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = [x for x in done.stdout.splitlines() if x.startswith("RESULTS ")]
    return [tuple(r) if stdout else tuple(r[:3]) for r in json.loads(line[len("RESULTS "):])]
