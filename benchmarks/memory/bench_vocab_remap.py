"""Memory and step time of a 32k-vocabulary LM vs the same model on the vocabulary its corpus uses.

    OPENBLAS_NUM_THREADS=1 python benchmarks/memory/bench_vocab_remap.py [--docs 2000] [--rounds 6]

The 32k tokenizer: a byte-level BPE trained with `tokenizers` on the shipped TinyStories sample
(its merges run out near 7.6k tokens on 0.8 MB of text) topped up to 32,000 ids with unused added
tokens, which stands in for a general-purpose 32k tokenizer (Llama's, say) on a small corpus:
only the tokens the corpus uses get trained either way. The data module (StreamingText on the
first `--docs` stories, data.vocab_remap.mode=used) gives the remapped batches; the full model
gets the same batches mapped back to the tokenizer's ids. Both models are transformer_nano (dim
256, 4 layers, tied embeddings, seq_len 128, batch 16) with AdamW; the steps are the trainer's compiled
step. Step times are measured interleaved (a few steps of one model, then of the other, `--rounds`
times) in one process, so a shared, loaded machine slows both alike; the medians are reported.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: benchmarks.*
from benchmarks.common import add_smoke, cpu_model
from mlxlab.data.batching import Batching
from mlxlab.data.streaming import StreamingText
from mlxlab.data.tokenizer import build_tokenizer
from mlxlab.models.transformer import Transformer
from mlxlab.objectives import losses
from mlxlab.runtime import device
from mlxlab.training.optim import build_optimizer, default_optimizer
from mlxlab.training.settings import TrainerSettings
from mlxlab.training.step import make_step

SAMPLE = Path(__file__).resolve().parents[2] / "src/mlxlab/assets/tinystories/sample.txt"
FULL = 32000


def tokenizer_32k(folder: Path) -> Path:
    tok = build_tokenizer([SAMPLE.read_text()], kind="bytelevel_bpe", vocab_size=FULL, max_vocab=FULL,
                          min_frequency=1)
    trained = tok.get_vocab_size()
    tok.add_tokens([f"<|unused_{i}|>" for i in range(FULL - trained)])
    path = folder / "tokenizer-32k.json"
    tok.save(str(path))
    print(f"tokenizer: BPE merges stopped at {trained} tokens; topped up to {tok.get_vocab_size()}")
    return path


def nbytes(tree) -> float:
    return sum(v.nbytes for _, v in tree_flatten(tree)) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=4, help="steps per model per round")
    add_smoke(ap)
    args = ap.parse_args()
    if args.smoke:  # 50 stories, one step of each model
        args.docs, args.rounds, args.steps = 50, 1, 1
    folder = Path(tempfile.mkdtemp(prefix="bench-vocab-"))
    tok = tokenizer_32k(folder)
    data = StreamingText(source={"data_files": str(SAMPLE)},
                         splits={"max_examples": args.docs, "val_examples": 0},
                         packing={"seq_len": 128}, shuffle_buffer=0, tokenizer={"path": str(tok)},
                         vocab_remap={"mode": "used"})
    data.setup(folder)
    keep = data.vocab_map.keep
    batches = [b for b, _ in zip(data.train_batches(Batching(batch_size=16), 0), range(8))]
    full_batches = [{k: mx.array(keep[np.array(v)]) if k in ("input_ids", "labels") else v
                     for k, v in b.items()} for b in batches]
    runs = {}
    for name, vocab, bs in (("full 32k", data.full_vocab_size, full_batches),
                            ("remapped (used)", data.vocab_size, batches)):
        mx.random.seed(0)
        model = Transformer(vocab_size=vocab, dim=256, num_layers=4, num_heads=4, max_seq_len=128)
        settings = TrainerSettings(max_steps=1000)
        opt = build_optimizer(default_optimizer(), settings.schedule, total_steps=1000)  # AdamW 1e-3
        opt.init(model.trainable_parameters())
        step = make_step(model, opt, losses.task_loss("lm"), settings)
        mx.eval(model.parameters(), opt.state)
        device.reset_peak_memory()
        step([bs[0]])  # compiles; its peak is the step's working set plus weights and state
        runs[name] = {"vocab": vocab, "model": model, "step": step, "batches": bs, "times": [],
                      "params": sum(v.size for _, v in tree_flatten(model.parameters())),
                      "weights_mb": nbytes(model.parameters()), "opt_mb": nbytes(opt.state),
                      "peak_mb": device.peak_memory_mb()}
    for r in range(args.rounds):
        for run in runs.values():
            t0 = time.perf_counter()
            for k in range(args.steps):
                run["step"]([run["batches"][(r * args.steps + k) % len(run["batches"])]])
            run["times"].append((time.perf_counter() - t0) / args.steps)
    print(f"\nCPU: {cpu_model()}, load {os.getloadavg()[0]:.1f}; {args.docs} stories, "
          f"{len(keep)} of {data.full_vocab_size} token ids used (+1 UNK)\n")
    print("| vocabulary | rows | parameters | weights MB | AdamW state MB | step peak MB | "
          "step ms (median) |")
    print("|---|---|---|---|---|---|---|")
    for name, run in runs.items():
        print(f"| {name} | {run['vocab']} | {run['params']:,} | {run['weights_mb']:.1f} | "
              f"{run['opt_mb']:.1f} | {run['peak_mb']:.0f} | "
              f"{1000 * statistics.median(run['times']):.0f} |")
    a, b = runs.values()
    print(f"\nremapped/full: step time {statistics.median(b['times']) / statistics.median(a['times']):.2f}x, "
          f"step peak memory {b['peak_mb'] / a['peak_mb']:.2f}x, parameters {b['params'] / a['params']:.2f}x")



if __name__ == "__main__":
    main()
