"""Does distillation help? Teacher -> distilled student vs the same student from scratch.

For each task and seed: a teacher, then the student twice with the same config, steps, split and
tokenizer: `objective=distill` and `objective=supervised`; mean +- std over seeds of the best and
final validation metric. `--loss` / `--kl-scale` compare loss forms from the same teacher;
`--rounds` compares rounds of distillation (chained, ensemble). Every run shares one validation
split the teacher never trained on (a split that follows `seed` would leak it).

    OPENBLAS_NUM_THREADS=1 python benchmarks/quality/bench_distill.py [--tasks titanic tinystories]
        [--seeds 0 1 2] [--root /tmp/bench_distill] [--alpha 0.5] [--temperature 2.0] [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

# isort: off
import mlxlab  # noqa: F401  first: loads the fast BLAS before anything imports mlx.core

# isort: on
from omegaconf import DictConfig

from mlxlab.checkpoint import CheckpointState
from mlxlab.config import compose_config
from mlxlab.train import train

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: benchmarks.*
from benchmarks.harness import add_smoke, smoke_dir, write_record  # noqa: E402

COMMON = ["tracking=none", "callbacks.progress.enabled=false", "checkpoint.save_every_minutes=null",
          "checkpoint.keep_last_n=1"]

# Titanic: the default BERT (hidden 128, 2 layers) teaches the distill_titanic cnn_hybrid student
# (hidden 32, embeddings-only convolutions). 10 epochs x 23 steps, evaluated every epoch; no early
# stopping so both students take exactly the same steps. The teacher runs at lr 3e-4: at the
# default 1e-3 the post-norm BERT collapses to the majority class after ~4 epochs (val acc 0.618).
# One validation split (data.seed=42) for every run; `seed` varies init, dropout and shuffling.
# Learning rates and BERT's norm position are pinned to the values the recorded numbers
# (/work/notes/bench_distill.md) used, so later changes to the defaults do not move them silently.
TITANIC = {
    "metric": "val/accuracy",
    "teacher": ["experiment=titanic_bert", "callbacks.early_stopping.patience=0", "data.seed=42",
                "optimizer.learning_rate=3e-4", "trainer.max_epochs=10", "model.norm_position=post"],
    "student": ["experiment=distill_titanic", "callbacks.early_stopping.patience=0", "data.seed=42",
                "trainer.max_epochs=10", "optimizer.learning_rate=1e-3"],
}

# The same student, taught by the default BERT as `mlxlab-train` trains it today
# (corrected Adam, pre-LN, the titanic_bert preset's own epochs, lr and early stopping), with the
# split pinned (data.seed=42) so the teacher never sees the students' validation rows.
TITANIC_DEFAULT_TEACHER = {
    "metric": "val/accuracy",
    "teacher": ["experiment=titanic_bert", "data.seed=42"],
    "student": TITANIC["student"],
}

# The same data with the roles the other way round: a cnn_hybrid teacher (hidden 64, no encoder),
# which beats the BERT on this data, teaches a one-layer BERT of hidden size 32.
TITANIC_CNN_TO_BERT = {
    "metric": "val/accuracy",
    "teacher": ["model=cnn_hybrid", "model.hidden_size=64", "model.use_encoder=false",
                "model.cnn_filters=64", "callbacks.early_stopping.patience=0", "data.seed=42",
                "trainer.max_epochs=10", "optimizer.learning_rate=1e-3"],
    "student": ["objective=distill", "model.hidden_size=32", "model.num_layers=1", "model.num_heads=2",
                "model.norm_position=post", "callbacks.early_stopping.patience=0", "data.seed=42",
                "trainer.max_epochs=10", "optimizer.learning_rate=1e-3"],
}

# TinyStories sample: a shrunken transformer_tiny teaches a shrunken transformer_nano, 200 steps
# each; the vocabulary is capped at 2048 and the sequences at 64 tokens to fit a 2-core budget.
# The validation set is the first 200 paragraphs whatever the seed; `seed` varies init and shuffling.
TS_SHAPE = ["model.max_seq_len=64", "data.packing.seq_len=64", "data.tokenizer.max_vocab=2048",
            "trainer.batch_size=16", "trainer.eval_every_steps=100", "trainer.schedule.warmup_steps=20",
            "trainer.max_steps=200"]
TINYSTORIES = {
    "metric": "val/loss",
    "teacher": ["experiment=tinystories_tiny", *TS_SHAPE, "model.dim=192", "model.num_layers=4",
                "model.num_heads=6", "optimizer.learning_rate=2e-3"],
    "student": ["experiment=distill_tinystories", *TS_SHAPE, "model.dim=64", "model.num_layers=2",
                "model.num_heads=2", "optimizer.learning_rate=3e-3"],
}

TASKS = {"titanic": TITANIC, "titanic_default_teacher": TITANIC_DEFAULT_TEACHER,
         "titanic_cnn_to_bert": TITANIC_CNN_TO_BERT,
         "tinystories": TINYSTORIES}

QUICK = {  # a wiring check in seconds, not a measurement
    "titanic": ["trainer.max_epochs=2"],
    "titanic_default_teacher": ["trainer.max_epochs=2"],
    "titanic_cnn_to_bert": ["trainer.max_epochs=2"],
    "tinystories": ["trainer.max_steps=20", "trainer.eval_every_steps=10"],
}


def compose_cfg(root: Path, out: Path, overrides: list[str]) -> DictConfig:
    return compose_config(root, overrides, out)


def final_metrics(run_dir: Path) -> dict[str, float]:
    """The validation metrics of the last evaluation (train() returns the best ones)."""
    steps = sorted((run_dir / "checkpoints").glob("step_*"))
    history = CheckpointState.read(steps[-1]).history
    return {k: v[-1][1] for k, v in history.items() if k.startswith("val/")}


def scratch_of(student: list[str]) -> list[str]:
    """The same student without distillation: objective=supervised, and the keys a distill_*
    experiment sets on its objective (alpha, temperature) deleted: the plain objective takes
    neither."""
    own = any(o.startswith("experiment=distill_") for o in student)
    return [*student, "objective=supervised",
            *(["~objective.alpha", "~objective.temperature"] if own else [])]


def run(root: Path, out: Path, overrides: list[str]) -> dict:
    start = time.perf_counter()
    best = train(compose_cfg(root, out, overrides))
    return {"best": best, "final": final_metrics(out), "seconds": time.perf_counter() - start}


def loss_forms(args) -> list[tuple[str, str]]:
    """(objective.loss, objective.kl_scale) pairs to train; mse once (no KL)."""
    forms = [(loss, scale) for loss in args.loss for scale in args.kl_scale]
    return list(dict.fromkeys((loss, "t2" if loss == "mse" else scale) for loss, scale in forms))


def bench_task(name: str, spec: dict, seeds: list[int], root: Path, args) -> list[dict]:
    rows = []
    extra = QUICK[name] if args.quick else []
    knobs = [f"objective.alpha={args.alpha}", f"objective.temperature={args.temperature}"]
    forms = loss_forms(args)
    teacher_dir = None
    for seed in seeds:
        base = root / name / f"seed{seed}"
        if teacher_dir is None or not args.shared_teacher:
            teacher_dir = base / "teacher"
            teacher = run(root, teacher_dir, [*COMMON, *spec["teacher"], *extra, f"seed={seed}"])
        rows.append({"task": name, "seed": seed, "who": "teacher", **teacher})
        tokenizer = teacher_dir / "tokenizer.json"
        student = [*COMMON, *spec["student"], *extra, f"seed={seed}",
                   f"data.tokenizer.path={tokenizer}"]
        for loss, scale in forms:
            who = "distilled" if len(forms) == 1 else "mse" if loss == "mse" else f"{loss} {scale}"
            distilled = run(root, base / who.replace(" ", "_"), [
                *student, *knobs, f"objective.teachers=[{{run: '{teacher_dir}'}}]",
                f"objective.loss={loss}", f"objective.kl_scale={scale}"])
            rows.append({"task": name, "seed": seed, "who": who, **distilled})
        scratch = run(root, base / "scratch", scratch_of(student))
        rows.append({"task": name, "seed": seed, "who": "scratch", **scratch})
        print_rows(rows[-(len(forms) + 2):], name, seed, spec["metric"], width=13)
    return rows


def bench_rounds(name: str, spec: dict, seeds: list[int], root: Path, args) -> list[dict]:
    """Per seed: rounds=2 (chain) -> round 1 and round 2 rows, then the ensemble round 2 (the
    teacher and round 1's student, learned weights) and the scratch student."""
    rows = []
    extra = QUICK[name] if args.quick else []
    knobs = [f"objective.alpha={args.alpha}", f"objective.temperature={args.temperature}"]
    teacher_dir = root / name / "teacher"
    teacher = run(root, teacher_dir, [*COMMON, *spec["teacher"], *extra, f"seed={seeds[0]}"])
    rows.append({"task": name, "seed": seeds[0], "who": "teacher", **teacher})
    for seed in seeds:
        base = root / name / f"rounds_seed{seed}"
        student = [*COMMON, *spec["student"], *extra, f"seed={seed}",
                   f"data.tokenizer.path={teacher_dir / 'tokenizer.json'}", *knobs]
        start = time.perf_counter()
        train(compose_cfg(root, base / "chain", [
            *student, f"objective.teachers=[{{run: '{teacher_dir}'}}]",
            "objective.rounds=2", "objective.round_teachers=chain"]))
        seconds = (time.perf_counter() - start) / 2
        manifest = json.loads((base / "chain" / "distill_rounds.json").read_text())
        for entry in manifest["rounds"]:
            rows.append({"task": name, "seed": seed, "who": f"round {entry['round']}",
                         "best": entry["metrics"], "final": final_metrics(Path(entry["run_dir"])),
                         "seconds": seconds})
        round1 = manifest["rounds"][0]["run_dir"]
        ensemble = run(root, base / "ensemble", [
            *student, "objective.teacher_weights=learned",
            f"objective.teachers=[{{run: '{teacher_dir}'}},{{run: '{round1}'}}]"])
        rows.append({"task": name, "seed": seed, "who": "round 2 ens", **ensemble})
        scratch = run(root, base / "scratch", scratch_of(student))
        rows.append({"task": name, "seed": seed, "who": "scratch", **scratch})
        print_rows(rows[-4:], name, seed, spec["metric"], width=11)
    return rows


def print_rows(rows: list[dict], name: str, seed: int, metric: str, width: int) -> None:
    for row in rows:
        print(f"[{name} seed {seed}] {row['who']:<{width}} best {metric}={row['best'][metric]:.4f} "
              f"final {metric}={row['final'][metric]:.4f} ({row['seconds']:.0f}s)", flush=True)


def mean_std(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {spread:.4f}"


def table(rows: list[dict]) -> str:
    lines = ["| task | model | metric | best (mean ± std) | final (mean ± std) | per seed (best) |",
             "|---|---|---|---|---|---|"]
    for task in dict.fromkeys(r["task"] for r in rows):
        metrics = ["val/accuracy", "val/loss"] if task.startswith("titanic") else ["val/loss"]
        for who in dict.fromkeys(r["who"] for r in rows if r["task"] == task):
            group = [r for r in rows if r["task"] == task and r["who"] == who]
            for m in metrics:
                best = [r["best"][m] for r in group]
                final = [r["final"][m] for r in group]
                seeds = ", ".join(f"{v:.4f}" for v in best)
                lines.append(f"| {task} | {who} | {m} | {mean_std(best)} | {mean_std(final)} | "
                             f"{seeds} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["titanic", "tinystories"], choices=list(TASKS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--root", type=Path, default=Path("/tmp/bench_distill"))
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--loss", nargs="+", default=["kl"], choices=["kl", "reverse_kl", "mse"],
                        help="objective.loss; several: one student per form")
    parser.add_argument("--kl-scale", nargs="+", default=["t2"], choices=["t2", "none"],
                        help="objective.kl_scale; several: one student per form")
    parser.add_argument("--shared-teacher", action=argparse.BooleanOptionalAction, default=True,
                        help="one teacher (first seed) for every student seed; the validation "
                        "split is the same for all seeds, so the teacher never saw it")
    parser.add_argument("--quick", action="store_true", help="a few steps: checks the wiring only")
    parser.add_argument("--json", type=Path, help="also write every row to this file")
    parser.add_argument("--rounds", action="store_true",
                        help="round 1 vs round 2 (chain, ensemble) of distillation vs scratch")
    add_smoke(parser)
    args = parser.parse_args()
    if args.smoke:  # --quick on Titanic, one seed
        args.tasks, args.seeds, args.quick, args.root = ["titanic"], [0], True, smoke_dir("distill")
    rows = []
    bench = bench_rounds if args.rounds else bench_task
    for name in args.tasks:
        rows += bench(name, TASKS[name], args.seeds, args.root.resolve(), args)
    print(table(rows))
    write_record("distill", {"rows": rows}, question="quality", smoke=args.smoke)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    sys.exit(main())
