"""One decoder for the presets? The trainer's compiled step on mlxlab's own Transformer against
the same-shaped mlx-lm llama, in one process (issue 54, item 4).

    python benchmarks/speed/bench_preset_decoder.py [--preset nano|small] [--steps 5] [--rounds 6]

The preset's shape (conf/model/transformer_<preset>.yaml: SwiGLU, RoPE, RMSNorm, tied
embeddings; `experiment=tinystories_nano`'s rows of 128 tokens and batch 16; a vocabulary of
4096) built twice: models/transformer.py (with mlxlab's fused CPU kernels, as the presets train)
and mlx-lm's llama Model with the same sizes, norm eps and rope theta, wrapped as
models/mlx_lm_decoder.py wraps it (every parameter trained: full training from random weights).
Both run the trainer's step (training/step.py: the loss, AdamW, clipping, mx.compile) on the
same random batch; the rounds alternate which goes first and time --steps steps of each after a
compiling warm-up. Reported: the medians over rounds of wall and process-CPU milliseconds a step
(CPU time moves less on a shared machine), tokens/s from the wall median, and each round's
wall ratio mlx-lm / mlxlab.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from functools import partial
from pathlib import Path

# isort: off
import mlxlab  # noqa: F401  first: the fast BLAS
import mlx.core as mx

# isort: on
from mlxlab import kernels
from mlxlab.models.base import Model
from mlxlab.models.transformer import Transformer
from mlxlab.objectives import losses
from mlxlab.training.optim import build_optimizer, default_optimizer
from mlxlab.training.settings import TrainerSettings
from mlxlab.training.step import make_step

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: benchmarks.*
from benchmarks.common import add_smoke, cpu_model  # noqa: E402

PRESETS = {"nano": dict(dim=256, num_layers=4, num_heads=4),
           "small": dict(dim=512, num_layers=6, num_heads=8)}
VOCAB, SEQ, BATCH = 4096, 128, 16


class MLXLMLlama(Model):
    """mlx-lm's llama as models/mlx_lm_decoder.py holds it (under `lm`), built from a config."""

    def __init__(self, config: dict) -> None:
        from mlx_lm.models.llama import Model as Llama
        from mlx_lm.models.llama import ModelArgs

        super().__init__()
        self.lm = Llama(ModelArgs.from_dict(config))
        self.vocab_size, self.max_seq_len = config["vocab_size"], config["max_position_embeddings"]

    def __call__(self, input_ids, attention_mask=None, cache=None):
        return self.lm(input_ids, cache=cache)


def same_shape_llama(own: Transformer) -> MLXLMLlama:
    a = own.architecture
    return MLXLMLlama({
        "model_type": "llama", "vocab_size": a["vocab_size"], "hidden_size": a["dim"],
        "intermediate_size": a["mlp_dim"], "num_hidden_layers": a["num_layers"],
        "num_attention_heads": a["num_heads"], "num_key_value_heads": a["num_kv_heads"],
        "max_position_embeddings": a["max_seq_len"], "rms_norm_eps": a["norm_eps"],
        "rope_theta": a["rope_theta"], "tie_word_embeddings": True})


def stepper(model, batch):
    settings = TrainerSettings(max_steps=100)
    opt = build_optimizer(partial(default_optimizer(), learning_rate=1e-3), settings.schedule, 100)
    opt.init(model.trainable_parameters())
    step = make_step(model, opt, losses.task_loss("lm"), settings)

    def run(n: int) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_utime
        for _ in range(n):
            step([batch])
            mx.eval(model.parameters(), opt.state)
        return (time.perf_counter() - wall) / n, (
            resource.getrusage(resource.RUSAGE_SELF).ru_utime - cpu) / n

    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=list(PRESETS), default="nano")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=6)
    add_smoke(p)
    args = p.parse_args()
    if args.smoke:
        args.steps, args.rounds = 1, 1
    kernels.set_mode("auto")
    kernels.flush_denormals(True)
    mx.random.seed(0)
    own = Transformer(vocab_size=VOCAB, max_seq_len=SEQ, **PRESETS[args.preset])
    theirs = same_shape_llama(own)
    ids = mx.random.randint(0, VOCAB, (BATCH, SEQ + 1))
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": mx.ones((BATCH, SEQ))}
    runs = {"mlxlab Transformer": stepper(own, batch), "mlx-lm llama": stepper(theirs, batch)}
    first = {name: run(1)[0] for name, run in runs.items()}  # compiles
    walls: dict[str, list[float]] = {n: [] for n in runs}
    cpus: dict[str, list[float]] = {n: [] for n in runs}
    ratios = []
    for r in range(args.rounds):
        order = list(runs) if r % 2 == 0 else list(reversed(runs))
        this = {}
        for name in order:
            wall, cpu = runs[name](args.steps)
            walls[name].append(wall)
            cpus[name].append(cpu)
            this[name] = wall
        ratios.append(this["mlx-lm llama"] / this["mlxlab Transformer"])
    print(f"CPU: {cpu_model()}; preset {args.preset} (batch {BATCH} x {SEQ}, vocab {VOCAB}), "
          f"{args.rounds} rounds of {args.steps} steps")
    print("| decoder | first step s | wall ms/step | CPU ms/step | tokens/s |")
    print("|---|---:|---:|---:|---:|")
    for name in runs:
        w, c = statistics.median(walls[name]), statistics.median(cpus[name])
        print(f"| {name} | {first[name]:.1f} | {w * 1000:.0f} | {c * 1000:.0f} | "
              f"{BATCH * SEQ / w:,.0f} |")
    print(f"wall ratio mlx-lm / mlxlab per round: {', '.join(f'{x:.2f}' for x in ratios)}")


if __name__ == "__main__":
    main()
