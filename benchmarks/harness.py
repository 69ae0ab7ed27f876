"""The harness every benchmark script shares: the JSON record a run writes (`write_record`),
clocks, memory, saved batches, the CPU and GPU, mlxlab's commands run, tables, `--smoke`.
Standard library and numpy only: the PyTorch processes import it and must never load mlxlab,
MLX or mlxlab's OpenBLAS (with them loaded PyTorch runs 3.7x slower)."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
# Where a run's record goes: one JSON file per run, read by the docs build (scripts/gen_benchmarks.py)
RESULTS = REPO / "benchmarks" / "results"
RESULTS_ENV = "MLXLAB_BENCH_RESULTS"  # another folder for the records (the smoke tests' tmp_path)
SCHEMA = 1
LOAD_AT_START = os.getloadavg()  # the machine's load when the benchmark began

# Libraries that only mlxlab/MLX put into a process; a baseline process must map none of them.
FOREIGN_LIBRARIES = ("libopenblasp", "libscipy_openblas.so", "libmlx.so", "mlx_cpu.libs")


def clock() -> tuple[float, float]:
    """(wall, CPU) seconds now; CPU = all threads of this process, steadier on a busy machine."""
    return time.perf_counter(), time.process_time()


def _status_kb(key: str, pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return float(line.split()[1])
    return float("nan")


def rss_mb(pid: int | str = "self") -> float:
    """The resident memory of this process (or of process `pid`), in MB."""
    return _status_kb("VmRSS", pid) / 1024


def reset_peak_rss() -> None:
    with contextlib.suppress(OSError):  # 5 = reset VmHWM to the current RSS
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mb() -> float:
    return _status_kb("VmHWM") / 1024


def save_batches(path: Path, batches: list[dict]) -> None:
    arrays = {f"{i:05d}/{k}": np.array(v) for i, b in enumerate(batches) for k, v in b.items()}
    np.savez(path, **arrays)


def load_batches(path: Path) -> list[dict[str, np.ndarray]]:
    with np.load(path) as f:
        out: dict[int, dict] = {}
        for key in f.files:
            i, name = key.split("/")
            out.setdefault(int(i), {})[name] = f[key]
    return [out[i] for i in sorted(out)]


def foreign_libraries() -> list[str]:
    """Mapped files of this process that a clean baseline must not have (mlxlab's BLAS, MLX)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return []
    found = {line.split()[-1] for line in maps.splitlines() if any(n in line for n in FOREIGN_LIBRARIES)}
    return sorted(found)


def cpu_id() -> dict:
    """The CPU as lscpu names it: model name, family and model numbers, cores, widest vector ISA."""
    fields = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines():
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    flags = set(fields.get("flags", "").split())
    return {"model": fields.get("model name", platform.processor() or platform.machine()),
            "family": fields.get("cpu family"), "model_number": fields.get("model"),
            "cores": os.cpu_count(),
            "isa": "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else None}


def gpu_names() -> list[str]:
    """The GPUs nvidia-smi lists (none on a machine without it); never imports MLX or PyTorch."""
    if not shutil.which("nvidia-smi"):
        return []
    done = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                          capture_output=True, text=True)
    return [line.strip() for line in done.stdout.splitlines() if line.strip()] if done.returncode == 0 else []


def commit() -> str | None:
    """The checkout's commit, `+dirty` when its tracked files differ; None without git."""
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True).stdout
    except OSError:  # no git on the machine (a GPU image)
        return None
    return head.stdout.strip() + ("+dirty" if dirty.strip() else "") if not head.returncode else None


def jsonable(value: object) -> object:
    """`value` as JSON can hold it: a tuple key becomes "a/b", anything else unknown its str()."""
    if isinstance(value, dict):
        return {("/".join(map(str, k)) if isinstance(k, tuple) else k
                 if isinstance(k, (str, int, float, bool)) or k is None else str(k)): jsonable(v)
                for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [jsonable(v) for v in value]
    return value


def write_record(name: str, figures: dict, *, question: str, reference: str | None = None,
                 ratio: float | None = None, summary: str | None = None,
                 smoke: bool = False, raw: str | None = None) -> Path:
    """Write this run's record (benchmarks/README.md, "Records"): `figures`, the command, commit,
    machine, load and date; `question` is its section of docs/benchmarks.md, and a `ratio` (with
    `reference` and `summary`) a row of its summary table. A smoke run's record, and any run
    under pytest, goes to a temporary folder unless MLXLAB_BENCH_RESULTS names one."""
    now = datetime.datetime.now(datetime.timezone.utc)
    script = Path(sys.argv[0]).resolve()
    with contextlib.suppress(ValueError):
        script = script.relative_to(REPO)
    record = {
        "schema": SCHEMA, "name": name, "question": question,
        "date": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": shlex.join(["python", str(script), *sys.argv[1:]]),
        "commit": commit(),
        "machine": {"cpu": cpu_id(), "gpu": gpu_names(), "python": platform.python_version(),
                    "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS")},
        "load": {"start": list(LOAD_AT_START), "end": list(os.getloadavg())},
        "reference": reference, "ratio": ratio, "summary": summary, "smoke": smoke, "raw": raw,
        "figures": jsonable(figures),
    }
    scratch = smoke or "PYTEST_CURRENT_TEST" in os.environ
    folder = Path(os.environ.get(RESULTS_ENV) or (smoke_dir("records") if scratch else RESULTS))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{now:%Y-%m-%d-%H%M%S}-{name}.json"
    for n in range(2, 100):  # two runs of one name in one second: both kept
        if not path.exists():
            break
        path = folder / f"{now:%Y-%m-%d-%H%M%S}-{name}-{n}.json"
    path.write_text(json.dumps(record, indent=1, default=str) + "\n")
    print(f"record: {path}")
    return path


def run_with_peak_rss(cmd: list[str], *, what: str | None = None, log: Path | None = None,
                      **kwargs) -> tuple[subprocess.CompletedProcess, float]:
    """subprocess.run(cmd, capture_output=True, text=True, **kwargs) and the child's peak
    resident memory in MB (its ru_maxrss from wait4: the child's own, not this process's); the
    result also holds `wall_s` and `cpu_s` (user + system: its own work, which waiting for a core
    on a busy machine does not inflate as it does the wall time). `log`: its output kept there;
    `what`: a failure raises a RuntimeError naming it, with the output's end."""
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, **kwargs)
        _, status, usage = os.wait4(proc.pid, 0)
        out.seek(0)
        err.seek(0)
        done = subprocess.CompletedProcess(cmd, os.waitstatus_to_exitcode(status), out.read(),
                                           err.read())
    done.wall_s, done.cpu_s = time.perf_counter() - started, usage.ru_utime + usage.ru_stime
    if log is not None:
        log.write_text(done.stdout + done.stderr)
    if what and done.returncode:
        raise RuntimeError(f"{what} failed ({done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")
    return done, usage.ru_maxrss / 1024


def cli_root(out: Path) -> tuple[dict, str]:
    """`out` as the MLXLAB_ROOT of mlxlab's commands, its own MLflow store: (their environment,
    the store's URI)."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MLXLAB_ROOT": str(out), "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env, f"sqlite:///{out}/mlruns/mlflow.db"


def run_logged(args: list[str], env: dict, log: Path) -> tuple[str, float]:
    """Run a command in env["MLXLAB_ROOT"], its output kept in `log`: (the output, wall
    seconds); a failure exits the benchmark naming the log."""
    started = time.perf_counter()
    proc = subprocess.run(args, env=env, cwd=env["MLXLAB_ROOT"], capture_output=True, text=True)
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        sys.exit(f"{' '.join(args[:4])} ... failed ({proc.returncode}); see {log}")
    return proc.stdout + proc.stderr, time.perf_counter() - started


def tiny_hf_model():
    """scripts/tiny_hf_model.py as a module (it loads mlxlab and tokenizers)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tiny_hf_model", REPO / "scripts" / "tiny_hf_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_llama(folder: Path, **sizes) -> Path:
    """A random Llama in `folder` (tiny_hf_model.py's save_tiny_llama_without_torch: MLX and
    tokenizers, no PyTorch), written once."""
    if not (folder / "config.json").is_file():
        tiny_hf_model().save_tiny_llama_without_torch(folder, **sizes)
    return folder


def mlxlab_cli(*args: str) -> list[str]:
    """`mlxlab ARGS` in this interpreter."""
    return [sys.executable, "-m", "mlxlab.cli.main", *args]


def train_cli(*args: str) -> list[str]:
    """`mlxlab-train ARGS` in this interpreter."""
    return [sys.executable, "-m", "mlxlab.train", *args]


def line_value(out: str, prefix: str) -> str:
    """The rest of the first line of `out` that starts with `prefix`."""
    return next(line for line in out.splitlines() if line.startswith(prefix))[len(prefix):].strip()


def write_results(out: Path, results: dict, compare: str, shown: str,
                  times: dict[str, float], *, record: str, smoke: bool) -> None:
    """results.json under `out` (with `compare`'s JSON) and the run's record (`record`: its
    name, question `quality`), then the results, `shown` (a table's tail) and each stage's wall
    time printed."""
    results = {**results, "wall_s": times,
               "compare": compare[compare.index("{"):] if "{" in compare else compare}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    write_record(record, results, question="quality", smoke=smoke, raw=str(out / "results.json"))
    print(json.dumps({k: v for k, v in results.items() if k != "compare"}, indent=2))
    print(shown[-4000:])
    print("wall time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))


def load() -> float:
    """The 1-minute load average now (logged beside each timed part: the machine is shared)."""
    return round(os.getloadavg()[0], 2)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """`rows` as JSON lines in `path`, left alone if it holds them (another process may read it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)
    return path


def metric_history(client, run: str, key: str) -> list[float]:
    """An MLflow run's values of `key`, by step."""
    return [m.value for m in sorted(client.get_metric_history(run, key), key=lambda m: m.step)]


def float_smollm2(folder: Path) -> Path:
    """SmolLM2-135M-Instruct as a float32 Hugging Face folder, written once: transformers' reading
    of the packaged GGUF (tests/real_models.py), its config's `quantization_config` dropped (the
    weights are float32; transformers asks for the GGUF file again when the config names it)."""
    if not (folder / "config.json").is_file():
        sys.path.insert(0, str(REPO / "tests"))
        from real_models import packaged_model, transformers_reference

        shutil.copytree(transformers_reference(packaged_model()), folder, dirs_exist_ok=True)
        config = json.loads((folder / "config.json").read_text())
        config.pop("quantization_config", None)
        (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def refuse_foreign(who: str) -> None:
    """Exit when this PyTorch process has loaded mlxlab, MLX or mlxlab's BLAS (3.7x slower)."""
    if leaked := foreign_libraries() + [m for m in ("mlxlab", "mlx.core") if m in sys.modules]:
        raise SystemExit(f"{who}: the PyTorch process loaded {leaked}; it must not")


def print_table(table: dict) -> None:
    """A record's `table` ({"head", "rows"}) printed as markdown."""
    for row in [table["head"], ["---"] * len(table["head"]), *table["rows"]]:
        print("| " + " | ".join(map(str, row)) + " |")


def in_round(names: list[str], rnd: int) -> list[str]:
    """The order the rows of round `rnd` run in: `names`, reversed every other round (ABBA), so
    a slow spell of a shared machine hits every row alike and a ratio compares one round's rows."""
    return list(names) if rnd % 2 == 0 else list(names)[::-1]


def add_smoke(parser: argparse.ArgumentParser) -> None:
    """`--smoke`: the smallest run through the script's code path, its figures meaningless
    (tests/test_benchmarks_smoke.py runs every script's, so none can rot unseen)."""
    parser.add_argument("--smoke", action="store_true",
                        help="the smallest run through this script's code path; figures mean nothing")


def add_options(parser: argparse.ArgumentParser, **options: object) -> None:
    """`--smoke` (add_smoke) and `--name` (underscores as dashes) for each keyword, in order: its
    default, or a (default, help) or (default, help, type) tuple; the type is the default's
    (False: a flag, None: a string)."""
    for name, spec in options.items():
        default, text, kind = (*spec, None)[:3] if isinstance(spec, tuple) else (spec, None, None)
        flag = "--" + name.replace("_", "-")
        if default is False:
            parser.add_argument(flag, action="store_true", help=text)
        else:
            parser.add_argument(flag, default=default, help=text,
                                type=kind or (str if default is None else type(default)))
    add_smoke(parser)


def smoke_dir(name: str) -> Path:
    """A fresh temporary folder for a smoke run's files (never the docs or a shared /tmp path)."""
    return Path(tempfile.mkdtemp(prefix=f"{name}_smoke_"))

# Hydra overrides that cut a training run to a smoke's size: 4 steps, evaluated twice.
SMOKE_RUN = ("trainer.max_steps=4", "trainer.eval_every_steps=2", "callbacks.progress.enabled=false")
