"""Runs under a memory limit set on the process: trainer.micro_batch=auto budgets the
limit (RLIMIT_AS, a cgroup's), not the machine's RAM; MLX's kept file-reading pool starts before
memory is tight and mlxlab's loads start no thread under the limit, so a load after training
neither hangs nor fails; the supervising parent ends
a child that stopped making progress.

The limits are real: RLIMIT_AS (what `ulimit -v` sets) put on a child process by preexec_fn. A
cgroup cannot be made by a test without privileges; its files are read from a folder laid out as
/sys/fs/cgroup is, beside the real /proc/self/cgroup format.
"""

from __future__ import annotations

import json
import re
import resource
import subprocess
from pathlib import Path

import pytest

from conftest import FAST, PYTHON
from mlxlab.runtime.memory import memory_limits

linux_only = pytest.mark.skipif(not Path("/proc/self/status").exists(),
                                reason="VmSize and RLIMIT_AS are read from /proc (Linux)")
GB = 1e9


def limited(limit_bytes: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))
    return apply


# --- the budget ---------------------------------------------------------------------------------

BUDGET = """
import json
from mlxlab.training.micro_batch import memory_budget
from mlxlab.training.settings import TrainerSettings
import sys
limit = sys.argv[1]
settings = TrainerSettings() if limit == "none" else TrainerSettings(memory_limit=limit)
print(json.dumps(memory_budget(settings)))
"""


@linux_only
def test_auto_budgets_the_address_space_limit_not_the_machines_ram():
    """Under RLIMIT_AS = 4 GB the budget is that limit less what the process maps beside MLX
    and headroom, and says so; without a limit it is MLX's own (a share of RAM); a
    trainer.memory_limit above the real limit does not raise it, one below it wins."""
    limit = 4 * 2**30

    def budget(setting: str = "none", rlimit: int | None = limit) -> tuple[float, str]:
        done = subprocess.run([PYTHON, "-c", BUDGET, setting], capture_output=True, text=True,
                              timeout=120, preexec_fn=limited(rlimit) if rlimit else None)
        assert done.returncode == 0, done.stderr[-2000:]
        return tuple(json.loads(done.stdout.strip().splitlines()[-1]))

    size, what = budget()
    assert what.startswith("RLIMIT_AS 4.295 GB less ") and "headroom" in what, what
    assert 0 < size < limit - memory_limits.ADDRESS_HEADROOM
    unlimited, what = budget(rlimit=None)
    assert what.startswith("MLX's limit") and unlimited > size
    capped, what = budget("100GB")  # the real limit wins
    assert what.startswith("RLIMIT_AS ") and abs(capped - size) < 64 * 2**20
    assert budget("0.1GB") == (0.1 * GB, "trainer.memory_limit=0.1GB")


def test_a_cgroups_limit_is_read_from_v2_and_v1_and_the_tightest_ancestor_wins(tmp_path):
    """v2: the group's memory.max and its ancestors' ("max": none), usage less inactive file
    cache; v1: memory.limit_in_bytes (its "no limit" is a huge number); none set: None."""
    v2 = tmp_path / "v2"
    group = v2 / "user.slice" / "job"
    group.mkdir(parents=True)
    (v2 / "user.slice" / "memory.max").write_text("3000000000\n")
    (group / "memory.max").write_text("max\n")
    (group / "memory.current").write_text("900\n")
    (group / "memory.stat").write_text("anon 500\ninactive_file 400\n")
    (v2 / "user.slice" / "memory.current").write_text("1000000000\n")
    (v2 / "user.slice" / "memory.stat").write_text("inactive_file 200000000\n")
    proc = tmp_path / "cgroup"
    proc.write_text("0::/user.slice/job\n")
    assert memory_limits.cgroup_limit(proc, v2) == (3_000_000_000, 800_000_000,
                                                     str(v2 / "user.slice"))
    (group / "memory.max").write_text("2000000000\n")
    assert memory_limits.cgroup_limit(proc, v2) == (2_000_000_000, 500, str(group))

    v1 = tmp_path / "v1" / "memory" / "docker" / "abc"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text("1073741824\n")
    (v1 / "memory.usage_in_bytes").write_text("600000000\n")
    (v1 / "memory.stat").write_text("total_inactive_file 100000000\n")
    (tmp_path / "v1" / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    proc.write_text("12:pids:/docker/abc\n4:memory:/docker/abc\n0::/\n")
    assert memory_limits.cgroup_limit(proc, tmp_path / "v1") == (1073741824, 500000000, str(v1))
    (v1 / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert memory_limits.cgroup_limit(proc, tmp_path / "v1") is None


@linux_only
def test_a_run_under_an_address_space_limit_logs_the_limit_it_budgeted(tmp_path, cli_env):
    """trainer.micro_batch=auto in a run held to 6 GB of address space: its log line names
    RLIMIT_AS and a budget below it (before: the machine's RAM, "fit 20.221 GB"), and the run
    finishes."""
    run_dir = tmp_path / "run"
    limit = 6 * 2**30
    done = subprocess.run([PYTHON, "-m", "mlxlab.train", *FAST, "tracking=none",
                           "trainer.batch_size=16", "trainer.micro_batch=auto",
                           f"hydra.run.dir={run_dir}"], env=cli_env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300,
                          preexec_fn=limited(limit))
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(text for text in (done.stdout + done.stderr).splitlines()
                if "trainer.micro_batch=auto:" in text)
    assert "(RLIMIT_AS 6.442 GB less " in line, line
    budget = float(line.split(" fit ")[1].split(" GB")[0])
    assert 0 < budget < 6.442 - memory_limits.ADDRESS_HEADROOM / GB


# --- MLX's file-reading threads -----------------------------------------------------------------

# A 64 MB tensor loaded with only ~24 MB of address space to spare beyond it. MLX alone makes its
# kept pool on that load and starts 4 more threads for the read (a tensor of 32 MiB or more): under
# the limit they cannot all start, and it hangs or aborts (margin 24 hangs with MLX 0.32.4:
# the `mlx` case below reproduces it). mlxlab starts the kept pool first and reads through
# load_arrays, which starts no thread under the limit.
LOAD = """
import resource, sys
import mlx.core as mx
from mlxlab.runtime.memory.io_threads import load_arrays, start_io_threads
path = sys.argv[1]
mx.save_safetensors(path, {"w": mx.zeros((1 << 24,))})
if sys.argv[2] == "mlxlab":
    assert start_io_threads()
size = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1])
limit = (size + (70 + 24) * 1024) * 1024
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
arrays = load_arrays(path) if sys.argv[2] == "mlxlab" else mx.load(path)
print("loaded", arrays["w"].sum().item(), flush=True)
"""


def load_under_limit(tmp_path: Path, how: str, timeout: float = 30) -> str:
    try:
        done = subprocess.run([PYTHON, "-c", LOAD, str(tmp_path / "w.safetensors"), how],
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "hang"
    return done.stdout.strip() if done.returncode == 0 else f"exit {done.returncode}"


@linux_only
def test_mlxlabs_loads_start_no_thread_under_a_tight_limit(tmp_path):
    """Three loads in a row, as a busy machine orders the threads differently each time."""
    assert [load_under_limit(tmp_path, "mlxlab") for _ in range(3)] == ["loaded 0.0"] * 3
    # MLX's own load, its threads made under the limit: the hang (or abort) this prevents; a
    # load that has not finished in 10 s (mlxlab's take ~2) is that hang
    assert load_under_limit(tmp_path, "mlx", timeout=10) != "loaded 0.0"


SAME = """
import resource, sys
import mlx.core as mx
from mlxlab.runtime.memory.io_threads import load_arrays
path = sys.argv[1]
saved = {"w": mx.random.normal((1 << 23,)), "h": mx.random.normal((3, 5)).astype(mx.bfloat16),
         "q": mx.arange(7, dtype=mx.uint32), "e": mx.zeros((0, 4))}
mx.save_safetensors(path, saved)
free = mx.load(path)
resource.setrlimit(resource.RLIMIT_AS, (40 << 30, 40 << 30))
limited = load_arrays(path)
assert sorted(limited) == sorted(saved), sorted(limited)
for name, array in saved.items():
    assert limited[name].dtype == array.dtype and limited[name].shape == array.shape, name
    assert mx.array_equal(limited[name], array).item() and mx.array_equal(free[name], array).item()
try:
    open(path, "r+b").truncate(100)
    load_arrays(path)
except Exception as e:
    print("corrupt:", type(e).__name__)
"""


@linux_only
def test_load_arrays_under_a_limit_reads_what_mx_load_reads(tmp_path):
    """Every dtype and shape as saved, a 32 MiB tensor among them; a cut file raises, as
    mx.load does (checkpoint/restore.py turns that into its one line)."""
    done = subprocess.run([PYTHON, "-c", SAME, str(tmp_path / "a.safetensors")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().startswith("corrupt: "), done.stdout


# --- the parent ends a child that stopped ---------------------------------------------------------


def stall_run(tmp_path: Path, cli_env: dict, callback: str, timeout_s: float,
              *more: str) -> tuple[subprocess.CompletedProcess, str, Path]:
    from conftest import MLXLAB

    tests = Path(__file__).resolve().parent
    env = {**cli_env, "PYTHONPATH": f"{tests}:{cli_env.get('PYTHONPATH', '')}"}
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_dir = tmp_path / "run"
    done = subprocess.run(
        [str(Path(MLXLAB).parent / "mlxlab-train"), *FAST, "trainer.max_steps=6",
         "trainer.eval_every_steps=null", "trainer.batch_size=16", f"tracking.uri={uri}",
         "checkpoint.save_every_steps=2", "checkpoint.save_every_minutes=null",
         "checkpoint.async_write=false", f"trainer.stall_timeout_s={timeout_s}",
         f"hydra.run.dir={run_dir}", f"+callbacks.stall={callback}", *more],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    return done, uri, run_dir


@pytest.mark.slow  # the default run's 10-minute budget; run with -m slow
def test_the_parent_ends_a_run_that_stopped_after_its_checkpoint(tmp_path, cli_env):
    """The training thread stops for good at step 3 (as in MLX's thread pool, 0 % CPU; only the
    tracker's heartbeat thread still writes): after
    trainer.stall_timeout_s the parent ends it with one line naming the last step and checkpoint,
    exit 124; the checkpoint of step 2 is intact and the MLflow run is KILLED, not RUNNING."""
    from mlflow import MlflowClient

    # MLflow in this process, beating its heartbeat into the store twice a second: writes that
    # are no progress
    done, uri, run_dir = stall_run(tmp_path, cli_env,
                                   "{_target_: failure_helpers.StallAt, step: 3}", 4,
                                   "tracking.background=false",
                                   "tracking.heartbeat_every_seconds=0.5")
    assert done.returncode == 124, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("mlxlab: error: the run made no progress for "), last
    # the step the parent saw done: 2, or 3 when the step mark came before the stall
    assert re.search(r"after step [23] ", last) and "trainer.stall_timeout_s=4" in last, last
    assert f"last: step 2 in {run_dir}" in last and "is marked KILLED" in last, last
    assert (run_dir / "checkpoints" / "step_00000002" / "COMMITTED").is_file()
    client = MlflowClient(tracking_uri=uri)
    run = client.search_runs([client.get_experiment_by_name("train").experiment_id])[0]
    assert run.info.status == "KILLED"
    assert "no progress for" in run.data.tags["mlxlab.killed_reason"]


@pytest.mark.slow
def test_a_long_busy_stretch_without_a_step_is_not_a_stall(tmp_path, cli_env):
    """12 CPU seconds of computing without a step (a long evaluation) under
    trainer.stall_timeout_s=5: CPU time is progress, the run finishes."""
    done, _, _ = stall_run(tmp_path, cli_env,
                           "{_target_: failure_helpers.StallAt, step: 3, busy_s: 12}", 5)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "no progress" not in done.stderr


# --- the nano preset under a limit near its peak (slow) -----------------------------------------

# The process's address space at its peak, printed at exit (a run in this process, unsupervised)
VMPEAK = ("import sys\ntry:\n    sys.argv = ['mlxlab.train', *sys.argv[1:]]\n"
          "    from mlxlab.train import main\n    main(supervised=False)\nfinally:\n"
          "    print([l for l in open('/proc/self/status') if l.startswith('VmPeak')][0],"
          " file=sys.stderr)\n")


@pytest.mark.slow
@linux_only
def test_the_nano_preset_under_ulimit_v_near_its_micro_batch_8_peak_finishes(tmp_path, cli_env):
    """The run that hung: tinystories_nano at batch 32, trainer.micro_batch=auto, under an address
    space limit 100 MB above the peak of the same run at micro-batch 8 (measured under a loose
    limit, as the run itself then keeps few malloc arenas). Before: it budgeted the machine's
    RAM, trained, and then hung in MLX's io thread pool for good (or failed writing its last
    checkpoint). Now: it budgets the limit, picks a micro-batch that fits, finishes, exit 0."""
    common = ["experiment=tinystories_nano", "trainer.batch_size=32", "trainer.max_steps=3",
              "callbacks.progress.enabled=false", f"tracking.uri=sqlite:///{tmp_path}/m.db"]
    loose = limited(16 * 2**30)
    done = subprocess.run([PYTHON, "-c", VMPEAK, *common, "trainer.micro_batch=8",
                           f"hydra.run.dir={tmp_path / 'calibration'}"], env=cli_env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=900,
                          preexec_fn=loose)
    assert done.returncode == 0, done.stderr[-3000:]
    peak_kb = int(done.stderr.strip().splitlines()[-1].split()[1])
    from conftest import MLXLAB

    run_dir = tmp_path / "run"
    done = subprocess.run([str(Path(MLXLAB).parent / "mlxlab-train"), *common,
                           "trainer.micro_batch=auto", f"hydra.run.dir={run_dir}"],
                          env=cli_env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=900, preexec_fn=limited((peak_kb + 100 * 1024) * 1024))
    assert done.returncode == 0, done.stderr[-3000:]
    log = "".join(f.read_text() for f in run_dir.glob("*.log"))
    assert "trainer.micro_batch=auto:" in log and "(RLIMIT_AS " in log, log[-3000:]
    assert "Traceback" not in done.stderr
