"""How much faster do generation tasks score batched than one prompt at a time?

A random Llama in SmolLM2-135M's shape (576 hidden, 30 layers, 9 heads / 3 KV heads, 1536 MLP;
a 512-token vocabulary instead of 49152, so the head is cheaper than the real model's) written
by scripts/tiny_hf_model.py without torch, and a generation task of date prompts of varied
length ("Write 3 March 1997 as an ISO date:" after a few-shot prefix of 0-3 examples). Both
ways decode the same greedy tokens (checked): one at a time (scoring.greedy_ids, what
`_generation` ran before) and batched (models/batched_greedy.py greedy_batch at
--batch-size). Rounds alternate in one process; prints the wall time of each round, the
median ratio, the machine and its load.

    .venv/bin/python benchmarks/speed/bench_batched_generation.py [--prompts 64] [--batch-size 16] \
        [--max-new-tokens 32] [--rounds 3] [--layers 30] [--hidden 576] [--smoke]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO))

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]


def date_prompts(n: int, seed: int = 0) -> list[str]:
    """`n` prompts of 0-3 worked examples then the question: lengths vary about 4x."""
    rng = np.random.default_rng(seed)

    def one() -> tuple[str, str]:
        y, m, d = int(rng.integers(1950, 2030)), int(rng.integers(1, 13)), int(rng.integers(1, 29))
        return f"Write {d} {MONTHS[m - 1]} {y} as an ISO date:", f" {y:04d}-{m:02d}-{d:02d}"

    out = []
    for _ in range(n):
        shots = "".join(q + a + "\n" for q, a in (one() for _ in range(int(rng.integers(0, 4)))))
        out.append(shots + one()[0])
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--smoke", action="store_true", help="a tiny model, 6 prompts, 1 round")
    args = parser.parse_args()
    if args.smoke:
        args.prompts, args.rounds, args.layers, args.hidden, args.max_new_tokens = 6, 1, 2, 64, 6

    from benchmarks.common import cpu_model
    from mlxlab.evaluation.scoring import Prompts, _cut, greedy_ids
    from mlxlab.models.batched_greedy import greedy_batch
    from mlxlab.runs.task_eval import load_eval_model
    from tiny_hf_model import save_tiny_llama_without_torch

    with tempfile.TemporaryDirectory(prefix="bench-batched-") as tmp:
        heads = max(1, args.hidden // 64)
        folder = save_tiny_llama_without_torch(
            Path(tmp) / "model", hidden=args.hidden, layers=args.layers, heads=heads,
            kv_heads=max(1, heads // 3), intermediate=int(args.hidden * 8 / 3), std=0.02)
        source = load_eval_model(folder, chat="plain")
        prompts = Prompts(source.tokenizer)
        encoded = [prompts.encode(p) for p in date_prompts(args.prompts)]
        lengths = [len(e) for e in encoded]
        stop = ("\n",)

        def stopped(ids: list[int]) -> bool:
            return _cut(source.tokenizer.decode(ids), stop)[1]

        ways = {
            "one at a time": lambda: [greedy_ids(source.model, ids, args.max_new_tokens,
                                                 prompts.stops, stopped) for ids in encoded],
            f"batched ({args.batch_size})": lambda: greedy_batch(
                source.model, encoded, args.max_new_tokens, prompts.stops, stopped,
                args.batch_size),
        }
        times: dict[str, list[float]] = {w: [] for w in ways}
        answers = {}
        for r in range(args.rounds):
            for way, run in ways.items():
                start = time.perf_counter()
                answers[way] = run()
                times[way].append(time.perf_counter() - start)
                print(f"round {r + 1}  {way:<16} {times[way][-1]:8.2f} s", flush=True)
        one, batched = (answers[w] for w in ways)
        if one != batched:
            print("the batched answers differ from the one-at-a-time answers")
            return 1
        tokens = sum(len(a) for a in one)
        slow, fast = (float(np.median(t)) for t in times.values())
        print(f"\n{cpu_model()}, load average {os.getloadavg()}")
        print(f"{args.prompts} prompts of {min(lengths)}-{max(lengths)} tokens, {tokens} new "
              f"tokens (max {args.max_new_tokens} each), {args.layers} layers x {args.hidden}")
        print(f"one at a time {slow:.2f} s, batched {fast:.2f} s (median of {args.rounds}): "
              f"{slow / fast:.2f}x; answers equal")
    return 0


if __name__ == "__main__":
    sys.exit(main())
