"""QLoRA on the CPU backend: LoRA training on float and 4-bit decoders, mlxlab beside mlx_lm.lora
(issue 54, item 5).

    python benchmarks/speed/bench_qlora.py speed  [--archs llama,qwen3,gemma3_text] [--steps 6]
                                            [--rounds 2] [--work DIR]
    python benchmarks/speed/bench_qlora.py memory [--steps 3] [--work DIR]
    python benchmarks/speed/bench_qlora.py layer  [--rounds 5]

`layer`: one 1536x4096 Linear (out x in), 128 rows, in one process, the variants interleaved:
GFLOP/s of the forward and of forward + backward in x (LoRA's: the base is frozen) for the float
GEMM, MLX's quantized matmul (nn.QuantizedLinear), mx.dequantize + the float GEMM, and mlxlab's
fused product (use_fast_cpu_quantized), 4 and 8 bits, group 64; the best of `--rounds`.

Models: random decoders built locally with transformers (never downloaded), weights N(0, 0.02),
float32, a ChatML tokenizer of 512 tokens (scripts/tiny_hf_model.py), and their 4-bit folders
written by `mlx_lm.convert -q` (group 64, float32 scales). `speed`: llama, qwen3 and gemma3_text of
hidden 512, 4 layers (gemma3_text 6: mlx-lm's Gemma 3 needs one full-attention layer in 6),
8 heads (4 key-value heads), MLP 1536. `memory`: a 302M-parameter llama
(hidden 1024, 18 layers, 16 heads, MLP 4096).
Training: bench_lora.py's settings and code: LoRA rank 8 (scale 2) on q/k/v/o of every layer,
Adam at lr 2e-4, the same `long` text rows for every run (every position trained), batch and
sequence set here (speed: batch 4 x 256; memory: batch 2 x 128), each tool in its own process:
- `mlx-lm`: mlx_lm.lora's own training (mlx_lm.lora.run's body), MLX pointed at the same OpenBLAS
  as mlxlab's (runtime/blas.py, nothing else of mlxlab): 4-bit runs on MLX's quantized matmul.
- `mlx-lm+fast`: the same, with `mlxlab.models.quantized_cpu.use_fast_cpu_quantized(model)`
  called on the loaded model (mlxlab's fused CPU quantized product; a float model is unchanged).
- `mlxlab`: `mlxlab.train experiment=finetune_completions model.pretrained=<folder>`: the folder
  through mlx-lm's model code (model=hf_decoder), a 4-bit one kept packed and switched to the CPU
  quantized product (models/mlx_lm_decoder.prepare_for_training).
tokens/s: the median of the per-step rates after the first `--skip` steps; first step: its
seconds (compiling included); peak: MLX's peak memory (mx.get_peak_memory, each tool's own
report) and the process's peak resident memory (VmHWM; the issue's "today" figures). Rounds
alternate the order of the tools; the tables give medians over rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))
from benchmarks.harness import add_smoke, cpu_model  # noqa: E402
from benchmarks.speed import bench_lora  # noqa: E402

ARCHS = ("llama", "qwen3", "gemma3_text")
SPEED = dict(hidden=512, layers=4, heads=8, kv_heads=4, intermediate=1536, batch=4, seq=256)
MEMORY = dict(hidden=1024, layers=18, heads=16, kv_heads=16, intermediate=4096, batch=2, seq=128)


def save_decoder(arch: str, path: Path, shape: dict) -> Path:
    """A random float32 decoder folder of `arch` in Hugging Face's layout, with transformers."""
    import torch
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, Qwen3Config

    from tiny_hf_model import save_chat_tokenizer

    if (path / "config.json").exists():
        return path
    common = dict(vocab_size=512, hidden_size=shape["hidden"], num_hidden_layers=shape["layers"],
                  num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
                  intermediate_size=shape["intermediate"], max_position_embeddings=4096,
                  head_dim=shape["hidden"] // shape["heads"], tie_word_embeddings=False)
    config = {"llama": LlamaConfig, "qwen3": Qwen3Config, "gemma3_text": Gemma3TextConfig}[arch]
    if arch == "gemma3_text":  # Gemma ties its output head to the embedding; mlx-lm's Gemma 3
        # takes one full-attention layer in every 6 (its cache list needs >= 6 layers)
        common.update(tie_word_embeddings=True, sliding_window=128,
                      num_hidden_layers=max(6, shape["layers"]))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config(**common)).float()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.02)
    model.save_pretrained(path, safe_serialization=True)
    save_chat_tokenizer("chatml", path)
    return path


def quantized_folder(float_folder: Path) -> Path:
    """`mlx_lm.convert -q` of the float folder: 4 bits, group 64, float32 scales."""
    from mlx_lm import convert

    out = float_folder.with_name(float_folder.name + "-4bit")
    if not (out / "config.json").exists():
        convert(str(float_folder), str(out), quantize=True, q_group_size=64, q_bits=4,
                dtype="float32")
    return out


def run(tool: str, model: Path, data: Path, steps: int, out: Path) -> list[dict]:
    if tool == "mlxlab":
        return bench_lora.run_mlxlab(model, data, "long", steps, out)
    return bench_lora.run_mlx_lm(model, data, "long", steps, out, openblas=True,
                                 fast_quantized=tool == "mlx-lm+fast")


def summary(steps: list[dict], skip: int, tokens_per_step: int) -> dict:
    timed = [s for s in steps if s["step"] > skip] or steps
    first = steps[0]
    return {
        "tokens_per_sec": statistics.median(s["tokens_per_sec"] for s in timed),
        "first_step_s": first.get("seconds", tokens_per_step / first["tokens_per_sec"]),
        "peak_mb": max(s["peak_mb"] for s in steps),
        "rss_mb": steps[-1].get("rss_mb", float("nan")),
        "loss_first": first["loss"],
    }


def measure(runs: list[tuple[str, str, Path]], data: Path, args, shape: dict) -> dict:
    """{(label, tool): [summary per round]} over `runs` of (label, tool, model folder)."""
    bench_lora.SEQ, bench_lora.BATCH = shape["seq"], shape["batch"]
    results: dict[tuple[str, str], list[dict]] = {}
    work = Path(args.work)
    for rnd in range(args.rounds):
        for label, tool, model in runs if rnd % 2 == 0 else runs[::-1]:
            out = work / "runs" / f"{label}-{tool}-{rnd}"
            s = summary(run(tool, model, data, args.steps, out), args.skip,
                        shape["seq"] * shape["batch"])
            # the 1-minute load average as the run ended: another busy process on these 2 cores
            # slows a 2-thread run 4-20x (OpenBLAS's threads wait on a descheduled one), so a
            # row run beside one is visible as such
            s["load_1min"] = os.getloadavg()[0]
            results.setdefault((label, tool), []).append(s)
            print(json.dumps({"round": rnd, "model": label, "tool": tool, **s}), flush=True)
    return results


def med(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def table(results: dict, args, shape: dict) -> None:
    print(f"\n{cpu_model()}, {os.cpu_count()} cores; batch {shape['batch']} x {shape['seq']} "
          f"tokens, {args.steps} steps, the first {args.skip} left out of tokens/s; median of "
          f"{args.rounds} round(s)\n")
    print("| model | tool | tokens/s | first step s | MLX peak MB | peak RSS MB |")
    print("|---|---|---|---|---|---|")
    for (label, tool), runs in results.items():
        print(f"| {label} | {tool} | {med(runs, 'tokens_per_sec'):.0f} | "
              f"{med(runs, 'first_step_s'):.1f} | {med(runs, 'peak_mb'):.0f} | "
              f"{med(runs, 'rss_mb'):.0f} |")


def layer_table(rounds: int) -> None:
    import time

    import mlx.core as mx
    import mlx.nn as nn

    from mlxlab.models.quantized_cpu import use_fast_cpu_quantized

    rows, inp, out = 128, 4096, 1536
    mx.random.seed(0)
    linear = nn.Linear(inp, out, bias=False)
    x, g = mx.random.normal((rows, inp)), mx.random.normal((rows, out))

    def dequantized(q):
        return lambda x: x @ mx.dequantize(q.weight, q.scales, q.biases, 64, q.bits).T

    variants = {"float GEMM": linear}
    for bits in (4, 8):
        variants[f"{bits}-bit nn.QuantizedLinear"] = q = nn.QuantizedLinear.from_linear(
            linear, 64, bits)
        variants[f"{bits}-bit mx.dequantize + GEMM"] = dequantized(q)
        variants[f"{bits}-bit mlxlab fused"] = fast = nn.QuantizedLinear.from_linear(
            linear, 64, bits)
        use_fast_cpu_quantized(fast)
    flop = 2 * rows * inp * out
    times: dict[str, list[tuple[tuple[float, float], tuple[float, float]]]] = {
        name: [] for name in variants}

    def seconds(fn) -> tuple[float, float]:
        """(wall, CPU) seconds of one call: CPU time (all of this process's threads) is what the
        call cost, the steadier figure when other processes share the cores."""
        mx.eval(fn())
        wall, cpu = time.perf_counter(), time.process_time()
        mx.eval(fn())
        return time.perf_counter() - wall, time.process_time() - cpu

    for _ in range(rounds):
        for name, layer in variants.items():
            grad = mx.grad(lambda x, layer=layer: (layer(x) * g).sum())
            times[name].append((seconds(lambda layer=layer: layer(x)),
                                seconds(lambda grad=grad: grad(x))))
    print(f"\n{cpu_model()}, {os.cpu_count()} cores; {out}x{inp} weight, {rows} rows; the best of "
          f"{rounds} interleaved rounds (the least disturbed by other load)\n")
    print("| product | forward GFLOP/s | forward + backward in x GFLOP/s | the same per CPU-second |")
    print("|---|---|---|---|")
    for name, runs in times.items():
        fwd, both = (min(t[0][0] for t in runs), min(t[0][1] for t in runs)), (
            min(t[1][0] for t in runs), min(t[1][1] for t in runs))
        print(f"| {name} | {flop / fwd[0] / 1e9:.1f} | {2 * flop / both[0] / 1e9:.1f} | "
              f"{flop / fwd[1] / 1e9:.1f} / {2 * flop / both[1] / 1e9:.1f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", nargs="?", choices=("speed", "memory", "layer"))
    p.add_argument("--archs", default=",".join(ARCHS))
    p.add_argument("--tools", default="mlx-lm,mlx-lm+fast,mlxlab")
    p.add_argument("--precisions", default="float,4-bit")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--skip", type=int, default=2, help="first steps left out (compiling)")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--work", default=None)
    add_smoke(p)
    args = p.parse_args()
    if args.smoke:  # speed on llama: mlxlab float and 4-bit, mlx-lm's loop on the fast product
        args.what, args.archs, args.tools, args.precisions = "speed", "llama", "mlx-lm+fast,mlxlab", "float,4-bit"
        args.steps, args.skip, args.rounds = 1, 0, 1
    if args.what is None:
        p.error("the following arguments are required: what")
    if args.what == "layer":
        import mlxlab  # noqa: F401  (MLX on OpenBLAS)

        return layer_table(args.rounds or 5)
    args.work = args.work or tempfile.mkdtemp(prefix="bench_qlora_")
    speed = args.what == "speed"
    args.steps = args.steps or (6 if speed else 3)
    args.rounds = args.rounds or (2 if speed else 1)
    shape = SPEED if speed else MEMORY
    archs = args.archs.split(",") if speed else ["llama"]
    data = bench_lora.write_data(Path(args.work) / "data")["long"]
    tools = args.tools.split(",")
    runs = []
    for arch in archs:
        folder = save_decoder(arch, Path(args.work) / f"{arch}-{args.what}", shape)
        for precision, model in (("float", folder), ("4-bit", quantized_folder(folder))):
            if precision not in args.precisions.split(","):
                continue
            for tool in tools:
                if tool == "mlx-lm+fast" and precision == "float":
                    continue  # nothing to switch: the float run is mlx-lm's
                runs.append((f"{arch} {precision}", tool, model))
    table(measure(runs, data, args, shape), args, shape)


if __name__ == "__main__":
    main()
