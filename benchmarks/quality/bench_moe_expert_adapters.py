"""Do adapters on the routed experts learn what attention adapters cannot? A tiny random MoE
decoder learns a token-by-token substitution with LoRA on attention only, on the experts only
and on both, at the same rank, steps and learning rate; held-out rows score each.

    python benchmarks/quality/bench_moe_expert_adapters.py [--steps 300] [--seeds 0,1,2]
                                                           [--classes 480] [--places ...]

The task: rows of 32 tokens drawn from 480 ids; at each position the model must predict a fixed
random permutation of that position's own token (a lookup table, no context needed). The map
from a token to its answer is a table of 480 arbitrary pairs, many more than the 64 dimensions
of the residual stream: attention adapters change the query / key / value / output
projections, linear maps of low rank on the residual stream, while expert adapters change the
experts' SwiGLU, a nonlinear map per expert. The model: qwen3_moe with hidden 64, 2 layers, 8
experts of 64 (2 a token), random N(0, 0.02) weights (bench_moe_lora.py's writer), loaded
through mlxlab's decoder; LoRA rank 8 at scale 2 (alpha = 2 x rank) through models/lora.py on
the targets named, Adam at 3e-3, batch 16, loss on every position; mx.compile'd steps. Held-out: 128 rows never trained on (the same table). Reported:
held-out cross-entropy and accuracy before and after, per adapter placement, mean over seeds;
attention adapters also at rank 55, as many trained parameters as the experts' at rank 8. The
random head (std 0.02 after an RMSNorm) caps the logits' size, so the cross-entropy stays high
and the accuracy is the measure.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))
from benchmarks.common import add_smoke, cpu_model  # noqa: E402
from benchmarks.speed.bench_moe_lora import write_model  # noqa: E402

SHAPE = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64,
             intermediate_size=128)
# placement -> (targets, rank); attention at rank 55 trains as many parameters as the experts'
# rank 8 (896 a rank over q, k, v, o of both layers): placement, not size, is what is compared
ATTENTION = ["query", "key", "value", "out"]
PLACES = {"attention": (ATTENTION, 8),
          "attention at rank 55 (as many parameters)": (ATTENTION, 55),
          "experts": (["experts"], 8), "attention + experts": ([*ATTENTION, "experts"], 8)}
SOURCE, ANSWER, CLASSES, LENGTH = 16, 256, 480, 32
PLACE_NAMES = ",".join(PLACES)


def rows(rng: np.random.Generator, n: int, table: np.ndarray) -> tuple[mx.array, mx.array]:
    ids = rng.integers(0, len(table), size=(n, LENGTH))
    answer = ANSWER if len(table) <= ANSWER - SOURCE else SOURCE  # more: a permutation in place
    return mx.array(SOURCE + ids, dtype=mx.int32), mx.array(answer + table[ids], dtype=mx.int32)


def scores(model, ids: mx.array, labels: mx.array) -> tuple[float, float]:
    logits = model(ids).astype(mx.float32)
    ce = nn.losses.cross_entropy(logits, labels).mean()
    acc = (logits.argmax(-1) == labels).astype(mx.float32).mean()
    return float(ce), float(acc)


def train(folder: Path, targets: list[str], rank: int, seed: int, steps: int,
          classes: int = CLASSES) -> dict:
    from mlxlab.models.mlx_lm_decoder import MLXLMDecoder

    rng = np.random.default_rng(seed)
    table = rng.permutation(classes)
    train_ids, train_labels = rows(rng, 512, table)
    held_ids, held_labels = rows(rng, 128, table)
    mx.random.seed(seed)
    model = MLXLMDecoder(vocab_size=512, pretrained=str(folder),
                         lora={"rank": rank, "alpha": 2 * rank, "targets": targets})
    before = scores(model, held_ids, held_labels)
    optimizer = optim.Adam(learning_rate=3e-3)

    def loss(m, ids, labels):
        return nn.losses.cross_entropy(m(ids).astype(mx.float32), labels).mean()

    grad = nn.value_and_grad(model, loss)
    state = [model.state, optimizer.state]

    def step(ids, labels):
        value, grads = grad(model, ids, labels)
        optimizer.update(model, grads)
        return value

    step = mx.compile(step, inputs=state, outputs=state)
    model.train()
    for _ in range(steps):
        pick = mx.array(rng.integers(0, len(train_ids), size=16))
        mx.eval(step(train_ids[pick], train_labels[pick]), state)
    model.eval()
    trained = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    return {"before": before, "after": scores(model, held_ids, held_labels), "params": trained}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--classes", type=int, default=CLASSES,
                   help="source ids in the table (over 240: answers permute the same ids)")
    p.add_argument("--places", default=PLACE_NAMES, help="which rows, by name, comma-separated")
    p.add_argument("--work", default=None)
    add_smoke(p)
    args = p.parse_args()
    if args.smoke:
        args.steps, args.seeds = 2, "0"
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_moe_adapters_"))
    folder = write_model(work / "tiny-moe", 2, SHAPE)
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"{cpu_model()}; qwen3_moe hidden 64, 2 layers, 8 experts of 64 (2 a token); "
          f"LoRA scale 2; {args.classes} ids in the table; {args.steps} steps of 16 rows x {LENGTH}; "
          f"seeds {seeds}\n")
    print("| adapters on | trained parameters | held-out CE before -> after | "
          "held-out accuracy before -> after |")
    print("|---|---|---|---|")
    picked = [p for p in PLACES if p in args.places.split(",")]
    for place in picked:
        targets, rank = PLACES[place]
        runs = [train(folder, targets, rank, seed, args.steps, args.classes) for seed in seeds]
        before, after = (np.mean([r[key] for r in runs], axis=0) for key in ("before", "after"))
        print(f"| {place} | {runs[0]['params']:,} | {before[0]:.3f} -> {after[0]:.3f} | "
              f"{before[1]:.3f} -> {after[1]:.3f} |",
              flush=True)


if __name__ == "__main__":
    main()
