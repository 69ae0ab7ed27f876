"""llama.cpp itself loads mlxlab's GGUF exports and scores them.

A small TinyStories decoder (or --run) exported as F16, Q8_0, Q4_0 and Q4_1; llama.cpp
(llama-cpp-python) tokenizes held-out text (against the run's tokenizer), scores the same ids
(mean NLL against mlxlab's float32) and decodes greedily (against `mlxlab generate`).

    python benchmarks/parity/bench_gguf.py [--steps 300] [--run outputs/...] [--texts 40] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: benchmarks.*
from benchmarks.harness import add_smoke, write_record  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TRAIN = [
    "experiment=tinystories_nano", "tracking=none", "callbacks.progress.enabled=false",
    "model.dim=128", "model.num_layers=4", "model.num_heads=4", "model.num_kv_heads=2",
    "model.max_seq_len=128", "data.packing.seq_len=128", "data.tokenizer.max_vocab=1024",
    "data.splits.val_examples=40", "trainer.batch_size=16",
]
QUANTS = ("f16", "q8_0", "q4_0", "q4_1")


def train_run(root: Path, steps: int) -> Path:
    args = [*TRAIN, f"trainer.max_steps={steps}", f"trainer.eval_every_steps={steps}",
            f"hydra.run.dir={root}/run"]
    subprocess.run([sys.executable, "-m", "mlxlab.train", *args], cwd=root, check=True)
    return root / "run"


def held_out(n: int) -> list[str]:
    from mlxlab.config import asset_path

    stories = Path(asset_path("tinystories/sample.txt")).read_text().split("\n\n")
    return [s for s in stories[-3 * n:] if len(s) > 200][:n]


def mlxlab_nll(run, ids: list[int]) -> float:
    import mlx.core as mx

    model = run.model
    model.eval()
    logits = model(mx.array([ids[:-1]], dtype=mx.int32)).astype(mx.float32)
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    picked = mx.take_along_axis(logp[0], mx.array(ids[1:])[:, None], axis=-1)
    return float(-picked.mean())


def llama_nll(llm, ids: list[int]) -> float:
    llm.reset()
    llm.eval(ids[:-1])
    logits = np.array(llm.scores[: len(ids) - 1], dtype=np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    return float(-np.mean(logp[np.arange(len(ids) - 1), ids[1:]]))


def llama_greedy(llm, prompt: list[int], n: int) -> list[int]:
    llm.reset()
    out = []
    for token in llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
        out.append(int(token))
        if len(out) == n:
            break
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--texts", type=int, default=40)
    parser.add_argument("--greedy", type=int, default=16)
    parser.add_argument("--json", type=Path)
    add_smoke(parser)
    args = parser.parse_args()
    if args.smoke:  # a 2-step run, 2 texts, 2 greedy tokens; llama.cpp's side if it is installed
        args.steps, args.texts, args.greedy = 2, 2, 2
    try:
        from llama_cpp import Llama
    except ImportError:
        if not args.smoke:
            raise SystemExit("bench_gguf.py needs llama.cpp: pip install llama-cpp-python") from None
        Llama = None

    from mlxlab.export import export_gguf
    from mlxlab.runs.generate import sample_ids
    from mlxlab.runs.inference import load_run

    root = Path(tempfile.mkdtemp(prefix="bench-gguf-"))
    run_dir = args.run or train_run(root, args.steps)
    run = load_run(run_dir)
    texts = held_out(args.texts)
    start = run.tokenizer.encode("", add_special_tokens=True).ids
    token_ids = [start + run.tokenizer.encode(t, add_special_tokens=False).ids[:120] for t in texts]
    ours = [mlxlab_nll(run, ids) for ids in token_ids]
    prompt = "Once upon a time"
    greedy_ours = list(sample_ids(run, prompt, max_tokens=args.greedy, temperature=0.0))
    prompt_ids = [*(start or []), *run.tokenizer.encode(prompt, add_special_tokens=False).ids]
    rows = []
    for quant in QUANTS:
        file = root / f"model-{quant}.gguf"
        t0 = time.perf_counter()
        report = export_gguf(run_dir, file, quant)
        seconds = time.perf_counter() - t0
        if Llama is None:
            print(f"{quant}: {report['bytes'] / 2**20:.2f} MiB in {seconds:.1f} s; llama.cpp not "
                  "installed: its side skipped", flush=True)
            continue
        llm = Llama(str(file), n_ctx=256, logits_all=True, n_threads=2, verbose=False)
        same_tokens = sum(
            llm.tokenize(t.encode(), add_bos=False, special=False)
            == run.tokenizer.encode(t, add_special_tokens=False).ids for t in texts)
        theirs = [llama_nll(llm, ids) for ids in token_ids]
        greedy = llama_greedy(llm, prompt_ids, len(greedy_ours))
        nll_o, nll_t = float(np.mean(ours)), float(np.mean(theirs))
        rows.append({
            "quant": quant, "mib": report["bytes"] / 2**20, "export_s": seconds,
            "texts": len(texts), "tokens": sum(len(i) - 1 for i in token_ids),
            "tokenizer_equal": same_tokens, "nll_mlxlab": nll_o, "nll_llama_cpp": nll_t,
            "ppl_mlxlab": math.exp(nll_o), "ppl_llama_cpp": math.exp(nll_t),
            "ppl_rel_diff": math.exp(nll_t) / math.exp(nll_o) - 1,
            "greedy_equal_prefix": next((i for i, (a, b) in enumerate(zip(greedy, greedy_ours))
                                         if a != b), min(len(greedy), len(greedy_ours))),
            "greedy_n": len(greedy_ours)})
        print(json.dumps(rows[-1]), flush=True)
    print("\n| quant | MiB | tokenizer equal | perplexity mlxlab | perplexity llama.cpp | diff | "
          "greedy tokens equal |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['quant']} | {r['mib']:.2f} | {r['tokenizer_equal']}/{r['texts']} | "
              f"{r['ppl_mlxlab']:.4f} | {r['ppl_llama_cpp']:.4f} | {100 * r['ppl_rel_diff']:+.2f} % "
              f"| {r['greedy_equal_prefix']}/{r['greedy_n']} |")
    write_record("gguf", {"rows": rows}, question="parity", smoke=args.smoke)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
