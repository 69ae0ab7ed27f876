"""Out of memory survived (the runs of tests/test_out_of_memory.py, timed, in interleaved pairs):
what a restart costs (a LoRA run under RLIMIT_AS faults at micro-batch 32 and restarts at 16 x 2,
beside 16 from the start), what `micro_batch=auto` picks under a limit between the peaks of
micro-batch 4 and 8, and the parent's own cost (`mlxlab-train` beside `python -m mlxlab.train`).

    python benchmarks/memory/bench_out_of_memory.py --root /tmp/bench_oom [--pairs 2]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))  # benchmarks.*

import test_out_of_memory as t  # noqa: E402  (the tests' data, arguments and limits)
from benchmarks.harness import add_options, cli_root, smoke_dir, write_record  # noqa: E402
from conftest import FAST, PYTHON  # noqa: E402

LINES: list[str] = []  # what the run printed: its figures, for the record


def say(line: str) -> None:
    LINES.append(line)
    print(line, flush=True)


def timed(command: list[str], env: dict, cwd: Path, limit_kb: int | None = None) -> tuple[float, str]:
    started = time.perf_counter()
    if limit_kb is None:
        done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True)
    else:
        done = t.under_address_limit(command[1:], env, cwd, limit_kb, command=command[:1])
    assert done.returncode == 0, done.stderr[-3000:]
    return time.perf_counter() - started, done.stdout + done.stderr


def restart_cost(root: Path, env: dict, pairs: int) -> None:
    files = t.long_rows_data(root, seed=42)
    common = t.finetune_args(files, root, f"sqlite:///{root}/mlflow.db", "seed=42",
                             "trainer.max_steps=5", "trainer.eval_every_steps=5")
    fits = t.vm_peak_kb([*common, "trainer.micro_batch=16", f"hydra.run.dir={root / 'cal'}"],
                        env, root)
    limit_kb = fits + 32 * 1024
    say(f"restart: VmPeak at micro-batch 16 {fits / 1024:.0f} MB; limit {limit_kb / 1024:.0f} MB")
    for i in range(pairs):
        for micro in (32, 16):
            shutil.rmtree(root / "r", ignore_errors=True)
            seconds, err = timed([t.MLXLAB_TRAIN, *common, f"trainer.micro_batch={micro}",
                                  f"hydra.run.dir={root / 'r'}"], env, root, limit_kb)
            said = [line for line in err.splitlines() if line.startswith("mlxlab: out of memory")]
            say(f"  pair {i + 1}: micro-batch {micro}: {seconds:.1f} s"
                  + (f"; {said[0]}" if said else "; no restart"))


def auto_choice(root: Path, env: dict) -> None:
    files = t.long_rows_data(root / "auto", seed=42, long_step=None)
    base = [a for a in t.finetune_args(files, root, "x") if not a.startswith("tracking.")]
    base += ["tracking=none", "trainer.batch_size=16", "trainer.max_steps=1",
             "trainer.eval_every_steps=1"]
    peaks = {}
    probe = ("import sys, mlx.core as mx\nsys.argv=['mlxlab.train', *sys.argv[1:]]\n"
             "from mlxlab.train import main\ntry:\n    main(supervised=False)\nfinally:\n"
             "    print('PEAK', mx.get_peak_memory(), file=sys.stderr)\n")
    for micro in (4, 8):
        done = subprocess.run([PYTHON, "-c", probe, *base, f"trainer.micro_batch={micro}",
                               f"hydra.run.dir={root / f'a{micro}'}"], env=env, cwd=root,
                              capture_output=True, text=True)
        peaks[micro] = int(done.stderr.split("PEAK")[-1].split()[0])
    limit_mb = (peaks[4] + peaks[8]) / 2 / 1e6
    seconds, err = timed([t.MLXLAB_TRAIN, *base, "trainer.micro_batch=auto",
                          f"trainer.memory_limit={limit_mb:.3f}MB",
                          f"hydra.run.dir={root / 'auto_run'}"], env, root)
    line = next(x for x in err.splitlines() if "trainer.micro_batch=auto:" in x)
    say(f"auto: MLX's peak of a real step at 4 rows {peaks[4] / 1e6:.1f} MB, at 8 rows "
          f"{peaks[8] / 1e6:.1f} MB; limit {limit_mb:.1f} MB;"
          f" {re.sub(r'^.*trainer.micro_batch=auto: ', '', line)}; run {seconds:.1f} s")


def parent_cost(root: Path, env: dict, pairs: int) -> None:
    run = [*FAST, "tracking=none", f"paths.root_dir={root}"]
    for i in range(pairs):
        out = []
        for name, command in (("mlxlab-train", [t.MLXLAB_TRAIN]),
                              ("python -m mlxlab.train", [PYTHON, "-m", "mlxlab.train"])):
            seconds, _ = timed([*command, *run, f"hydra.run.dir={root / 'p'}"], env, root)
            out.append(f"{name} {seconds:.2f} s")
        say(f"parent: pair {i + 1}: " + ", ".join(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_options(parser, root=Path("/tmp/bench_oom"), pairs=2,
                skip_restart=(False, "parts 2 and 3 only"))
    args = parser.parse_args()
    if args.smoke:  # auto's choice and one pair of the parent's cost (the restart is
        # tests/test_out_of_memory.py's, -m slow)
        args.root, args.pairs, args.skip_restart = smoke_dir("out_of_memory"), 0, True
    shutil.rmtree(args.root, ignore_errors=True)
    env, _ = cli_root(args.root)
    env["MALLOC_ARENA_MAX"] = "1"
    if not args.skip_restart:
        restart_cost(args.root, env, args.pairs)
    auto_choice(args.root, env)
    parent_cost(args.root, env, args.pairs + 1)
    write_record("out-of-memory", {"lines": LINES}, question="memory", smoke=args.smoke)


if __name__ == "__main__":
    main()
