"""Out of memory is survived: trainer.micro_batch=auto picks the largest power of two that fits
before step 1, a run that runs out restarts from its last checkpoint at half the micro-batch (the
same effective batch, the same MLflow run), and memory is in MLflow under system/.

The limits are real: MLX's CPU backend counts its memory but enforces no limit (measured with MLX
0.32.4: mx.set_memory_limit(100 MB) then 256 MB allocated without a word), and a failed
allocation there is a segmentation fault, so the out-of-memory runs here live under an address
space limit (RLIMIT_AS, what `ulimit -v` sets) put on `mlxlab-train` by preexec_fn, calibrated
from the same run's VmPeak at the smaller micro-batch; trainer.micro_batch=auto is checked against
trainer.memory_limit with the peaks MLX reports for real runs at fixed micro-batches.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from conftest import FAST, PYTHON, compose_cfg
from mlxlab.errors import ConfigError
from mlxlab.runtime.supervision import supervise
from mlxlab.training.checkpointing import rescaled_position
from mlxlab.training.micro_batch import candidates
from mlxlab.training.settings import TrainerSettings, memory_limit

MLXLAB_TRAIN = str(Path(PYTHON).parent / "mlxlab-train")
ROWS, BATCH, LONG_STEP = 160, 32, 4  # 5 steps an epoch; the 4th step's rows are long
STORY = " ".join(["The little dog ran to the park and played with a red ball all day long."] * 20)
# The process's address space at its peak, printed at exit (a run in this process, unsupervised)
VMPEAK = ("import sys\ntry:\n    sys.argv = ['mlxlab.train', *sys.argv[1:]]\n"
          "    from mlxlab.train import main\n    main(supervised=False)\nfinally:\n"
          "    print([l for l in open('/proc/self/status') if l.startswith('VmPeak')][0],"
          " file=sys.stderr)\n")
linux_only = pytest.mark.skipif(not Path("/proc/self/status").exists(),
                                reason="VmPeak and RLIMIT_AS calibration read /proc (Linux)")


# --- fast: the settings, the plan's arithmetic, the parent's decisions --------------------------


def test_micro_batch_settings_are_checked_in_one_line():
    with pytest.raises(ConfigError, match="does not divide the effective batch"):
        TrainerSettings(batch_size=32, grad_accum=1, micro_batch=12)
    with pytest.raises(ConfigError, match="needs fixed batches"):
        TrainerSettings(batch_size=32, micro_batch="auto", batching={"dynamic": True})
    with pytest.raises(ConfigError, match="memory_limit=0: give GB"):
        TrainerSettings(memory_limit=0)
    with pytest.raises(ConfigError, match="give GB"):
        TrainerSettings(memory_limit="lots")
    assert memory_limit(12) == ("bytes", 12e9) and memory_limit(0.8) == ("fraction", 0.8)
    assert memory_limit("512MB") == ("bytes", 512e6) and memory_limit("80%") == ("fraction", 0.8)
    with pytest.raises(ConfigError, match="micro_batch must be an integer"):
        TrainerSettings(micro_batch="big")
    assert TrainerSettings(batch_size=16, grad_accum=3, micro_batch=8).micro_batch == 8


def test_auto_tries_the_powers_of_two_that_keep_the_effective_batch():
    assert candidates(32) == [1, 2, 4, 8, 16, 32]
    assert candidates(48) == [1, 2, 4, 8, 16]  # 32 rows would leave 1.5 micro-batches
    assert candidates(3) == [1]


def test_a_checkpoints_data_position_is_counted_again_in_the_new_micro_batch():
    config = {"trainer": {"batch_size": 32}}
    assert rescaled_position({"epoch": 0, "batches_done": 2}, config, 16)["batches_done"] == 4
    planned = {"batch_plan": {"micro_batch": 8}, "trainer": {"batch_size": 32}}
    assert rescaled_position({"epoch": 1, "batches_done": 8}, planned, 16)["batches_done"] == 4
    stream = {"epoch": 0, "batches_done": 3, "examples_consumed": 40}  # documents: unchanged
    assert rescaled_position(stream, config, 16) == stream


def test_the_parent_halves_until_its_bound_then_ends_with_one_line(tmp_path):
    run = {"run_dir": str(tmp_path), "micro_batch": 8, "grad_accum": 4, "oom_restarts": 1,
           "restartable": True, "sweep": False}
    (tmp_path / "checkpoints" / "step_00000006").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_00000006" / "COMMITTED").write_text("{}")
    note, line = supervise.restart_note(run, "SIGSEGV", 9, "now")
    assert line is None and (note["micro_batch"], note["grad_accum"]) == (4, 8)
    assert note["restarts"][0]["steps_lost"] == 2  # steps 7 and 8 trained again
    supervise.write_note(tmp_path, note)
    note, line = supervise.restart_note({**run, "micro_batch": 4, "grad_accum": 8}, "SIGSEGV",
                                        7, "later")
    assert "oom_restarts=1 restarts were made" in line and "resume=" in line
    assert "exhausted" not in note and len(note["restarts"]) == 1  # the parent says it
    note, line = supervise.restart_note({**run, "micro_batch": 4, "grad_accum": 8,
                                         "sweep": True}, "SIGSEGV", 7, "later")
    assert note["exhausted"] == line  # a sweep's job: its next start fails, the sweep goes on


def test_a_crash_is_an_out_of_memory_only_once_the_fit_planned(tmp_path):
    assert supervise.out_of_memory(-11, tmp_path, signalled=False) is None  # before the plan
    (tmp_path / "run.json").write_text("{}")
    assert supervise.out_of_memory(-11, tmp_path, signalled=False) == "SIGSEGV"
    assert supervise.out_of_memory(-9, tmp_path, signalled=True) is None  # the user's stop
    assert supervise.out_of_memory(1, tmp_path, signalled=False) is None  # a bug's traceback
    assert supervise.out_of_memory(supervise.OOM_EXIT, tmp_path, False) is None  # no oom.json
    (tmp_path / "oom.json").write_text("{}")
    assert supervise.out_of_memory(supervise.OOM_EXIT, tmp_path, False) == "out of memory"


# --- system/ memory metrics ---------------------------------------------------------------------


def test_system_memory_metrics_are_in_mlflow_with_mlxs_peak(tmp_path, make_cfg):
    from mlflow import MlflowClient

    from mlxlab.train import train

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = make_cfg(*FAST, f"tracking.uri={uri}", "tracking.background=false")
    mx.reset_peak_memory()
    train(cfg)
    mlx_peak_mb = mx.get_peak_memory() / 2**20
    client = MlflowClient(tracking_uri=uri)
    run = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment_name)
                              .experiment_id])[0]
    for key in ("system/mlx_active_mb", "system/mlx_peak_mb", "system/mlx_cache_mb",
                "system/rss_mb"):
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == [1, 2, 3, 4], key  # every logged step
        assert all(m.value > 0 for m in history) or key == "system/mlx_cache_mb", key
    assert run.data.metrics["system/peak_mb"] == pytest.approx(mlx_peak_mb, rel=0.10)
    assert run.data.metrics["system/peak_rss_mb"] >= run.data.metrics["system/rss_mb"]


# --- the real thing: limits, restarts, a sweep (slow) --------------------------------------------


def long_rows_data(root: Path, seed: int, long_step: int | None = LONG_STEP) -> dict[str, Path]:
    """Prompt/completion rows, short but for the rows of `long_step` (micro-batches of BATCH,
    in the order seed `seed` shuffles them; None: every row long), and a short validation file."""
    from hf_helpers import save_tiny_model
    from mlxlab.data.batching import Batching
    from mlxlab.data.completions import PromptCompletion

    base = root / "tiny-llama"
    if not base.exists():
        save_tiny_model("llama", base)
    short = {"prompt": "Once upon a time", "completion": " a cat sat."}
    val = root / "val.jsonl"
    val.write_text("\n".join(json.dumps(short) for _ in range(8)) + "\n")
    train = root / "train.jsonl"
    train.write_text("\n".join(json.dumps(short) for _ in range(ROWS)) + "\n")
    if long_step is None:
        long = set(range(ROWS))
    else:  # the order depends on the row count and the seed only
        data = PromptCompletion(str(train), val_file=str(val), max_length=255, seed=seed,
                                tokenizer={"path": str(base / "tokenizer.json")})
        data.setup()
        batches = list(data.train_batches(Batching(batch_size=BATCH), 0))
        long = set(np.array(batches[long_step - 1]["index"]).tolist())
    rows = [{**short, "completion": STORY} if i in long else short for i in range(ROWS)]
    train.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return {"base": base, "train": train, "val": val}


def finetune_args(files: dict[str, Path], root: Path, uri: str, *more: str) -> list[str]:
    return ["experiment=finetune_completions", f"model.pretrained={files['base']}",
            f"data.train_file={files['train']}", f"data.val_file={files['val']}",
            "data.max_length=255", f"tracking.uri={uri}", "tracking.background=false",
            "callbacks.progress.enabled=false", f"trainer.batch_size={BATCH}",
            "trainer.log_every_steps=1", "checkpoint.save_every_steps=2",
            "checkpoint.save_every_minutes=null", "checkpoint.async_write=false",
            "checkpoint.keep_last_n=10", f"paths.root_dir={root}", *more]


def vm_peak_kb(args: list[str], env: dict, cwd: Path) -> int:
    """The address space at its peak of this training, run unsupervised in one process."""
    done = subprocess.run([PYTHON, "-c", VMPEAK, *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return int(done.stderr.strip().splitlines()[-1].split()[1])


def under_address_limit(args: list[str], env: dict, cwd: Path, limit_kb: int,
                        command: list[str] | None = None) -> subprocess.CompletedProcess:
    """`mlxlab-train args` with RLIMIT_AS (what `ulimit -v` sets) on it and its child."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit_kb * 1024, limit_kb * 1024))

    return subprocess.run([*(command or [MLXLAB_TRAIN]), *args], env=env, cwd=cwd,
                          preexec_fn=limit, capture_output=True, text=True, timeout=900)


def oom_env(cli_env: dict) -> dict:
    # one malloc arena: threads' arenas reserve address space in 64 MB steps (noise in VmPeak)
    return {**cli_env, "MALLOC_ARENA_MAX": "1"}


def calibrated(tmp_path: Path, cli_env: dict, files: dict[str, Path],
               steps: int) -> tuple[dict, str, list[str], int]:
    """(env, store URI, the runs' arguments, VmPeak in kB of the run at micro-batch 16) for a
    run of `steps` steps, seed 42, on `files`."""
    env = oom_env(cli_env)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    common = finetune_args(files, tmp_path, uri, "seed=42", f"trainer.max_steps={steps}",
                           f"trainer.eval_every_steps={steps}")
    fits = vm_peak_kb([*common, "trainer.micro_batch=16", "tracking.uri="
                       f"sqlite:///{tmp_path}/calibration.db",
                       f"hydra.run.dir={tmp_path / 'calibration'}"], env, tmp_path)
    return env, uri, common, fits


def final_weights(run_dir: Path) -> dict[str, np.ndarray]:
    last = max(supervise.committed_steps(run_dir))
    weights = mx.load(str(run_dir / "checkpoints" / f"step_{last:08d}" / "model.safetensors"))
    return {k: np.array(v) for k, v in weights.items()}


def history(client, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


@pytest.mark.slow
@linux_only
def test_a_run_out_of_memory_restarts_at_half_the_micro_batch_and_equals_its_resume(
        tmp_path, cli_env):
    """Micro-batch 32 does not fit the long rows of step 4 under the address space limit (MLX's
    CPU backend segfaults): the parent restarts the run from its step-2 checkpoint at 16 x 2, in
    the same folder and MLflow run, and it finishes; its weights and metrics from step 3 on are
    bitwise those of a run resumed from a copy of that checkpoint at micro-batch 16 (the same
    checkpoint, settings and data order: on MLX's CPU backend the same computation)."""
    from mlflow import MlflowClient

    env, uri, common, fits = calibrated(tmp_path, cli_env, long_rows_data(tmp_path, seed=42), 5)
    limit_kb = fits + 32 * 1024  # 32 MB over the peak at 16 rows; 32 rows need ~140 MB more
    run_dir = tmp_path / "run"
    done = under_address_limit([*common, "trainer.micro_batch=32", f"hydra.run.dir={run_dir}"],
                               env, tmp_path, limit_kb)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "out of memory (SIGSEGV) at step 4 with micro-batch 32" in done.stderr
    assert "1 step(s) since that checkpoint are trained again" in done.stderr
    note = supervise.read_note(run_dir)
    assert (note["micro_batch"], note["grad_accum"]) == (16, 2)
    assert note["restarts"][0]["checkpoint_step"] == 2

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("finetune_completions")
                               .experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # one run, continued
    run = runs[0]
    tags = run.data.tags
    assert tags["mlxlab.oom_restarts"] == "1"
    assert int(tags["mlxlab.micro_batch"]) * int(tags["mlxlab.grad_accum"]) == BATCH
    assert "micro-batch 32 -> 16" in tags["mlxlab.oom_restart.1"]

    # the same checkpoint, resumed by hand at micro-batch 16, in another store
    copy = tmp_path / "copy"
    shutil.copytree(run_dir / "checkpoints" / "step_00000002", copy / "checkpoints" / "step_00000002")
    reference = tmp_path / "reference"
    ref_uri = f"sqlite:///{tmp_path}/reference.db"
    subprocess.run([PYTHON, "-m", "mlxlab.train", *common, f"tracking.uri={ref_uri}",
                    f"resume={copy}", "trainer.micro_batch=16", f"hydra.run.dir={reference}"],
                   env=env, cwd=tmp_path, check=True, capture_output=True, timeout=600)
    ours, theirs = final_weights(run_dir), final_weights(reference)
    assert ours.keys() == theirs.keys()
    assert all(np.array_equal(ours[k], theirs[k]) for k in ours)
    ref_client = MlflowClient(tracking_uri=ref_uri)
    ref_run = ref_client.search_runs([ref_client.get_experiment_by_name("finetune_completions")
                                      .experiment_id])[0]
    for key in ("train/loss", "val/loss"):
        mine, other = history(client, run.info.run_id, key), history(ref_client,
                                                                     ref_run.info.run_id, key)
        assert {s: v for s, v in mine.items() if s >= 3} == other, key
    assert sorted(history(client, run.info.run_id, "train/loss")) == [1, 2, 3, 4, 5]


@pytest.mark.slow
def test_auto_picks_the_largest_power_of_two_that_fits_the_limit(tmp_path, make_cfg, request):
    """Long rows (every row 255 positions): the peaks MLX reports for real runs at micro-batch 4
    and 8 set a limit between them; micro_batch=auto then picks 4, and its own run stays under
    the limit."""
    from mlxlab.train import train

    files = long_rows_data(tmp_path, seed=42, long_step=None)

    def run(*more: str, folder: str | None = None) -> tuple[float, dict]:
        cfg = compose_cfg(tmp_path / (folder or more[0].rsplit("=", 1)[1]), [*[a for a in finetune_args(files, tmp_path, "x") if not
                         a.startswith(("tracking.", "paths.root_dir"))], "tracking=none",
                       "trainer.batch_size=16", "trainer.max_steps=1",
                       "trainer.eval_every_steps=1", *more])
        from mlxlab.runs import load_run_model

        mx.reset_peak_memory()
        train(cfg)
        peak = mx.get_peak_memory()
        _, state = load_run_model(Path(cfg.paths.output_dir))
        return peak, state.config.get("batch_plan", {})

    was = mx.get_memory_limit()
    request.addfinalizer(lambda: mx.set_memory_limit(was))  # memory_limit sets MLX's
    peak4, _ = run("trainer.micro_batch=4")
    peak8, _ = run("trainer.micro_batch=8")
    assert peak8 > peak4 * 1.3  # the rows' memory dominates
    limit_mb = (peak4 + peak8) / 2 / 1e6
    peak, plan = run("trainer.micro_batch=auto", f"trainer.memory_limit={limit_mb:.3f}MB")
    assert plan["chosen_by"] == "auto" and plan["micro_batch"] == 4 and plan["grad_accum"] == 4
    assert peak <= limit_mb * 1e6
    assert "8:" in plan["tried"]  # 8 was measured (or predicted) over the limit, and said so

    # resumed (two more steps), the run keeps its choice instead of searching again
    checkpointed = tmp_path / "auto" / "outputs" / "run"  # compose_cfg's run folder
    _, resumed = run("trainer.micro_batch=auto", f"trainer.memory_limit={limit_mb:.3f}MB",
                     f"resume={checkpointed}", "trainer.max_steps=2", folder="resumed")
    assert resumed["chosen_by"] == "resumed" and resumed["micro_batch"] == 4
    assert resumed["tried"] == plan["tried"]


@pytest.mark.slow
@linux_only
def test_a_sweep_whose_config_runs_out_of_memory_finishes_every_job_once(tmp_path, cli_env):
    """A grid of data.max_length (48: fits; 255: step 4's long rows do not fit micro-batch 32)
    x two seeds under an address space limit: the sweep's process dies in a long job, its parent
    runs the sweep's command again, the finished jobs are kept, the dead one resumes from its
    checkpoint at 16 x 2; every (config, seed) has one FINISHED run, the verdict is computed, no
    run is left RUNNING."""
    from mlflow import MlflowClient

    env = oom_env(cli_env)
    files = long_rows_data(tmp_path, seed=1)
    # (seed 2 spreads the long rows over every step: its first step runs out, before any
    # checkpoint, and the job starts again at 16 x 2)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    common = finetune_args(files, tmp_path, uri, "trainer.max_steps=5",
                           "trainer.eval_every_steps=5", "trainer.micro_batch=32")
    fits = vm_peak_kb([*[a for a in common if a != "trainer.micro_batch=32"],
                       "trainer.micro_batch=16", "seed=1", "tracking.uri="
                       f"sqlite:///{tmp_path}/calibration.db",
                       f"hydra.run.dir={tmp_path / 'calibration'}"], env, tmp_path)
    done = under_address_limit(["-m", *common, "data.max_length=48,255", "seed=1,2",
                                f"hydra.sweep.dir={tmp_path / 'sweep'}"], env, tmp_path,
                               fits + 48 * 1024)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "out of memory (SIGSEGV)" in done.stderr
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("finetune_completions")
                               .experiment_id])
    assert not [r for r in runs if r.info.status == "RUNNING"]
    parent = next(r for r in runs if r.data.tags.get("mlxlab.role") == "sweep")
    assert parent.info.status == "FINISHED"
    from mlxlab.sweeps.jobs import job_runs_of
    from mlxlab.sweeps.store import sweep_children

    jobs = job_runs_of(sweep_children(client, parent.info.run_id))
    assert len(jobs) == 4 and all(r.info.status == "FINISHED" for r in jobs)
    assert {(r.data.params["data.max_length"], r.data.params["seed"]) for r in jobs} == {
        (m, s) for m in ("48", "255") for s in ("1", "2")}
    restarted = [r for r in jobs if "mlxlab.oom_restarts" in r.data.tags]
    assert restarted and all(r.data.params["data.max_length"] == "255" for r in restarted)
    compared = subprocess.run([str(Path(PYTHON).parent / "mlxlab"), "runs", "compare",
                               parent.info.run_id, "--uri", uri, "--json", "--no-record"],
                              env=env, capture_output=True, text=True, timeout=300)
    assert compared.returncode == 0, compared.stderr[-3000:]
    verdict = json.loads(compared.stdout)
    assert verdict, compared.stdout  # the sweep's groups compared: two seeds each


def test_mlxs_raised_out_of_memory_restarts_under_the_parent_until_its_bound(tmp_path, cli_env):
    """MLX on Metal/CUDA raises when memory runs out (reproduced after step 6, as tests/
    test_failures.py does: MLX's CPU backend cannot raise it): under mlxlab-train's parent the
    child records it and exits, the parent restarts it from its step-4 checkpoint at half the
    micro-batch; failing again past trainer.oom_restarts=1, the run ends with one line, exit 2,
    naming the checkpoint."""
    tests = Path(__file__).resolve().parent
    env = {**cli_env, "PYTHONPATH": f"{tests}{os.pathsep}{cli_env.get('PYTHONPATH', '')}"}
    run_dir = tmp_path / "run"
    out = subprocess.run(
        [MLXLAB_TRAIN, *FAST, "trainer.max_steps=8", "trainer.eval_every_steps=null",
         "trainer.batch_size=16", "trainer.oom_restarts=1", "tracking=csv",
         "checkpoint.save_every_steps=4", "checkpoint.save_every_minutes=null",
         "checkpoint.async_write=false", f"hydra.run.dir={run_dir}",
         "+callbacks.fail={_target_: failure_helpers.FailAt, step: 6}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    assert ("out of memory (out of memory) at step 7 with micro-batch 16 x grad_accum 1: "
            "restarting from the checkpoint of step 4 with micro-batch 8 x grad_accum 2") \
        in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("mlxlab: error: the run ran out of memory (out of memory) at step 7 "
                           "with micro-batch 8 x grad_accum 2 and is not restarted: "
                           "trainer.oom_restarts=1 restarts were made"), last
    assert f"last: step 4 in {run_dir}" in last
    note = supervise.read_note(run_dir)
    assert [e["micro_batch"] for e in note["restarts"]] == [16]
    assert "Traceback" not in out.stderr


def test_a_run_restarted_before_its_first_checkpoint_stays_one_mlflow_run(tmp_path, cli_env):
    """Out of memory at step 2, before any checkpoint (MLX's raising kind, once): the parent
    restarts the run from the start at half the micro-batch, and the restart continues the
    same MLflow run (before: a KILLED run beside the FINISHED one), whose steps are each logged
    once."""
    from mlflow import MlflowClient

    tests = Path(__file__).resolve().parent
    env = {**cli_env, "PYTHONPATH": f"{tests}{os.pathsep}{cli_env.get('PYTHONPATH', '')}"}
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    out = subprocess.run(
        [MLXLAB_TRAIN, *FAST, "trainer.eval_every_steps=null", "trainer.batch_size=16",
         f"tracking.uri={uri}", "tracking.background=false", "checkpoint.save_every_steps=10",
         "checkpoint.save_every_minutes=null", f"hydra.run.dir={tmp_path / 'run'}",
         "+callbacks.fail={_target_: failure_helpers.FailAt, step: 2, once: "
         f"{tmp_path / 'failed'}}}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "restarting from the checkpoint of step 0 with micro-batch 8" in out.stderr
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("train").experiment_id])
    assert [r.info.status for r in runs] == ["FINISHED"]
    assert runs[0].data.tags["mlxlab.oom_restarts"] == "1"
    assert sorted(history(client, runs[0].info.run_id, "train/loss")) == [1, 2, 3, 4]


def test_only_the_parents_own_child_reports_to_it(tmp_path, monkeypatch):
    """A launcher's worker (joblib's) inherits the parent's variables; its out of memory stays
    its job's (a failed trial), so it neither reports a plan nor ends its process for a restart."""
    from mlxlab.runtime import settings

    monkeypatch.setenv(supervise.ENV, str(tmp_path))
    monkeypatch.setenv(supervise.PID_ENV, str(os.getppid()))
    settings.reload()  # a child reads its environment at start
    assert supervise.folder() == tmp_path  # the child the parent started
    monkeypatch.setenv(supervise.PID_ENV, str(os.getpid()))  # a grandchild's view
    settings.reload()
    assert supervise.folder() is None
    supervise.report_run(tmp_path, 8, 2, 3, True)
    assert not (tmp_path / "run.json").exists()
    assert supervise.report_oom(3, "[malloc] Unable to allocate") is False
    assert not supervise.wanted()  # under a parent: never a second one
    monkeypatch.undo()
    settings.reload()


def test_a_crashed_measurement_is_the_searchs_ceiling_and_the_run_starts_again(tmp_path):
    """trainer.micro_batch=auto crashed measuring 32 rows (a limit the process cannot see: the
    kernel's OOM killer, another process's memory): the parent's note makes 32 the ceiling (a
    later crash at 16 lowers it, a crash at 64 does not raise it), and the crash counts as an
    out of memory only while a measurement or a plan is on record."""
    probe = {"run_dir": str(tmp_path), "micro_batch": 32, "sweep": False}
    assert supervise.out_of_memory(-11, tmp_path, signalled=False) is None
    (tmp_path / "probe.json").write_text(json.dumps(probe))
    assert supervise.out_of_memory(-11, tmp_path, signalled=False) == "SIGSEGV"
    supervise.write_note(tmp_path, supervise.probe_note(probe, "SIGSEGV", "now"))
    assert supervise.probe_ceiling(tmp_path) == (32, "SIGSEGV")
    supervise.write_note(tmp_path, supervise.probe_note({**probe, "micro_batch": 64}, "SIGKILL",
                                                        "later"))
    assert supervise.probe_ceiling(tmp_path) == (32, "SIGSEGV")
    supervise.write_note(tmp_path, supervise.probe_note({**probe, "micro_batch": 16}, "SIGKILL",
                                                        "later"))
    assert supervise.probe_ceiling(tmp_path) == (16, "SIGKILL")


@pytest.mark.slow
@linux_only
def test_auto_under_an_address_space_limit_budgets_it_and_never_measures_a_size_that_crashes(
        tmp_path, cli_env):
    """trainer.micro_batch=auto under an address space limit that micro-batch 16 of long rows
    fits and 32 does not: the search budgets the limit (RLIMIT_AS less what the process maps and
    headroom), so no measurement crashes the process (before: measuring 32 crashed it and the
    parent started it again); it trains at a size that fits, the same effective batch, in one
    MLflow run, FINISHED, with no restart."""
    from mlflow import MlflowClient

    env, uri, common, fits = calibrated(tmp_path, cli_env,
                                        long_rows_data(tmp_path, seed=42, long_step=None), 2)
    run_dir = tmp_path / "run"
    done = under_address_limit([*common, "trainer.micro_batch=auto", f"hydra.run.dir={run_dir}"],
                               env, tmp_path, fits + 48 * 1024)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "ran out of memory" not in done.stderr and "Traceback" not in done.stderr
    assert supervise.read_note(run_dir) is None  # nothing crashed, nothing restarted
    log = "".join(f.read_text() for f in run_dir.glob("*.log"))
    line = next(text for text in log.splitlines() if "trainer.micro_batch=auto:" in text)
    assert "(RLIMIT_AS " in line, line

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("finetune_completions")
                               .experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    tags = runs[0].data.tags
    assert int(tags["mlxlab.micro_batch"]) * int(tags["mlxlab.grad_accum"]) == BATCH
    assert int(tags["mlxlab.micro_batch"]) <= 16
    assert sorted(history(client, runs[0].info.run_id, "train/loss")) == [1, 2]
