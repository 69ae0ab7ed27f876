"""Throughput and peak memory of trainer=optimized vs trainer=simple on the same model and data.

    OPENBLAS_NUM_THREADS=1 python benchmarks/speed/bench_trainers.py [--cases titanic_bert tinystories_nano]
        [--trainers simple optimized] [--warmup 30] [--steps 30] [--rounds 3] [--root DIR]
        [-- extra Hydra overrides for every case]

For each case (a model + data pair) each trainer config builds its own model from the same seed
and runs its real step (the objective's loss, step.make_step, the data module's own batches, the
optimized trainer's accumulation, dynamic batching and memory budget) for --warmup untimed
optimizer steps (compiling every shape), then --steps timed ones. The trainers take turns for
--rounds rounds so load drift on a shared machine hits all of them; each number is the median
over rounds, and every row has its ratio to the first trainer measured in the same run.

tokens/s counts real tokens (attention_mask / loss_mask), so padding saved by dynamic batching
shows up as speed; padded tokens/s is printed too. Peak memory is MLX's peak of active memory
during the timed steps (0 where the backend does not count it).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

# isort: off
import mlxlab  # noqa: F401  first: loads the fast BLAS before anything imports mlx.core
import mlx.core as mx

# isort: on
from omegaconf import DictConfig

from mlxlab.config import compose_config, instantiate
from mlxlab.launch.wiring import seed_everything
from mlxlab.objectives.base import ObjectiveSetup
from mlxlab.runtime import device
from mlxlab.runtime.distributed import World
from mlxlab.training.optim import build_optimizer
from mlxlab.training.step import make_step, with_precision

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: benchmarks.*
from benchmarks.common import add_smoke, smoke_dir  # noqa: E402

CASES = {
    "titanic_bert": ["experiment=titanic_bert"],
    "tinystories_nano": ["experiment=tinystories_nano"],
}
# Knobs the comparison must not vary: quantization and memory logging happen outside the step.
COMMON = ["tracking=none", "callbacks.progress.enabled=false", "trainer.quantize_bits=null",
          "callbacks.memory.every=0"]


def compose_cfg(root: Path, overrides: list[str]) -> DictConfig:
    return compose_config(root, overrides, root / "outputs" / "bench_trainers")


def real_tokens(batch: dict) -> int:
    mask = batch.get("attention_mask", batch.get("loss_mask"))
    return int(mask.sum().item()) if mask is not None else int(batch["input_ids"].size)


class Runner:
    """One trainer config on one case: a model, its optimizer and step, and an endless batch feed."""

    def __init__(self, root: Path, overrides: list[str], data=None):
        cfg = compose_cfg(root, overrides)
        self.cfg = cfg
        if data is None:  # the cases' trainers share one data module (same tokenizer and split)
            data = instantiate(cfg.data)
            data.setup(Path(cfg.paths.output_dir))
        self.data = data
        seed_everything(cfg.seed)
        self.model = instantiate(cfg.model, vocab_size=data.vocab_size, num_labels=data.num_labels)
        settings = instantiate(cfg.trainer)
        batching = settings.data_batching()
        objective = instantiate(cfg.objective)
        objective.setup(ObjectiveSetup(model=self.model, data=data, batching=batching,
                                       world=World()))
        loss_fn = with_precision(objective.loss, settings.precision)
        self.batching, self.grad_accum = batching, settings.grad_accum
        total = 10**6
        optimizer = build_optimizer(instantiate(cfg.optimizer), settings.schedule, total)
        optimizer.init(self.model.trainable_parameters())
        self.step_fn = make_step(self.model, optimizer, loss_fn, settings,
                                 grad_accum=self.grad_accum)
        self.model.train()
        self.epoch, self.batches = 0, iter(())

    def next_update(self) -> list[dict]:
        pending = []
        while len(pending) < self.grad_accum:
            batch = next(self.batches, None)
            if batch is None:
                self.epoch += 1
                self.batches = iter(self.data.train_batches(self.batching, self.epoch))
                continue
            pending.append(batch)
        return pending

    def run(self, steps: int) -> dict[str, float]:
        """Time `steps` optimizer updates; returns tokens/s, padded tokens/s, peak MB, loss."""
        updates = [self.next_update() for _ in range(steps)]  # batches ready: time the step only
        tokens = sum(real_tokens(b) for u in updates for b in u)
        padded = sum(int(b["input_ids"].size) for u in updates for b in u)
        examples = sum(int(b["input_ids"].shape[0]) for u in updates for b in u)
        device.reset_peak_memory()
        start = time.perf_counter()
        for update in updates:
            loss, _, _ = self.step_fn(update)
        seconds = time.perf_counter() - start
        return {"tokens_per_s": tokens / seconds, "padded_per_s": padded / seconds,
                "examples_per_update": examples / steps, "peak_mb": device.peak_memory_mb(),
                "loss": loss.item()}


def bench_case(name: str, trainers: list[str], args) -> list[dict]:
    runners: dict[str, Runner] = {}
    data = None
    for trainer in trainers:
        runner = Runner(args.root, [*COMMON, *CASES[name], f"trainer={trainer}", *args.overrides],
                        data)
        data = runner.data
        runner.run(args.warmup)
        runners[trainer] = runner
    samples: dict[str, list[dict]] = {t: [] for t in trainers}
    for _ in range(args.rounds):
        for trainer, runner in runners.items():
            samples[trainer].append(runner.run(args.steps))
    rows = []
    for trainer, runs in samples.items():
        t = runners[trainer]
        row = {"case": name, "trainer": trainer, "grad_accum": t.grad_accum,
               "batch_size": t.batching.batch_size, "dynamic": t.batching.dynamic}
        for key in runs[0]:
            row[key] = statistics.median(r[key] for r in runs)
        rows.append(row)
    for row in rows:
        row["speed_ratio"] = row["tokens_per_s"] / rows[0]["tokens_per_s"]
        row["memory_ratio"] = row["peak_mb"] / rows[0]["peak_mb"] if rows[0]["peak_mb"] else 0.0
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| case | trainer | accum x batch (dynamic) | examples/update | tokens/s | "
             "padded tokens/s | x speed | peak MB | x memory |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['trainer']} | {r['grad_accum']} x {r['batch_size']} "
            f"({'yes' if r['dynamic'] else 'no'}) | {r['examples_per_update']:.1f} | "
            f"{r['tokens_per_s']:.0f} | {r['padded_per_s']:.0f} | {r['speed_ratio']:.2f} | "
            f"{r['peak_mb']:.1f} | {r['memory_ratio']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--trainers", nargs="+", default=["simple", "optimized"])
    parser.add_argument("--warmup", type=int, default=30,
                        help="untimed optimizer steps first: enough to compile every batch shape")
    parser.add_argument("--steps", type=int, default=30, help="timed optimizer steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--root", type=Path, default=Path("/tmp/bench_trainers"))
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every case")
    add_smoke(parser)
    args = parser.parse_args()
    if args.smoke:  # every case and trainer, 1 + 2 steps, one round
        args.warmup, args.steps, args.rounds, args.root = 1, 2, 1, smoke_dir("trainers")
    args.root = args.root.resolve()
    print(f"mlx {mx.__version__}, backend {device.backend()}")
    rows = []
    for name in args.cases:
        rows += bench_case(name, args.trainers, args)
    print(table(rows))


if __name__ == "__main__":
    sys.exit(main())
