"""Data parallelism with real processes: `mlx.launch -n 2` (ring backend over localhost TCP).

Equivalence is checked on the weights: N ranks x batch B and one process x batch N*B must end
at the same parameters (fp32 summation order is the only difference).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from conftest import PYTHON
from run_helpers import TINY_LM

BIN = Path(PYTHON).parent
TOL = 1e-5  # relative difference of the parameters: room for fp32 summation order only

BERT = [
    "model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.dropout=0",
    "trainer.max_steps=20", "trainer.schedule.warmup_steps=2", "trainer.log_every_steps=5",
    "callbacks.early_stopping.patience=0", "callbacks.progress.enabled=false",
    "checkpoint.save_every_minutes=null", "tracking=none",
]
LM = [
    *TINY_LM, "data.tokenizer_sample=300",
    "trainer.max_steps=20", "trainer.eval_every_steps=20", "trainer.schedule.warmup_steps=2",
    "trainer.log_every_steps=5", "callbacks.progress.enabled=false",
    "checkpoint.save_every_minutes=null", "tracking=none",
]


def command(ranks: int, args: list[str], run_dir: Path) -> list[str]:
    train = [str(BIN / "mlxlab-train"), *args, f"hydra.run.dir={run_dir}"]
    if ranks == 1:
        return train
    # A random port: earlier runs' sockets may linger in TIME_WAIT on the default one.
    port = str(random.randint(20000, 60000))
    return [str(BIN / "mlx.launch"), "-n", str(ranks), "-p", port, "--", *train]


def start(ranks: int, args: list[str], run_dir: Path, env: dict) -> subprocess.Popen:
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(command(ranks, args, run_dir), cwd=run_dir.parent, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def run(ranks: int, args: list[str], run_dir: Path, env: dict) -> str:
    proc = start(ranks, args, run_dir, env)
    out, err = proc.communicate(timeout=900)
    # mlx.launch (0.32) exits 0 even when a rank failed: check for the finished run's summary too.
    assert proc.returncode == 0 and "run dir:" in out, (out + err)[-4000:]
    return out + err


def committed_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.parent.name[5:]) for p in run_dir.glob("checkpoints/step_*/COMMITTED"))


def weights(run_dir: Path, step: int | None = None) -> dict[str, np.ndarray]:
    step = max(committed_steps(run_dir)) if step is None else step
    path = run_dir / "checkpoints" / f"step_{step:08d}" / "model.safetensors"
    return {k: np.array(v) for k, v in mx.load(str(path)).items()}


def optimizer_state(run_dir: Path) -> dict[str, np.ndarray]:
    step = max(committed_steps(run_dir))
    path = run_dir / "checkpoints" / f"step_{step:08d}" / "optimizer.safetensors"
    return {k: np.array(v) for k, v in mx.load(str(path)).items()}


def relative_difference(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """||a - b|| / ||b|| over all tensors together. (Per tensor it is meaningless for tensors whose
    gradient is exactly zero, such as attention key biases, which stay at float noise ~1e-8.)"""
    assert a.keys() == b.keys()
    num = sum(float(np.sum((a[k] - b[k]).astype(np.float64) ** 2)) for k in a)
    den = sum(float(np.sum(b[k].astype(np.float64) ** 2)) for k in a)
    return (num / max(den, 1e-30)) ** 0.5


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while not any(s >= step for s in committed_steps(run_dir)):
        assert proc.poll() is None, f"the run ended before step {step}: {proc.communicate()}"
        assert time.time() < deadline
        time.sleep(0.05)


def rank_processes(proc: subprocess.Popen) -> list[int]:
    """The two ranks' pids (sorted), i.e. the launcher's session less the launcher itself."""
    found = subprocess.run(["pgrep", "-s", str(proc.pid), "-f", "mlxlab-train"],
                           capture_output=True, text=True).stdout.split()
    ranks = sorted(int(p) for p in found if int(p) != proc.pid)
    assert len(ranks) == 2, found
    return ranks


def start_long_run(tmp_path: Path, cli_env: dict, every: int, *extra: str
                   ) -> tuple[subprocess.Popen, Path, list[int]]:
    """2 ranks of a BERT run with no end in sight, checkpointing every `every` steps; returns
    once the first checkpoint is committed: (launcher, run dir, rank pids)."""
    args = [*BERT, "trainer.max_steps=100000", "trainer.batch_size=8",
            f"checkpoint.save_every_steps={every}", *extra]
    run_dir = tmp_path / "run"
    proc = start(2, args, run_dir, cli_env)
    wait_for_step(proc, run_dir, every)
    return proc, run_dir, rank_processes(proc)


def report(name: str, value: float) -> None:
    """Measured figures go to stdout (pytest -s) and to a file the docs quote."""
    print(f"{name}: {value:.3g}")
    out = os.environ.get("MLXLAB_DIST_REPORT")
    if out:
        with open(out, "a") as f:
            f.write(f"{name}\t{value:.3g}\n")


def test_two_ranks_equal_one_process_with_twice_the_batch_bert(tmp_path, cli_env, make_cfg):
    """One launch (2 ranks x 8 rows) beside the same run trained in this process on 16 rows."""
    from mlxlab.train import train

    args = BERT
    train(make_cfg(*args, "trainer.batch_size=16"))
    one = tmp_path / "outputs" / "run"
    out = run(2, [*args, "trainer.batch_size=8", f"paths.cache_dir={tmp_path / 'cache'}"],
              tmp_path / "two", cli_env)
    assert "data parallel: 2 ranks" in out
    assert committed_steps(tmp_path / "two") == committed_steps(one)
    diff = relative_difference(weights(tmp_path / "two"), weights(one))
    report("bert 2x8 vs 1x16", diff)
    assert diff <= TOL
    # the gathered optimizer state is the unsharded one, under the same names
    opt_diff = relative_difference(optimizer_state(tmp_path / "two"), optimizer_state(one))
    assert opt_diff <= 1e-4
    assert out.count("validation (best checkpoint") == 1  # rank 0 alone prints its summary
    assert not (tmp_path / "two" / "checkpoints").with_name("rank1").exists()


@pytest.mark.slow
def test_two_ranks_equal_one_process_with_twice_the_batch_lm(tmp_path, cli_env):
    args = LM
    run(1, [*args, "trainer.batch_size=16"], tmp_path / "one", cli_env)
    run(2, [*args, "trainer.batch_size=8"], tmp_path / "two", cli_env)
    diff = relative_difference(weights(tmp_path / "two"), weights(tmp_path / "one"))
    report("lm 2x8 vs 1x16", diff)
    assert diff <= TOL


@pytest.mark.slow
@pytest.mark.parametrize(
    ("one", "two"),
    [(["trainer.grad_accum=2", "trainer.batch_size=16"], ["trainer.grad_accum=2", "trainer.batch_size=8"]),
     (["model.lora.rank=4", "trainer.batch_size=16"], ["model.lora.rank=4", "trainer.batch_size=8"]),
     # token budgets are per rank, like batch_size: 2 x 256 padded tokens == 1 x 512
     (["trainer.batching.dynamic=true", "trainer.batching.max_tokens=512"],
      ["trainer.batching.dynamic=true", "trainer.batching.max_tokens=256"])],
    ids=["grad_accum", "lora", "dynamic_batch"],
)
def test_accumulation_lora_dynamic_batches_under_data_parallelism(tmp_path, cli_env, one, two):
    run(1, [*BERT, *one], tmp_path / "one", cli_env)
    run(2, [*BERT, *two], tmp_path / "two", cli_env)
    diff = relative_difference(weights(tmp_path / "two"), weights(tmp_path / "one"))
    report(f"bert {two[0]} 2 ranks vs 1 process", diff)
    assert diff <= TOL


# One epoch of streamed text on this rank's lane (data.shard_by_rank), as the trainer reads it,
# through a tokenizer that notes every text it encodes.
LANES = """
import json, sys
import mlxlab  # noqa: F401  (fast BLAS before mlx.core)
from mlxlab.data.batching import Batching
from mlxlab.data.streaming import StreamingText
from mlxlab.runtime.cluster import distributed


class Counting:
    def __init__(self, tokenizer):
        self.tokenizer, self.texts = tokenizer, []

    def encode_batch(self, texts, **kwargs):
        self.texts += texts
        return self.tokenizer.encode_batch(texts, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


world = distributed.world("auto", 600)
data = StreamingText(source={"data_files": sys.argv[1]}, splits={"val_examples": 0},
                     packing={"seq_len": 64}, shuffle_buffer=100,
                     tokenizer={"vocab_size": 258, "min_vocab": 0}, tokenizer_sample=500,
                     shard_by_rank=True)
data.setup()
data.tokenizer = counting = Counting(data.tokenizer)
assert data.use_world(world)
batches = sum(1 for _ in data.train_batches(Batching(batch_size=16), 0))
print("RESULT " + json.dumps({"rank": world.rank, "texts": counting.texts, "batches": batches}),
      flush=True)
"""


@pytest.mark.slow
def test_each_rank_tokenizes_only_its_lane_of_the_stream(tmp_path, cli_env):
    """data.shard_by_rank with 2 real ranks reading one epoch as the trainer does: the documents
    each rank tokenizes (seen by the real tokenizer) are disjoint and together the whole stream.
    Every document has the same length in bytes and the tokenizer is bytes only (vocab 258), so
    both lanes hold the same tokens and the epoch ends with both lanes read to the end."""
    rng = random.Random(0)
    docs = [f"document {i:04d} " + " ".join("".join(rng.choice("abcdefgh") for _ in range(5))
                                             for _ in range(12)) for i in range(60)]
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (tmp_path / "lanes.py").write_text(LANES)
    port = str(random.randint(20000, 60000))
    done = subprocess.run([str(BIN / "mlx.launch"), "-n", "2", "-p", port, "--", PYTHON,
                           str(tmp_path / "lanes.py"), str(data)],
                          cwd=tmp_path, env=cli_env, capture_output=True, text=True, timeout=600)
    ranks = sorted((json.loads(line[7:]) for line in done.stdout.splitlines()
                    if line.startswith("RESULT ")), key=lambda r: r["rank"])
    assert len(ranks) == 2, (done.stdout + done.stderr)[-3000:]
    mine = [set(r["texts"]) for r in ranks]
    assert all(len(m) == len(r["texts"]) == 30 for m, r in zip(mine, ranks))  # each read once
    assert not mine[0] & mine[1]
    assert mine[0] | mine[1] == set(docs)
    assert ranks[0]["batches"] == ranks[1]["batches"]


@pytest.mark.slow
def test_lanes_resume_after_sigkill_and_end_epochs_together(tmp_path, cli_env):
    """2 ranks with data.shard_by_rank over a few epochs (uneven lanes: the epoch ends when the
    first lane runs dry), SIGKILLed after step 8 and resumed: the lanes continue where they were,
    so the weights match an uninterrupted run. Resumed as 1 process instead, the run starts its
    lane at the first document no old lane had read, and finishes."""
    args = [*LM, "data.shard_by_rank=true", "data.splits.max_examples=6", "trainer.batch_size=4",
            "checkpoint.save_every_steps=4", "checkpoint.keep_last_n=10",
            "trainer.distributed.timeout_s=300"]  # steps and saves on a loaded box
    run(2, args, tmp_path / "reference", cli_env)
    state = json.loads((tmp_path / "reference/checkpoints/step_00000020/state.json").read_text())
    assert state["epoch"] >= 2  # epochs ended (together) within the 20 steps
    run_dir = tmp_path / "killed"
    proc = start(2, args, run_dir, cli_env)
    wait_for_step(proc, run_dir, 8)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    shutil.copytree(run_dir, tmp_path / "killed_copy")  # the same checkpoints, resumed by 1 rank
    run(2, [*args, "resume=auto"], run_dir, cli_env)
    diff = relative_difference(weights(run_dir), weights(tmp_path / "reference"))
    report("lanes: resume 2->2 ranks after SIGKILL vs uninterrupted", diff)
    assert diff <= TOL
    out = run(1, [*args, "resume=auto"], tmp_path / "killed_copy", cli_env)
    assert "the lanes restart at document" in out
    assert max(committed_steps(tmp_path / "killed_copy")) == 20


@pytest.mark.slow
@pytest.mark.parametrize(("first", "then"), [(2, 1), (1, 2)], ids=["2to1", "1to2"])
def test_sigkill_then_resume_at_another_world_size(tmp_path, cli_env, first, then):
    args = [*BERT, "tracking=mlflow", "checkpoint.save_every_steps=4",
            "checkpoint.keep_last_n=10", "task_name=dpresume"]
    per_rank = {1: "trainer.batch_size=16", 2: "trainer.batch_size=8"}
    run(1, [*args, per_rank[1]], tmp_path / "reference", cli_env)

    run_dir = tmp_path / "outputs" / "killed"
    proc = start(first, [*args, per_rank[first]], run_dir, cli_env)
    wait_for_step(proc, run_dir, 8)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every rank
    proc.wait()
    assert max(committed_steps(run_dir)) < 20
    run(then, [*args, per_rank[then], "resume=auto"], run_dir, cli_env)

    diff = relative_difference(weights(run_dir), weights(tmp_path / "reference"))
    report(f"resume {first}->{then} ranks vs uninterrupted", diff)
    assert diff <= TOL
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name("dpresume")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`mlxlab.run_dir` = '{run_dir}'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # one MLflow run for both parts
    assert [p.name for p in (tmp_path / "outputs").iterdir()] == ["killed"]  # one run folder


@pytest.mark.slow
def test_a_killed_rank_stops_the_others_with_checkpoints_intact(tmp_path, cli_env):
    proc, run_dir, rank_pids = start_long_run(tmp_path, cli_env, 3,
                                              "trainer.distributed.timeout_s=20")
    os.kill(max(rank_pids), signal.SIGKILL)  # one rank dies
    killed_at = time.time()
    out, err = proc.communicate(timeout=90)
    assert time.time() - killed_at < 60
    # mlx.launch itself exits 0 whatever its ranks did; it reports each rank's exit status.
    print(err[-1500:])
    codes = [line for line in err.splitlines() if "exited with code" in line or "was killed" in line]
    assert len(codes) == 2 and not any("code 0" in line for line in codes), err[-3000:]
    for pid in rank_pids:  # no survivor left behind
        assert subprocess.run(["kill", "-0", str(pid)], capture_output=True).returncode != 0
    steps = committed_steps(run_dir)
    assert steps and not list((run_dir / "checkpoints").glob(".tmp*"))
    from mlxlab.checkpoint import check_committed

    for step in steps:
        assert check_committed(run_dir / "checkpoints" / f"step_{step:08d}") is None


@pytest.mark.slow
def test_sigterm_to_the_launcher_checkpoints_once_and_all_ranks_exit(tmp_path, cli_env):
    proc, run_dir, ranks = start_long_run(tmp_path, cli_env, 5,
                                          "checkpoint.keep_last_n=1000")
    proc.send_signal(signal.SIGTERM)  # the launcher only, as `kill <pid>` would
    proc.wait(timeout=120)
    deadline = time.time() + 120
    while any(subprocess.run(["kill", "-0", str(p)], capture_output=True).returncode == 0
              for p in ranks):
        assert time.time() < deadline, "ranks kept running after the launcher was stopped"
        time.sleep(0.2)
    steps = committed_steps(run_dir)
    emergency = [s for s in steps if s % 5]
    assert len(emergency) <= 1, steps  # one checkpoint at the stop step (unless it fell on a 5)
    last = json.loads((run_dir / "checkpoints" / f"step_{steps[-1]:08d}" / "state.json").read_text())
    assert last["step"] == steps[-1]
    assert not list((run_dir / "checkpoints").glob(".tmp*"))


@pytest.mark.slow
def test_a_hung_rank_trips_the_watchdog_of_the_others(tmp_path, cli_env):
    """A rank that stops answering without closing its sockets (SIGSTOP: a hung host) leaves the
    other blocked in a collective: the watchdog ends it with one clear line and exit 75."""
    proc, run_dir, rank_pids = start_long_run(tmp_path, cli_env, 3,
                                              "trainer.distributed.timeout_s=15")
    hung = rank_pids[1]
    os.kill(hung, signal.SIGSTOP)
    stopped_at = time.time()
    try:
        while subprocess.run(["kill", "-0", str(rank_pids[0])], capture_output=True).returncode == 0:
            assert time.time() - stopped_at < 60, "the surviving rank did not exit within 60 s"
            time.sleep(0.5)
    finally:
        os.kill(hung, signal.SIGKILL)
    out, err = proc.communicate(timeout=60)
    assert "waited over 15 s for the other ranks" in err, err[-3000:]
    assert "exited with code 75" in err
    from mlxlab.checkpoint import check_committed

    for step in committed_steps(run_dir):
        assert check_committed(run_dir / "checkpoints" / f"step_{step:08d}") is None


@pytest.mark.slow
@pytest.mark.parametrize("cache", [True, False], ids=["cached_teacher", "teacher_in_step"])
def test_distillation_under_data_parallelism(tmp_path, cli_env, cache):
    """objective=distill (a tiny BERT teacher, a cnn_hybrid student): 2 ranks x 8 == 1 x 16, with the
    teacher's probabilities looked up from the cache or computed in every step."""
    run(1, [*BERT, "trainer.max_steps=8"], tmp_path / "teacher", cli_env)
    student = [*BERT, "experiment=distill_titanic", "model.dropout=0",
               f"objective.teachers=[{{run: '{tmp_path / 'teacher'}'}}]",
               f"objective.cache_teacher={str(cache).lower()}"]
    run(1, [*student, "trainer.batch_size=16"], tmp_path / "one", cli_env)
    out = run(2, [*student, "trainer.batch_size=8"], tmp_path / "two", cli_env)
    assert "data parallel: 2 ranks" in out
    diff = relative_difference(weights(tmp_path / "two"), weights(tmp_path / "one"))
    report(f"distill cache_teacher={cache} 2x8 vs 1x16", diff)
    assert diff <= TOL
