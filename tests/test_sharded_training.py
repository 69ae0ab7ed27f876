"""trainer.distributed.mode=fsdp and mode=tensor with real processes: `mlx.launch -n 2` (the ring
backend over localhost TCP), beside one process at the same global batch.

fsdp: each rank trains its rows of the global batch with 1/N of every parameter, gradient and
optimizer slot (MLX's FullyShardedModule per block); tensor: every rank computes the whole batch
with each block's heads and MLP split (MLX's sharded linears). Both must end at the one process's
weights (fp32 summation order is the only difference), write checkpoints one process loads, and
resume after a SIGKILL.
"""

from __future__ import annotations

import os
import re
import resource
import signal
import subprocess
import time

import mlx.core as mx
import numpy as np
import pytest

from conftest import PYTHON
from test_distributed import (
    BIN,
    LM,
    TOL,
    command,
    committed_steps,
    rank_processes,
    relative_difference,
    report,
    run,
    start,
    wait_for_step,
    weights,
)
from test_out_of_memory import VMPEAK, linux_only

SHORT = [*LM, "trainer.max_steps=10", "trainer.eval_every_steps=10", "model.num_layers=2"]


def peaks(out: str) -> list[float]:
    """Each rank's MLX peak over the steps, as the run logged it (MB)."""
    line = re.findall(r"MLX peak over the steps, per rank: ([\d., ]+) MB", out)[-1]
    return [float(x) for x in line.split(",")]


@pytest.mark.slow  # a 2-rank launch: test_distributed's DDP twin holds one in the default run
def test_fsdp_with_padded_rows_equals_this_process_at_the_same_global_batch(tmp_path, cli_env,
                                                                             make_cfg):
    """One launch (2 ranks x 4 rows, 4 steps) beside the same run trained in this process on 8
    rows. The MLP is 65 wide, so its gate and up projections' 65 rows, which 2 ranks cannot split
    evenly, are stored with a zero row added, cut off by the gather and by the checkpoint."""
    from mlxlab.train import train

    args = [*LM, "trainer.max_steps=4", "trainer.eval_every_steps=4",
            "model.mlp_dim=65"]
    train(make_cfg(*args, "trainer.batch_size=8"))
    # the tokenizer and data caches this process's run made (compose_cfg's cache folder)
    out = run(2, [*args, "trainer.batch_size=4", "trainer.distributed.mode=fsdp",
                  f"paths.cache_dir={tmp_path / 'cache'}"], tmp_path / "two", cli_env)
    assert "fully sharded (fsdp): 2 ranks" in out and "building it peaked at" in out
    one, two = weights(tmp_path / "outputs" / "run"), weights(tmp_path / "two")
    assert any(v.shape[0] % 2 for v in one.values())  # a padded parameter was trained
    assert {k: v.shape for k, v in two.items()} == {k: v.shape for k, v in one.items()}
    diff = relative_difference(two, one)
    report("fsdp 2x4 vs 1x8, padded rows", diff)
    assert diff <= TOL


def test_a_streamed_checkpoint_file_loads_as_the_one_mlx_writes(tmp_path):
    """What a sharded run's rank 0 writes an array at a time (checkpoint/streamed.py) reads back
    with every dtype and shape mx.save_safetensors keeps; a file cut short is an OSError."""
    from mlxlab.checkpoint.streamed import StreamedSafetensors

    arrays = {"w": mx.random.normal((3, 5)), "b": mx.random.normal((4,)).astype(mx.bfloat16),
              "step": mx.array(7, mx.uint32), "h": mx.ones((2, 2), mx.float16)}
    entries = [(k, tuple(v.shape), v.dtype) for k, v in arrays.items()]
    stream = StreamedSafetensors(tmp_path / "streamed.safetensors", entries)
    for name, value in arrays.items():
        stream.write(name, value)
    stream.close()
    mx.save_safetensors(str(tmp_path / "mlx.safetensors"), arrays, metadata={"format": "mlx"})
    streamed, written = (mx.load(str(tmp_path / f"{n}.safetensors"), return_metadata=True)
                         for n in ("streamed", "mlx"))
    assert streamed[1] == written[1] == {"format": "mlx"}
    for name, value in written[0].items():
        assert streamed[0][name].dtype == value.dtype and mx.array_equal(streamed[0][name], value)
    short = StreamedSafetensors(tmp_path / "short.safetensors", entries)
    short.write("w", arrays["w"])
    with pytest.raises(OSError, match="1 of 4 arrays"):
        short.close()


@pytest.mark.slow
def test_fsdp_equals_one_process_with_the_same_global_batch(tmp_path, cli_env):
    run(1, [*SHORT, "trainer.batch_size=16"], tmp_path / "one", cli_env)
    out = run(2, [*SHORT, "trainer.batch_size=8", "trainer.distributed.mode=fsdp"],
              tmp_path / "two", cli_env)
    assert "fully sharded (fsdp): 2 ranks" in out
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    # whole arrays under the unsharded names: the same file one process writes
    assert {k: v.shape for k, v in two.items()} == {k: v.shape for k, v in one.items()}
    diff = relative_difference(two, one)
    report("fsdp 2x8 vs 1x16", diff)
    assert diff <= TOL


def test_sharded_modes_refuse_what_they_cannot_do_before_any_run_folder(tmp_path, cli_env):
    from one_process import each_in_one_process

    cases = ((["trainer.distributed.shard_optimizer=true"],
              "trainer.distributed.shard_optimizer is retired: write trainer.distributed.mode=fsdp"),
             (["trainer.distributed.mode=fsdp", "trainer.micro_batch=auto"],
              "trainer.micro_batch does not work with trainer.distributed.mode=fsdp"),
             (["trainer.distributed.mode=tensor", "trainer.quantize_bits=4"],
              "trainer.quantize_bits does not work with trainer.distributed.mode=tensor"))
    # in turn in one process (the training app mlxlab-train supervises)
    done = each_in_one_process([["mlxlab-train", *SHORT, *args,
                                 f"hydra.run.dir={tmp_path / 'never'}"] for args, _ in cases],
                               cli_env, cwd=tmp_path, after="one_process:names_here")
    for (_, says), (code, stderr, names) in zip(cases, done, strict=True):
        assert code == 2 and says in stderr, stderr[-2000:]
        assert "never" not in names, names


@pytest.mark.slow
@pytest.mark.parametrize("extra", [pytest.param([], id="full"),
                                   pytest.param(["model.lora.rank=4"], id="lora")])
def test_tensor_and_fsdp_lora_equal_one_process(tmp_path, cli_env, extra):
    run(1, [*SHORT, *extra, "trainer.batch_size=16"], tmp_path / "one", cli_env)
    if extra:  # LoRA shards with fsdp; tensor refuses adapters
        out = run(2, [*SHORT, *extra, "trainer.batch_size=8", "trainer.distributed.mode=fsdp"],
                  tmp_path / "two", cli_env)
    else:  # every rank computes the 16 rows, each with half of every block's heads and MLP
        out = run(2, [*SHORT, "trainer.batch_size=16", "trainer.distributed.mode=tensor"],
                  tmp_path / "two", cli_env)
        assert "tensor parallel: 2 ranks" in out
    diff = relative_difference(weights(tmp_path / "two"), weights(tmp_path / "one"))
    report(f"{'fsdp lora' if extra else 'tensor'} 2 ranks vs 1 process", diff)
    assert diff <= TOL


@pytest.mark.slow
def test_fsdp_rank_peak_is_about_half_of_one_process(tmp_path, cli_env):
    """Full fine-tuning with AdamW: parameters + gradients + two moments dominate (a 4.3 M
    parameter decoder, 8 rows of 32 tokens per rank). Each rank's MLX peak over the steps, as
    the run measures and logs it, is about half the one process's."""
    big = [*SHORT, "model.dim=256", "model.num_heads=4", "model.num_layers=4",
           "trainer.max_steps=4", "trainer.eval_every_steps=4"]
    one = peaks(run(1, [*big, "trainer.batch_size=16"], tmp_path / "one", cli_env))[0]
    two = peaks(run(2, [*big, "trainer.batch_size=8", "trainer.distributed.mode=fsdp"],
                    tmp_path / "two", cli_env))
    report("fsdp rank peak / one process peak", max(two) / one)
    assert len(two) == 2 and max(two) < 0.62 * one, (one, two)


@pytest.mark.slow
def test_fsdp_sigkill_resumes_bitwise_and_exports_like_any_run(tmp_path, cli_env):
    args = [*LM, "trainer.batch_size=8", "trainer.distributed.mode=fsdp",
            "checkpoint.save_every_steps=4", "checkpoint.keep_last_n=10",
            "trainer.distributed.timeout_s=120"]
    run(2, args, tmp_path / "reference", cli_env)
    run_dir = tmp_path / "killed"
    proc = start(2, args, run_dir, cli_env)
    wait_for_step(proc, run_dir, 8)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert max(committed_steps(run_dir)) < 20
    run(2, [*args, "resume=auto"], run_dir, cli_env)  # the same command, resumed
    resumed, reference = weights(run_dir), weights(tmp_path / "reference")
    assert all(np.array_equal(resumed[k], reference[k]) for k in reference)  # bitwise
    # a sharded run's checkpoint is a whole model any verb loads in one process
    out = tmp_path / "exported"
    done = subprocess.run([str(BIN / "mlxlab"), "export", str(run_dir), "--format", "mlx-lm",
                           "--out", str(out)], cwd=tmp_path, env=cli_env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    exported = {}
    for f in out.glob("*.safetensors"):
        exported.update(mx.load(str(f)))
    assert exported and len(exported) == len(reference)


@pytest.mark.slow
def test_a_killed_fsdp_rank_ends_the_other_with_the_reason(tmp_path, cli_env):
    args = [*LM, "trainer.max_steps=100000", "trainer.batch_size=8",
            "trainer.distributed.mode=fsdp", "checkpoint.save_every_steps=3",
            "trainer.distributed.timeout_s=20"]
    run_dir = tmp_path / "run"
    proc = start(2, args, run_dir, cli_env)
    wait_for_step(proc, run_dir, 3)
    ranks = rank_processes(proc)
    os.kill(max(ranks), signal.SIGKILL)
    killed_at = time.time()
    _, err = proc.communicate(timeout=120)
    assert time.time() - killed_at < 60
    # the survivor says why: the ring saw its peer go, or the watchdog's deadline passed
    assert ("connection to a peer was lost" in err or "closed by the peer" in err
            or "waited over 20 s for the other ranks" in err), err[-3000:]
    codes = [line for line in err.splitlines() if "exited with code" in line or "was killed" in line]
    assert len(codes) == 2 and not any("code 0" in line for line in codes), err[-3000:]


def vm_peaks_kb(ranks: int, args: list[str], run_dir, env: dict) -> list[int]:
    """Each process's address space at its peak (VmPeak, kB) of this training, unsupervised."""
    script = run_dir.parent / "vmpeak.py"
    script.write_text(VMPEAK)
    train = [PYTHON, str(script), *args, f"hydra.run.dir={run_dir}"]
    launch = [str(BIN / "mlx.launch"), "-n", str(ranks), "--"] if ranks > 1 else []
    done = subprocess.run([*launch, *train], cwd=run_dir.parent, env=env, capture_output=True,
                          text=True, timeout=900)
    found = [int(x) for x in re.findall(r"VmPeak:\s+(\d+) kB", done.stderr)]
    assert done.returncode == 0 and len(found) == ranks, done.stderr[-3000:]
    return found


@pytest.mark.slow
@linux_only
def test_a_model_over_one_processs_memory_limit_trains_on_two_fsdp_ranks(tmp_path, cli_env):
    """Full fine-tuning with AdamW of a 57 M parameter decoder (227 MB; parameters, gradients
    and two moments ~0.9 GB in one process, about half of it on each of 2 fsdp ranks, whose
    checkpoints are streamed). Each run's address space at its peak, unsupervised, calibrates a
    limit halfway between the larger rank's and the one process's; under it (RLIMIT_AS, what
    `ulimit -v` sets: MLX's CPU backend enforces no limit of its own) one process runs out of
    memory, which mlxlab-train reports in one line, and 2 ranks finish the same training."""
    env = {**cli_env, "MALLOC_ARENA_MAX": "1"}  # one malloc arena: no 64 MB steps of noise
    args = [*LM, "model.dim=768", "model.num_heads=8", "model.num_layers=8",
            "trainer.max_steps=2", "trainer.eval_every_steps=2"]
    one = vm_peaks_kb(1, [*args, "trainer.batch_size=4"], tmp_path / "one", env)[0]
    two = max(vm_peaks_kb(2, [*args, "trainer.batch_size=2", "trainer.distributed.mode=fsdp"],
                          tmp_path / "two", env))
    report("fsdp rank VmPeak / one process VmPeak", two / one)
    assert one - two > 192 * 1024, (one, two)  # apart by more than the allocator's noise
    limit = (one + two) // 2 * 1024

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    alone = subprocess.run([str(BIN / "mlxlab-train"), *args, "trainer.batch_size=4",
                            "trainer.oom_restarts=0", f"hydra.run.dir={tmp_path / 'alone'}"],
                           cwd=tmp_path, env=env, preexec_fn=limited, capture_output=True,
                           text=True, timeout=900)
    errors = [line for line in alone.stderr.splitlines() if line.startswith("mlxlab: error:")]
    assert alone.returncode == 2 and len(errors) == 1, alone.stderr[-3000:]
    assert "the run ran out of memory (SIGSEGV) at step " in errors[0], errors
    shared = subprocess.run(command(2, [*args, "trainer.batch_size=2",
                                        "trainer.distributed.mode=fsdp"], tmp_path / "shared"),
                            cwd=tmp_path, env=env, preexec_fn=limited, capture_output=True,
                            text=True, timeout=900)
    assert shared.returncode == 0 and "run dir:" in shared.stdout, shared.stderr[-3000:]
    assert "exited with code" not in shared.stderr and committed_steps(tmp_path / "shared") == [2]
