"""The trainer's compiled LoRA step on bench_lora.py's random Llama through mlx-lm's model code
with mlxlab's fused CPU kernels (models/mlx_lm_fused.py, what prepare_for_training does), without
them (mlx-lm's attention, SwiGLU, RMSNorm and RoPE as shipped), and mlxlab's own Transformer of
the same shape with the same LoRA (the presets' path): alternating in one process, rounds x
variants, each round starting with the next one (issue 54).

    python benchmarks/speed/bench_mlx_lm_fused.py [--rounds 4] [--steps 3] [--work DIR]

The model: hidden 512, 8 layers, 4 query / 2 key-value heads, MLP 1280, vocabulary 512, N(0, 0.2)
weights; LoRA rank 8 (alpha 16) on q/k/v/o; batch 4 x 512 of random ids; AdamW. Prints each
run's median wall and CPU ms per step (after the compiling step) and each round's speed ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

# isort: off
import mlxlab  # noqa: F401  first: the fast BLAS
import mlx.core as mx
import mlx.nn as nn

# isort: on
from mlxlab import kernels
from mlxlab.models.mlx_lm_decoder import MLXLMDecoder
from mlxlab.models.mlx_lm_fused import ORIGINALS
from mlxlab.models.transformer import Transformer
from mlxlab.objectives import losses
from mlxlab.training.optim import build_optimizer, default_optimizer
from mlxlab.training.settings import TrainerSettings
from mlxlab.training.step import make_step

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: benchmarks.*
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from benchmarks.common import add_smoke  # noqa: E402
from benchmarks.speed.bench_lora import BATCH, SEQ, prepare  # noqa: E402

LORA = {"rank": 8, "alpha": 16.0, "targets": ["query", "key", "value", "out"]}
VARIANTS = ("mlxlab Transformer", "mlx-lm fused", "mlx-lm as shipped")


def unfuse(model: MLXLMDecoder) -> None:
    """mlx-lm's own functions and classes back in place (the model's modules as before mlxlab)."""
    module = sys.modules[type(model.lm).__module__]
    for name, value in list(vars(module).items()):
        if callable(value) and value in ORIGINALS:
            setattr(module, name, ORIGINALS[value])
    for m in model.lm.modules():
        if isinstance(m, nn.RMSNorm):
            m.__class__ = nn.RMSNorm
        elif isinstance(m, nn.RoPE):
            m.__class__ = nn.RoPE


def build(variant: str, folder: Path, config: dict) -> nn.Module:
    if variant == VARIANTS[0]:
        return Transformer(vocab_size=config["vocab_size"], dim=config["hidden_size"],
                           num_layers=config["num_hidden_layers"],
                           num_heads=config["num_attention_heads"],
                           num_kv_heads=config["num_key_value_heads"],
                           mlp_dim=config["intermediate_size"], tie_embeddings=False,
                           norm_eps=config["rms_norm_eps"], max_seq_len=SEQ, lora=LORA)
    model = MLXLMDecoder(vocab_size=0, pretrained=str(folder), lora=LORA)
    if variant == VARIANTS[2]:
        unfuse(model)
    return model


def time_steps(model: nn.Module, steps: int) -> tuple[float, float, float]:
    """Median (wall, CPU) seconds of the compiled step after the first, and the first's wall
    seconds (its compile); bench_lora_step.py times its one model with it too."""
    settings = TrainerSettings(max_steps=100)
    opt = build_optimizer(partial(default_optimizer(), learning_rate=2e-4), settings.schedule, 100)
    opt.init(model.trainable_parameters())
    step = make_step(model, opt, losses.task_loss("lm"), settings)
    ids = mx.random.randint(0, model.vocab_size, (BATCH, SEQ + 1))
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": mx.ones((BATCH, SEQ))}
    mx.eval(batch, model.parameters())
    wall, cpu = [], []
    for _ in range(steps + 1):
        w, c = time.perf_counter(), time.process_time()
        step([batch])
        mx.eval(model.parameters(), opt.state)
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    return statistics.median(wall[1:]), statistics.median(cpu[1:]), wall[0]


def main() -> None:
    import json

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--work", default=None)
    add_smoke(p)
    args = p.parse_args()
    if args.smoke:  # every variant once, the compiling step and one more
        args.rounds, args.steps = 1, 1
    folder, _ = prepare(Path(args.work or tempfile.mkdtemp(prefix="bench_mlx_lm_fused_")))
    config = json.loads((folder / "config.json").read_text())
    kernels.set_mode("auto")
    kernels.flush_denormals(True)
    for r in range(args.rounds):
        walls = {}
        for variant in VARIANTS[r % 3:] + VARIANTS[:r % 3]:  # each goes first in turn
            mx.random.seed(0)
            walls[variant], cpu, _ = time_steps(build(variant, folder, config), args.steps)
            print(f"round {r} {variant}: wall {walls[variant] * 1e3:.0f} ms, "
                  f"CPU {cpu * 1e3:.0f} ms a step", flush=True)
        ref = walls[VARIANTS[0]]
        print(f"round {r} speed / the Transformer's: fused {ref / walls[VARIANTS[1]]:.2f}, "
              f"as shipped {ref / walls[VARIANTS[2]]:.2f}", flush=True)


if __name__ == "__main__":
    main()
