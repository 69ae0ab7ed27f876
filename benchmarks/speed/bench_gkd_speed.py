"""GKD's speed beside GRPO's: tokens/s of an on-policy distillation step (objective=gkd,
lmbda = 1) and of a GRPO step of the same student, rows and completion length, and the
teacher's share of the GKD step, in one process.

The student: a random Llama (scripts/tiny_hf_model.py's no-torch writer, N(0, 0.02) weights, --student-hidden
/ --student-layers) with LoRA rank 8 on the attention projections; the teacher: a wider, deeper
random Llama of the same tokenizer (--teacher-hidden / --teacher-layers). Both objectives sample
`--rows` completions of at most `--tokens` tokens per step at temperature 1 (GRPO: rows / 4
prompts x 4 generations; GKD: `--rows` prompts, each completed by the student), from the
arithmetic prompts (assets/arithmetic), and train them with the loop's compiled step
(training/step.py make_step, AdamW). A step is timed whole: the rollout (sampling with the KV
cache, building the batch) and the compiled update (GKD's includes the teacher's forward pass);
the first step of each (compiling) is left out. The teacher's share: on the last batch, the
compiled update as trained against the same update handed the teacher's log-probs as an input
(alternated, medians); the difference is the teacher's, over the whole GKD step. The two objectives
alternate `--rounds` times: the machine may be shared, compare the ratios within a round.

    .venv/bin/python benchmarks/speed/bench_gkd_speed.py [--steps 6] [--rounds 2] [--tokens 32]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# isort: off
import mlxlab  # noqa: F401  first: the fast BLAS
import mlx.core as mx

# isort: on
import mlx.optimizers as optim

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
from mlxlab import kernels  # noqa: E402
from mlxlab.data.batching import Batching  # noqa: E402
from mlxlab.data.prompts import PromptRows  # noqa: E402
from mlxlab.models.mlx_lm_decoder import MLXLMDecoder  # noqa: E402
from mlxlab.objectives.base import ObjectiveSetup  # noqa: E402
from mlxlab.objectives.rl.grpo import GRPO  # noqa: E402
from mlxlab.objectives.supervised.gkd import GKD  # noqa: E402
from mlxlab.objectives.supervised.gkd_loss import generalized_jsd  # noqa: E402
from mlxlab.runs import load_teachers  # noqa: E402
from mlxlab.runtime import distributed  # noqa: E402
from mlxlab.training.settings import TrainerSettings  # noqa: E402
from mlxlab.training.step import make_step  # noqa: E402
from tiny_hf_model import save_tiny_llama_without_torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: benchmarks.*
from benchmarks.common import add_smoke  # noqa: E402

PROMPTS = REPO / "src" / "mlxlab" / "assets" / "arithmetic" / "train.jsonl"
LORA = {"rank": 8, "alpha": 16.0, "targets": ["query", "key", "value", "out"]}
GROUP = 4


def timed(objective, folder: Path, rows: int, steps: int) -> dict:
    """Seconds per step (rollout, update, whole) and completion tokens per step, the first
    (compiling) step left out; GKD also its teacher's forward seconds on the last batch."""
    data = PromptRows(str(PROMPTS), tokenizer={"path": str(folder / "tokenizer.json")})
    data.setup(None)
    mx.random.seed(0)
    model = MLXLMDecoder(vocab_size=data.vocab_size, pretrained=str(folder), lora=LORA)
    prompts = rows // objective.group if isinstance(objective, GRPO) else rows
    batching = Batching(batch_size=prompts)
    objective.setup(ObjectiveSetup(model=model, data=data, batching=batching,
                                   world=distributed.World()))
    step = make_step(model, optim.AdamW(learning_rate=1e-4), objective.loss, TrainerSettings(),
                     grad_accum=1)
    batches = objective.train_batches(data, batching, 0, model)
    rollout, update, tokens = [], [], []
    batch = None
    for _ in range(steps + 1):
        started = time.perf_counter()
        batch = next(batches)
        mx.eval(batch)
        sampled = time.perf_counter()
        step([batch])
        done = time.perf_counter()
        rollout.append(sampled - started)
        update.append(done - sampled)
        tokens.append(float(batch["loss_mask"].sum()))
    out = {"rollout_s": statistics.median(rollout[1:]), "update_s": statistics.median(update[1:]),
           "tokens": statistics.median(tokens[1:])}
    out["step_s"] = out["rollout_s"] + out["update_s"]
    out["tokens_per_s"] = out["tokens"] / out["step_s"]
    if isinstance(objective, GKD):
        out |= teacher_share(objective, model, batch, out["step_s"])
    return out


def teacher_share(gkd: GKD, model, batch: dict, step_s: float, reps: int = 5) -> dict:
    """The teacher's part of a GKD update: the compiled step on `batch` as trained (the teacher
    inside) against the same step given the teacher's log-probs as an input (the student's
    work alone), alternated `reps` times on one batch; medians."""
    given = {**batch, "teacher_logps": gkd._teacher_logps(batch)}
    mx.eval(given)

    def student_only(model, batch):
        loss, _, tokens = generalized_jsd(model(batch["input_ids"]), batch["teacher_logps"],
                                          batch["loss_mask"], gkd.beta, gkd.temperature)
        return loss, {"ntokens": tokens}

    settings = TrainerSettings()
    steps = {"with": make_step(model, optim.AdamW(learning_rate=1e-4), gkd.loss, settings,
                               grad_accum=1),
             "without": make_step(model, optim.AdamW(learning_rate=1e-4), student_only,
                                  settings, grad_accum=1)}
    times: dict[str, list[float]] = {"with": [], "without": []}
    for k in range(reps + 1):
        for name, step in steps.items():
            started = time.perf_counter()
            step([batch if name == "with" else given])
            if k:  # the first of each compiles
                times[name].append(time.perf_counter() - started)
    with_s, without_s = statistics.median(times["with"]), statistics.median(times["without"])
    return {"update_with_teacher_s": with_s, "update_given_teacher_logps_s": without_s,
            "teacher_s": with_s - without_s, "teacher_share_of_step": (with_s - without_s) / step_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--student-hidden", type=int, default=128)
    p.add_argument("--student-layers", type=int, default=2)
    p.add_argument("--teacher-hidden", type=int, default=256)
    p.add_argument("--teacher-layers", type=int, default=4)
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--work", default=None)
    add_smoke(p)
    a = p.parse_args()
    if a.smoke:  # a 1-layer student and teacher, 4 rows x 4 tokens, one step, one round
        a.student_hidden, a.student_layers, a.teacher_hidden, a.teacher_layers = 32, 1, 32, 1
        a.rows, a.tokens, a.steps, a.rounds = 4, 4, 1, 1
    work = Path(a.work or tempfile.mkdtemp(prefix="bench_gkd_speed_"))
    student = save_tiny_llama_without_torch(work / "student", 0, a.student_hidden,
                                            a.student_layers, std=0.02)
    teacher = save_tiny_llama_without_torch(work / "teacher", 1, a.teacher_hidden,
                                            a.teacher_layers, std=0.02)
    kernels.set_mode("auto")  # as the loop sets them
    kernels.flush_denormals(True)
    results = []
    for r in range(a.rounds):
        load = os.getloadavg()[0]
        gkd = timed(GKD(teachers=[{"run": str(teacher)}], lmbda=1.0, temperature=1.0,
                        max_new_tokens=a.tokens, completion_key="answer", seed=r,
                        load_teachers=load_teachers),
                    student, a.rows, a.steps)
        grpo = timed(GRPO([{"_target_": "mlxlab.objectives.rl.rewards.exact_answer"}],
                          num_generations=GROUP, max_completion_length=a.tokens, seed=r),
                     student, a.rows, a.steps)
        row = {"round": r, "load_1min": round(load, 2), "gkd": gkd, "grpo": grpo,
               "gkd_over_grpo_tokens_per_s": gkd["tokens_per_s"] / grpo["tokens_per_s"]}
        results.append(row)
        print(json.dumps(row, indent=1), flush=True)
    print(json.dumps({"device": str(mx.default_device()), "rows": a.rows, "tokens": a.tokens,
                      "student": [a.student_hidden, a.student_layers],
                      "teacher": [a.teacher_hidden, a.teacher_layers],
                      "gkd_over_grpo": [round(r["gkd_over_grpo_tokens_per_s"], 3)
                                        for r in results],
                      "teacher_share_of_step": [round(r["gkd"]["teacher_share_of_step"], 3)
                                                for r in results]}))


if __name__ == "__main__":
    main()
