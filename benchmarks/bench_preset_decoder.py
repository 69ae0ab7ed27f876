"""One decoder for the presets? mlxlab's own Transformer against the same-shaped mlx-lm llama, both
trained from random weights by mlxlab's loop on the same stream (issue 54, item 4).

    python benchmarks/bench_preset_decoder.py [--steps 30] [--rounds 3] [--work DIR]

`experiment=tinystories_nano` (dim 256, 4 layers, 4 heads, SwiGLU, RoPE, tied embeddings, rows of
128 tokens, batch 16, the tokenizer that run trains) is run twice per round, in alternating
order: as it is (models/transformer.py, with mlxlab's fused CPU kernels), and as `model=hf_decoder
model.lora.rank=0` on a folder holding an mlx-lm llama of the same shape (the same sizes, norm
eps, rope theta and vocabulary; random N(0, 0.02) weights) and the first run's tokenizer: full
training of every parameter, the same data, optimizer, schedule and loop. tokens/s: the median
of the loop's train/tokens_per_sec over the steps after --skip (compiling); the table gives the
median over rounds and the ratio mlx-lm / mlxlab of each round.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from bench_common import cpu_model  # noqa: E402


def train(args: list[str], out: Path, steps: int) -> list[float]:
    """tokens/s of each logged step of one mlxlab run."""
    cmd = [sys.executable, "-m", "mlxlab.train", "experiment=tinystories_nano",
           f"trainer.max_steps={steps}", f"trainer.eval_every_steps={10 * steps}",
           "trainer.log_every_steps=1", "tracking=csv", "callbacks.progress.enabled=false",
           f"hydra.run.dir={out}", *args]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    rates = {}
    with open(out / "tracking" / "metrics.csv") as f:
        for r in csv.DictReader(f):
            if r["name"] == "train/tokens_per_sec":
                rates[int(r["step"])] = float(r["value"])
    return [rates[s] for s in sorted(rates)]


def llama_folder(run_dir: Path, folder: Path) -> Path:
    """An mlx-lm llama of the nano preset's shape, random weights, with the run's tokenizer."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models.llama import Model, ModelArgs

    from mlxlab.models.transformer import Transformer

    tokenizer = run_dir / "tokenizer.json"
    vocab = json.loads(tokenizer.read_text())["model"]["vocab"]
    nano = Transformer(vocab_size=len(vocab), dim=256, num_layers=4, num_heads=4, max_seq_len=128)
    a = nano.architecture
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"],
              "vocab_size": a["vocab_size"], "hidden_size": a["dim"],
              "intermediate_size": a["mlp_dim"], "num_hidden_layers": a["num_layers"],
              "num_attention_heads": a["num_heads"], "num_key_value_heads": a["num_kv_heads"],
              "max_position_embeddings": a["max_seq_len"], "rms_norm_eps": a["norm_eps"],
              "rope_theta": a["rope_theta"], "tie_word_embeddings": True, "hidden_act": "silu"}
    mx.random.seed(0)
    model = Model(ModelArgs.from_dict(config))
    weights = {k: 0.02 * mx.random.normal(v.shape) if v.ndim > 1 else v
               for k, v in tree_flatten(model.parameters())}
    folder.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "mlx"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "tokenizer.json").write_bytes(tokenizer.read_bytes())
    return folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--skip", type=int, default=3, help="first steps left out (compiling)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--work", default=None)
    args = p.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-preset-"))
    train([], work / "tokenizer-run", 2)  # trains the stream's tokenizer the llama folder takes
    folder = llama_folder(work / "tokenizer-run", work / "llama-nano")
    # (the experiment's model.max_seq_len is the Transformer's; the folder's config sets it)
    mlx_lm_args = ["model=hf_decoder", f"model.pretrained={folder}", "model.lora.rank=0",
                   "~model.max_seq_len"]
    results: dict[str, list[float]] = {"mlxlab Transformer": [], "mlx-lm llama": []}
    ratios = []
    for r in range(args.rounds):
        order = [("mlxlab Transformer", []), ("mlx-lm llama", mlx_lm_args)]
        if r % 2:
            order.reverse()
        this = {}
        for name, extra in order:
            rates = train(extra, work / f"{name.split()[0]}-{r + 1}", args.steps)[args.skip:]
            this[name] = statistics.median(rates)
            results[name].append(this[name])
        ratios.append(this["mlx-lm llama"] / this["mlxlab Transformer"])
    print(f"CPU: {cpu_model()}; {args.rounds} rounds of {args.steps} steps (first {args.skip} "
          "left out), experiment=tinystories_nano")
    print("| model | tokens/s (median of rounds) |")
    print("|---|---:|")
    for name, values in results.items():
        print(f"| {name} | {statistics.median(values):,.0f} |")
    print(f"mlx-lm / mlxlab per round: {', '.join(f'{x:.2f}' for x in ratios)}")


if __name__ == "__main__":
    main()
