"""Does on-policy distillation (GKD, lmbda = 1) teach a student more than off-policy (lmbda = 0)
from the same teacher, proven over seeds? (objective=gkd) With --grpo: does GRPO make a model
better than its base, proven over seeds? (experiment=grpo_copy)

The copy task ("4719=" -> "[4719]", assets/copy_format/). A teacher decoder trained until it
solves the held-out prompts (>= 90 %), a smaller student that copies but does not write the
format, then `mlxlab-train -m experiment=gkd_arithmetic objective.lmbda=0,1 replicates=6` and
`mlxlab runs compare latest:g1 latest:g2` (held-out exact match, paired over seeds and prompts).

    python benchmarks/quality/bench_gkd_learning.py [--out /tmp/bench_gkd] [--replicates 6]

--grpo: the base, a tiny decoder SFT'd so it writes the format for some prompts only (held-out
accuracy between 10 % and 70 %, checked), exported; then `mlxlab-train -m experiment=grpo_copy
replicates=3` with LoRA, and `mlxlab runs compare` of each seed against the base, with a paired
bootstrap interval of GRPO - base over the 200 held-out prompts.

    python benchmarks/quality/bench_gkd_learning.py --grpo [--out /tmp/bench_grpo] [--steps 60]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: benchmarks.*
import benchmarks.harness as h
from benchmarks.harness import mlxlab_cli as mlxlab
from benchmarks.harness import run_logged as run
from benchmarks.harness import train_cli as train

ASSETS = h.REPO / "src" / "mlxlab" / "assets" / "copy_format"


def fresh_copies(n: int, formatted: float = 0.0, seed: int = 1) -> list[dict]:
    """`n` copies of fresh four-digit strings (none of the task's prompts), a `formatted` share
    of them written in the answer format."""
    taken = {json.loads(x)["prompt"][:-1] for f in ("train", "heldout")
             for x in (ASSETS / f"{f}.jsonl").read_text().splitlines()}
    rng = random.Random(seed)
    rows = []
    while len(rows) < n:
        s = "".join(rng.choice("0123456789") for _ in range(4))
        if s not in taken:
            taken.add(s)
            rows.append({"prompt": f"{s}=", "completion": f"[{s}]" if formatted and rng.random() < formatted else s})
    return rows


def export(run_dir: Path, folder: Path, env: dict, out: Path) -> float:
    """`mlxlab export RUN --format hf` into `folder`: the wall seconds."""
    return run(mlxlab("export", str(run_dir), "--format", "hf", "--out", str(folder),
                      "--overwrite"), env, out / f"{folder.name}_export.log")[1]


def scratch_model(dim: int, layers: int) -> list[str]:
    return ["model=transformer", f"model.dim={dim}", f"model.num_layers={layers}",
            "model.num_heads=4", "model.max_seq_len=32"]


def held_out_score(run_dir: Path, env: dict, out: Path, name: str, uri: str
                   ) -> tuple[float, str | None, float]:
    """(exact match on the held-out prompts, the eval run's id, wall seconds)."""
    text, wall = run(mlxlab("eval", str(run_dir), str(ASSETS / "heldout.jsonl"), "--tasks",
                            "--max-new-tokens", "8", "--uri", uri, "--experiment", name,
                            "--json"), env, out / f"{name}.log")
    report, _ = json.JSONDecoder().raw_decode(text[text.index("{"):])
    return (report["tasks"]["heldout"]["metrics"]["exact_match"]["value"], report.get("run_id"),
            wall)


def sft(name: str, rows: Path, model: list[str], steps: int, env: dict, out: Path,
        *extra: str) -> tuple[Path, float]:
    text, wall = run(train(
        f"task_name={name}", *model, "data=completions", f"data.train_file={rows}",
        "data.val_fraction=0.05", "data.max_length=16", "trainer.batch_size=32",
        "trainer.max_epochs=null", f"trainer.max_steps={steps}",
        f"trainer.eval_every_steps={steps}", "optimizer.learning_rate=3e-3",
        "callbacks.progress.enabled=false", "optimized_metric=val/loss", "optimized_mode=min",
        "seed=0", *extra), env, out / f"{name}.log")
    return Path(h.line_value(text, "run dir:")), wall


def teacher_and_student(a, env: dict, out: Path, uri: str, times: dict[str, float]
                        ) -> tuple[Path, float, Path, float]:
    """Stages 1 and 2: (the teacher's folder, its held-out exact match, the student's, its)."""
    task_rows, student_rows = out / "teacher_train.jsonl", out / "student_train.jsonl"
    task_rows.write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r["answer"]}) + "\n"
                                 for r in map(json.loads, (ASSETS / "train.jsonl").read_text().splitlines())))
    student_rows.write_text("".join(json.dumps(r) + "\n" for r in fresh_copies(2000)))

    def taught(role: str, rows: Path, dim: int, steps: int, extra: str) -> tuple[Path, float, Path]:
        """(its run, its held-out exact match, its export): trained from scratch, scored, exported."""
        run_dir, times[f"{role}_sft"] = sft(f"gkd_{role}", rows, scratch_model(dim, 2), steps, env,
                                            out, extra)
        acc, _, times[f"{role}_eval"] = held_out_score(run_dir, env, out, f"gkd_{role}_eval", uri)
        print(f"{role}: held-out exact match {acc:.3f}", flush=True)
        if role == "teacher" and acc < 0.9 and not a.smoke:
            sys.exit(f"the teacher scores {acc:.3f} < 0.9: raise --teacher-steps")
        times[f"{role}_export"] = export(run_dir, out / f"{role}_model", env, out)
        return run_dir, acc, out / f"{role}_model"

    # 1. the teacher: solves the task (258 tokens = 256 bytes + 2 specials)
    teacher_dir, teacher_acc, teacher = taught("teacher", task_rows, 64, a.teacher_steps,
                                               "+data.tokenizer.vocab_size=258")
    # 2. the student: smaller, on the teacher's tokenizer, copies without the format
    _, student_acc, student = taught("student", student_rows, 32, a.student_steps,
                                     f"data.tokenizer.path={teacher_dir / 'tokenizer.json'}")
    return teacher, teacher_acc, student, student_acc


def grpo_vs_base(a, out: Path) -> None:
    """--grpo: the base SFT'd and scored, GRPO over seeds from it, each seed compared with it."""
    env, uri = h.cli_root(out)
    rows = h.write_jsonl(out / "sft_train.jsonl", fresh_copies(2000, formatted=0.5))
    times: dict[str, float] = {}
    # 1. the base: a short SFT from scratch, one token per character (258 = 256 bytes + 2)
    sft_dir, times["sft"] = sft("grpo_copy_sft", rows, scratch_model(64, 2), a.sft_steps, env, out,
                                "+data.tokenizer.vocab_size=258")
    base = out / "base_model"
    times["export"] = export(sft_dir, base, env, out)
    # 2. the base scored on the held-out prompts: the base run of the comparison
    base_acc, base_run, times["base_eval"] = held_out_score(sft_dir, env, out, "grpo_copy_base", uri)
    print(f"base: held-out exact match {base_acc:.3f} (run {base_run})", flush=True)
    if not a.smoke and not 0.10 <= base_acc <= 0.70:
        sys.exit(f"the base scores {base_acc:.3f}: not between 10 % and 70 %; change --sft-steps")
    # 3. GRPO over seeds, then each compared with the base
    _, times["grpo_sweep"] = run(train(
        "--multirun", "experiment=grpo_copy", f"model.pretrained={base}",
        f"replicates={a.replicates}", f"trainer.max_steps={a.steps}",
        f"eval.tasks=[{ASSETS / 'heldout.jsonl'}]", "eval.max_new_tokens=8",
        "callbacks.progress.enabled=false", "hydra/launcher=basic"), env, out / "grpo.log")
    compare, times["compare"] = run(mlxlab("runs", "compare", base_run, "latest", "--uri", uri,
                                           "--json"), env, out / "compare.log")
    h.write_results(out, {"base_exact_match": base_acc, "base_run": base_run}, compare, compare,
                    times, record="grpo-learning", smoke=a.smoke)


def main() -> None:
    parser = argparse.ArgumentParser()
    h.add_options(parser, out=(None, "default /tmp/bench_gkd (--grpo: /tmp/bench_grpo)"),
                  teacher_steps=800, student_steps=300,
                  steps=(None, "default 300 (--grpo: 60)", int),
                  replicates=(None, "default 6 (--grpo: 3)", int), learning_rate=1e-3,
                  grpo=(False, "GRPO against its base instead (the steps of its base's SFT: "
                        "--sft-steps)"), sft_steps=200)
    a = parser.parse_args()
    if a.grpo:
        if a.smoke:  # every stage, a few steps each, two GRPO seeds; the base's range not checked
            a.out, a.sft_steps, a.steps, a.replicates = str(h.smoke_dir("grpo_learning")), 4, 2, 2
        a.steps, a.replicates = a.steps or 60, a.replicates or 3
        return grpo_vs_base(a, Path(a.out or "/tmp/bench_grpo"))
    a.steps, a.replicates = a.steps or 300, a.replicates or 6
    if a.smoke:  # tiny step counts: the pipeline only
        a.teacher_steps, a.student_steps, a.steps, a.replicates = 20, 5, 4, 2
        a.out = a.out or str(h.smoke_dir("gkd_learning"))
    out = Path(a.out or "/tmp/bench_gkd")
    env, uri = h.cli_root(out)
    times: dict[str, float] = {}
    teacher, teacher_acc, student, student_acc = teacher_and_student(a, env, out, uri, times)

    # 3. off-policy (lmbda 0) and on-policy (lmbda 1), the same seeds
    _, times["gkd_sweep"] = run(train(
        "--multirun", "experiment=gkd_arithmetic", "task_name=gkd_copy",
        f"data.train_file={ASSETS / 'train.jsonl'}", f"data.val_file={ASSETS / 'heldout.jsonl'}",
        f"model.pretrained={student}", f"objective.teachers=[{{run: {teacher}}}]",
        "objective.lmbda=0,1", "objective.beta=0.5", "objective.max_new_tokens=8",
        "model.lora.rank=0", f"optimizer.learning_rate={a.learning_rate}", "trainer.batch_size=16",
        f"replicates={a.replicates}", f"trainer.max_steps={a.steps}",
        f"trainer.eval_every_steps={a.steps}", f"eval.tasks=[{ASSETS / 'heldout.jsonl'}]",
        "eval.max_new_tokens=8", "callbacks.progress.enabled=false", "hydra/launcher=basic"),
        env, out / "gkd.log")

    # 4. the comparison: g1 = lmbda 0 (off-policy), g2 = lmbda 1 (on-policy)
    compare, times["compare"] = run(mlxlab("runs", "compare", "latest:g1", "latest:g2",
                                           "--metric", "eval/heldout/exact_match", "--uri", uri,
                                           "--json"), env, out / "compare.log")
    table, _ = run(mlxlab("runs", "compare", "latest:g1", "latest:g2", "--metric",
                          "eval/heldout/exact_match", "--uri", uri), env, out / "compare.txt")
    h.write_results(out, {"teacher_exact_match": teacher_acc, "student_exact_match": student_acc,
                          "steps": a.steps, "replicates": a.replicates,
                          "load_average": os.getloadavg()}, compare, table, times,
                    record="gkd-learning", smoke=a.smoke)


if __name__ == "__main__":
    main()
