"""The default experiment's whole run against a PyTorch twin's: what a new user times.

    python benchmarks/speed/bench_default_run.py [--repeats 3] [--rows readme,bare,twin] [--epochs N]

Rows, each a fresh process timed from outside, in alternating rounds: `readme` (`mlxlab-train`
as README.md runs it: a fresh MLflow store, progress bar on), `bare` (`tracking=none`, no bar),
`openblas` (`bare` with MLXLAB_BLAS=openblas), `bare+K=V` (`bare` with K=V in its environment),
`twin` (torch_bert_run.py: the same BERT in plain PyTorch on the batches mlxlab's data module
makes for all epochs, the same optimizer, schedule, clip and per-epoch evaluation, in a process
without mlxlab or MLX). Per row: wall, training loop (from the log's timestamps), first epoch,
steps, best and last validation accuracy; ratios per round. `--epochs` shortens the mlxlab rows
(the twin left out) to locate a difference between them with less drift. `--bf16`: every row in
bf16 products, the mlxlab rows with `trainer.precision=bf16` (MKL's bf16 GEMM on a CPU with bf16
units), the twin under `torch.autocast("cpu", dtype=torch.bfloat16)`: PyTorch's mixed precision.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: benchmarks.*
import benchmarks.harness as h

HERE = Path(__file__).resolve().parent
BARE = ["tracking=none", "callbacks.progress.enabled=false"]
EVAL_LINE = re.compile(r"^\[([\d-]+ [\d:,]+)\]\[mlxlab\.training\]\[INFO\] - step (\d+)/(\d+) .*"
                       r"val/accuracy ([\d.]+)")
TRAINING_LINE = re.compile(r"^\[([\d-]+ [\d:,]+)\]\[mlxlab\.training\]\[INFO\] - training: ")


def dump(folder: Path, overrides: list[str]) -> None:
    """The default run's batches (all epochs, in the order the run trains them) and settings,
    for the twin. Runs in its own process: mlxlab is imported here only."""
    from omegaconf import OmegaConf

    import mlxlab  # noqa: F401  (the BLAS first)
    from mlxlab.config import compose_config, instantiate

    cfg = compose_config(folder, overrides)
    data = instantiate(cfg.data)
    data.setup(folder)
    batching = instantiate(cfg.trainer).data_batching()  # what the run's loop asks the data for
    epochs = int(cfg.trainer.max_epochs)

    def numpy(batch: dict) -> dict:
        import numpy as np

        return {k: np.array(batch[k]) for k in ("input_ids", "attention_mask", "labels")}

    train = [numpy(b) for e in range(epochs) for b in data.train_batches(batching, e)]
    h.save_batches(folder / "train.npz", train)
    h.save_batches(folder / "val.npz", [numpy(b) for b in data.val_batches(batching)])
    model = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items()
             if k not in ("_target_", "lora", "pretrained")}
    opt, schedule = cfg.optimizer, cfg.trainer.schedule
    (folder / "run.json").write_text(json.dumps({
        "vocab_size": data.vocab_size, "num_labels": data.num_labels, "model": model,
        "epochs": epochs, "learning_rate": opt.learning_rate, "weight_decay": opt.weight_decay,
        "betas": list(opt.betas), "eps": opt.eps, "grad_clip": cfg.trainer.grad_clip,
        "warmup_steps": schedule.warmup_steps, "min_lr_ratio": schedule.min_lr_ratio,
    }))


def stamp(text: str) -> float:
    return time.mktime(time.strptime(text[:19], "%Y-%m-%d %H:%M:%S")) + int(text[20:]) / 1000


def run_mlxlab(extra: list[str], tmp: Path, env: dict[str, str] | None = None) -> dict:
    """`mlxlab-train *extra` in a fresh folder under tmp (environment: `env`, else this
    process's), timed from outside; the loop and first epoch from its log."""
    folder = Path(tempfile.mkdtemp(dir=tmp))  # a fresh ./mlruns and ./outputs, as a new clone
    cmd = [str(Path(sys.executable).with_name("mlxlab-train")), *extra]
    done, _ = h.run_with_peak_rss(cmd, what=cmd[0], cwd=folder, env=env)
    lines = (done.stdout + done.stderr).splitlines()
    evals = [m for m in map(EVAL_LINE.match, lines) if m]
    begin = next(stamp(m.group(1)) for m in map(TRAINING_LINE.match, lines) if m)
    first = stamp(evals[0].group(1)) - begin
    best = re.search(r"validation \(best checkpoint, step \d+\):.*val/accuracy ([\d.]+)",
                     done.stdout)
    steps, loop = int(evals[-1].group(2)), stamp(evals[-1].group(1)) - begin
    return {"wall_s": done.wall_s, "cpu_s": done.cpu_s, "loop_s": loop, "first_epoch_s": first,
            "step_ms": None, "steps": steps, "best_accuracy": float(best.group(1)),
            "last_accuracy": float(evals[-1].group(4))}


def run_twin(data: Path, threads: int, bf16: bool = False) -> dict:
    cmd = [sys.executable, str(HERE / "torch_bert_run.py"), "--data", str(data),
           "--threads", str(threads), *(["--bf16"] if bf16 else [])]
    done, _ = h.run_with_peak_rss(cmd, what=cmd[1], env={**os.environ, "PYTHONPATH": str(HERE)})
    res = json.loads(done.stdout.strip().splitlines()[-1])
    return {"wall_s": done.wall_s, "cpu_s": done.cpu_s, "loop_s": res["loop_s"], "first_epoch_s": None,
            "steps": len(res["step_s"]), "step_ms": 1000 * statistics.median(res["step_s"]),
            "best_accuracy": res["best_accuracy"], "last_accuracy": res["last_accuracy"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    h.add_options(parser, repeats=3, threads=len(os.sched_getaffinity(0)),
                  rows=("readme,bare,twin", "a subset, in this order (also: openblas, bare+K=V)"),
                  epochs=(None, "trainer.max_epochs for the mlxlab rows (the default run's 40 when "
                          "not given; not with the twin)", int))
    parser.add_argument("--bf16", action="store_true", help="bf16 products in every row: "
                        "trainer.precision=bf16 beside the twin under torch.autocast")
    parser.add_argument("--dump", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:  # every row, one round of one epoch (the twin's batches too)
        args.repeats, args.epochs = 1, 1
    extra = [f"trainer.max_epochs={args.epochs}"] if args.epochs else []
    extra += ["trainer.precision=bf16"] if args.bf16 else []
    if args.dump:
        return dump(Path(args.dump), extra)
    names = args.rows.split(",")
    if not {n.split("+")[0] for n in names} <= {"readme", "bare", "openblas", "twin"} or not names:
        parser.error(f"--rows {args.rows}: choose from readme, bare, bare+K=V, openblas, twin")
    if args.epochs and "twin" in names and not args.smoke:
        parser.error("--epochs shortens the mlxlab rows only: leave the twin out (--rows readme,bare)")
    tmp = Path(tempfile.mkdtemp(prefix="bench-default-run-"))
    every = {"readme": lambda: run_mlxlab(extra, tmp), "bare": lambda: run_mlxlab(BARE + extra, tmp),
             "openblas": lambda: run_mlxlab(BARE + extra, tmp, {**os.environ, "MLXLAB_BLAS": "openblas"}),
             "twin": lambda: run_twin(data, args.threads, args.bf16)}
    rows = {name: every.get(name) or partial(run_mlxlab, BARE + extra, tmp, {
        **os.environ, **dict([name[5:].split("=", 1)])}) for name in names}
    data = tmp / "twin-data"
    if "twin" in rows:
        data.mkdir()
        subprocess.run([sys.executable, __file__, "--dump", str(data),
                        *([f"--epochs={args.epochs}"] if args.smoke else [])], check=True,
                       capture_output=True)
    results = interleave(rows, args.repeats)
    h.print_table(shown := table(results))
    ours = "readme" if "readme" in results else "bare" if "bare" in results else None
    ratio = (statistics.median(x["wall_s"] / y["wall_s"] for x, y in zip(results[ours], results["twin"]))
             if ours and "twin" in results else None)
    twin = "the same run as a plain PyTorch script (speed/torch_bert_run.py)"
    # the summary shows each name's newest record with a ratio: rows without the twin have none
    name = ("default-run-bf16" if args.bf16 else "default-run") + ("-vs-pytorch" if ratio else "")
    h.write_record(name + ("-autocast" if args.bf16 and ratio else ""),
                   {**results, "table": shown, "bf16": args.bf16}, question="speed-pytorch",
                   reference=ratio and (f"{twin} under torch.autocast bf16" if args.bf16 else twin),
                   ratio=ratio and round(ratio, 2),
                   summary=ratio and f"wall time of the default experiment, `{ours}` row (lower is better)",
                   smoke=args.smoke)


def interleave(rows: dict[str, Callable[[], dict]], repeats: int) -> dict[str, list[dict]]:
    """Each row's runs over `repeats` rounds, the order reversed every other round (ABBA), so a
    slow spell of a shared machine hits every row alike; prints each run as it ends."""
    results: dict[str, list[dict]] = {name: [] for name in rows}
    for r in range(repeats):
        for name in h.in_round(list(rows), r):
            res = rows[name]()
            results[name].append(res)
            first = "" if res["first_epoch_s"] is None else f"  first epoch {res['first_epoch_s']:5.2f} s"
            print(f"round {r + 1} {name:6s} wall {res['wall_s']:6.1f} s  loop {res['loop_s']:6.1f} s"
                  f"{first}  best {res['best_accuracy']:.4f}  last {res['last_accuracy']:.4f}",
                  flush=True)
    return results


def table(results: dict[str, list[dict]]) -> dict:
    """Each row's medians, then the wall-time ratios of the rows per round."""
    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in results[name])

    rows = []
    for name, runs in results.items():
        first = "-" if runs[0]["first_epoch_s"] is None else f"{med(name, 'first_epoch_s'):.2f}"
        rows.append([name, f"{med(name, 'wall_s'):.1f}", f"{med(name, 'loop_s'):.1f}", first,
                     f"{med(name, 'steps'):.0f}",
                     f"{statistics.median(1000 * r['loop_s'] / r['steps'] for r in runs):.1f}",
                     "/".join(f"{100 * r['best_accuracy']:.1f}" for r in runs),
                     "/".join(f"{100 * r['last_accuracy']:.1f}" for r in runs)])
    for a, b in (("readme", "twin"), ("bare", "twin"), ("readme", "bare"), ("bare", "openblas"),
                 *(("bare", n) for n in results if n.startswith("bare+"))):
        if {a, b} <= set(results):
            per_round = sorted(x["wall_s"] / y["wall_s"] for x, y in zip(results[a], results[b]))
            rows.append([f"{a} / {b}", f"{statistics.median(per_round):.2f}x "
                         f"({per_round[0]:.2f}-{per_round[-1]:.2f})", *[""] * 6])
    return {"head": ["row", "wall s", "training loop s", "first epoch s", "steps", "loop ms / step",
                     "best val acc %", "last val acc %"], "rows": rows}

if __name__ == "__main__":
    main()
