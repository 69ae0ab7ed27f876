"""Every benchmark script still runs and writes its record, so a refactor cannot break one unseen.

The default run loads every script under benchmarks/ the way `python benchmarks/<folder>/<x>.py`
does (its own folder on sys.path, not the repository; its main() not called), all in one child
process: a moved or renamed mlxlab name, or a script that no longer finds benchmarks.*, fails
here in seconds; it also checks that no script imports one that imports it back, and that each
writes a record (`harness.write_record`). `-m slow` runs each script's `--smoke`: the smallest
run through its whole code path (tiny model, a step or two, one round), and reads the record it
wrote: each starts MLX, PyTorch or mlxlab's CLI in a fresh process, more than the default run can
afford for 30 scripts.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess

import pytest

from conftest import PYTHON, REPO
from test_docs import load_gen_benchmarks

BENCH = REPO / "benchmarks"
FOLDERS = ("speed", "quality", "memory", "parity")
SCRIPTS = sorted(p.relative_to(BENCH).as_posix() for folder in FOLDERS
                 for p in (BENCH / folder).glob("*.py") if p.name != "__init__.py")
# The PyTorch references: processes another script starts and reads (they never import mlxlab,
# MLX or its OpenBLAS); the record is that script's.
REFERENCE_WORKERS = {"speed/bench_torch.py", "speed/torch_bert_run.py", "speed/torch_plain.py",
                     "quality/real_model_torch_peft.py"}
# A script that answers more than one question: each mode's flag, smoked beside its default.
MODES = {"quality/bench_gkd_learning.py": ("--grpo",), "speed/bench_preference.py": ("--grpo",),
         "speed/bench.py": ("--bf16",), "memory/bench_hybrid_memory.py": ("--step-time",)}
SMOKES = [(s, ()) for s in SCRIPTS] + [(s, (m,)) for s, ms in MODES.items() for m in ms]

# Loads each script as its command would, then forgets benchmarks.* and the path it added, so
# the next script finds (or fails to find) everything by itself. Heavy libraries stay imported:
# the whole pass costs about what one import of mlxlab, MLX and PyTorch costs.
LOADER = """
import json, runpy, sys, traceback
repo, scripts = sys.argv[1], sys.argv[2:]
base = [p for p in sys.path if p not in ("", repo)]
failed = {}
for script in scripts:
    path = f"{repo}/benchmarks/{script}"
    sys.path[:] = [path.rsplit("/", 1)[0], *base]
    for name in [m for m in sys.modules if m == "benchmarks" or m.startswith("benchmarks.")]:
        del sys.modules[name]
    try:
        runpy.run_path(path, run_name="benchmark_loaded")
    except BaseException:
        failed[script] = traceback.format_exc(limit=-3)
print("LOADED " + json.dumps(failed))
"""


def test_the_scripts_are_in_folders_by_question_each_with_a_smoke_mode():
    loose = sorted(p.name for p in BENCH.glob("*.py")
                   if p.name not in ("__init__.py", "harness.py", "callbacks.py"))
    assert not loose, f"a benchmark script belongs in one of {FOLDERS}: {loose}"
    assert {s.split("/")[0] for s in SCRIPTS} == set(FOLDERS)
    without = [s for s in SCRIPTS if "--smoke" not in (BENCH / s).read_text()
               and "add_smoke(" not in (BENCH / s).read_text()
               and "add_options(" not in (BENCH / s).read_text()]
    assert not without, f"no --smoke mode: {without}"


def imports_of(path) -> set[str]:
    """The benchmark scripts `path` imports (benchmarks.<folder>.<name>), at any depth."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("benchmarks."):
            parts = node.module.split(".")
            names = [f"{parts[1]}/{parts[2]}.py"] if len(parts) == 3 else [
                f"{parts[1]}/{alias.name}.py" for alias in node.names]
            found |= {n for n in names if n in SCRIPTS}
    return found


def test_no_script_imports_one_that_imports_it_back():
    graph = {s: imports_of(BENCH / s) - {s} for s in SCRIPTS}  # a script may import itself by name

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(n == goal or (n not in seen and reaches(n, goal, seen | {n}))
                   for n in graph[start])

    circles = [s for s in SCRIPTS if reaches(s, s, {s})]
    assert not circles, f"benchmark scripts in an import circle: {circles}"
    assert "speed/bench_lora.py" in graph["quality/real_model_finetune.py"]  # the walk sees imports


def test_every_script_writes_a_record():
    """Each benchmark run leaves its figures as data (benchmarks/README.md, "Records"); the
    PyTorch reference processes report to the script that starts them."""
    silent = [s for s in SCRIPTS if s not in REFERENCE_WORKERS
              and "write_record(" not in (text := (BENCH / s).read_text())
              and "write_results(" not in text]
    assert not silent, f"these scripts write no record: {silent}"


def test_every_script_is_in_the_readme_table():
    table = (BENCH / "README.md").read_text()
    missing = [s for s in SCRIPTS if f"`{s}`" not in table and f"`{s.split('/')[1]}`" not in table
               and f"{s.split('/')[1]}`" not in table]
    assert not missing, f"benchmarks/README.md's table does not list: {missing}"


def test_every_script_loads_as_its_command_would():
    done = subprocess.run([PYTHON, "-c", LOADER, str(REPO), *SCRIPTS], capture_output=True,
                          text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("LOADED "))
    failed = json.loads(line[len("LOADED "):])
    assert not failed, "\n".join(f"{k}:\n{v}" for k, v in failed.items())


def test_a_script_that_cannot_import_fails_the_loading(tmp_path):
    """The loader is not blind: a script importing a name that does not exist, or importing
    benchmarks.* without putting the repository on sys.path first, is named."""
    (tmp_path / "benchmarks" / "speed").mkdir(parents=True)
    (tmp_path / "benchmarks" / "__init__.py").write_text("")
    (tmp_path / "benchmarks" / "harness.py").write_text("SHARED = 1\n")
    scripts = {
        "speed/good.py": "import sys\nfrom pathlib import Path\n"
                         "sys.path.insert(0, str(Path(__file__).resolve().parents[2]))\n"
                         "from benchmarks.harness import SHARED\n",
        "speed/no_path.py": "from benchmarks.harness import SHARED\n",
        "speed/moved.py": "from json import moved_away\n",
    }
    for name, text in scripts.items():
        (tmp_path / "benchmarks" / name).write_text(text)
    done = subprocess.run([PYTHON, "-c", LOADER, str(tmp_path), *scripts], capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)
    failed = json.loads(done.stdout.split("LOADED ", 1)[1])
    assert sorted(failed) == ["speed/moved.py", "speed/no_path.py"], failed
    assert "moved_away" in failed["speed/moved.py"]
    assert "benchmarks" in failed["speed/no_path.py"]


def test_the_gpu_window_script_parses():
    for script in BENCH.glob("*/*.sh"):
        done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert done.returncode == 0, f"{script}: {done.stderr}"


@pytest.mark.slow
@pytest.mark.parametrize(("script", "mode"), SMOKES, ids=[" ".join((s, *m)) for s, m in SMOKES])
def test_smoke(script, mode, tmp_path):
    records = tmp_path / "records"
    env = {**os.environ, "MLXLAB_ROOT": str(tmp_path),  # its runs and stores, not the project's
           "MLXLAB_BENCH_RESULTS": str(records)}
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run([PYTHON, str(BENCH / script), *mode, "--smoke"], capture_output=True,
                          text=True, timeout=1800, cwd=tmp_path, env=env)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    if script in REFERENCE_WORKERS:
        return
    written = load_gen_benchmarks().load_records(records)  # the keys the docs page needs, checked
    assert len(written) == 1, [r["_file"] for r in written]
    record = written[0]
    assert record["smoke"] and record["figures"], record
    assert record["command"] == " ".join(("python", f"benchmarks/{script}", *mode, "--smoke"))
    assert record["machine"]["cpu"]["cores"] == os.cpu_count()
