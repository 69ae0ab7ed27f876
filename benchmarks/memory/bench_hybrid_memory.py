"""A gated-delta hybrid's training memory: the chunked rule (models/layers/gated_delta.py) beside mlx-lm's
token loop (`gated_delta_ops`), and a Qwen3.5-shaped hybrid beside a plain Qwen3 of the same
width and depth. MLX peak memory (mx.get_peak_memory, the active buffers: independent of the
box's load), one process, each case after mx.clear_cache and mx.reset_peak_memory.

1. One Qwen3.5 GatedDeltaNet layer (mlx-lm's class), forward + backward of all its weights, at
   --layer-lengths tokens: mlx-lm's sequential path beside the chunked rule.
2. An 8-layer, hidden-512 Qwen3.5-shaped hybrid (6 gated-delta + 2 attention layers) beside a
   plain Qwen3 (8 attention layers) of the same width, MLP and vocabulary, built as mlxlab builds
   an mlx-lm model from its config (MLXLMDecoder(hf_config=...): the chunked rule swapped in at
   load, mlxlab's LoRA on attention, gated-delta projections and MLPs, rank 8), random weights,
   batch 1: one LoRA loss + gradient at --model-lengths tokens. The hybrid's sequential path
   (mlx-lm's own) at the lengths up to --sequential-max.

    python benchmarks/memory/bench_hybrid_memory.py [--layer-lengths 256,512,1024,2048,4096]
        [--model-lengths 512,1024,2048,4096] [--sequential-max 2048]
        [--model-sequential-max 1024]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # benchmarks.*

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from mlx_lm.models import qwen3_5  # noqa: E402

from benchmarks.harness import add_options, print_table, write_record  # noqa: E402
from mlxlab.models.decoders.gated_delta_swap import ORIGINALS  # noqa: E402
from mlxlab.models.decoders.mlx_lm_decoder import MLXLMDecoder  # noqa: E402

MB = 1 << 20
WIDTH = {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 8,
         "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 64,
         "vocab_size": 8192, "rms_norm_eps": 1e-6, "max_position_embeddings": 8192,
         "tie_word_embeddings": False}
# Qwen3-Next's proportions at hidden 512: value heads x 128 = 2 x hidden, key heads half of them
GATED_DELTA = {"linear_num_key_heads": 4, "linear_num_value_heads": 8,
               "linear_key_head_dim": 128, "linear_value_head_dim": 128,
               "linear_conv_kernel_dim": 4, "full_attention_interval": 4}
HYBRID = {"model_type": "qwen3_5",
          "text_config": {**WIDTH, **GATED_DELTA, "model_type": "qwen3_5_text"}}
PLAIN = {**WIDTH, "model_type": "qwen3", "rope_theta": 1e6}
LORA_TARGETS = ["query", "key", "value", "out", "in_proj_qkv", "in_proj_z", "gate_proj",
                "up_proj", "down_proj"]  # "out" is also the gated-delta layers' out_proj
LORA = {"rank": 8, "alpha": 16.0}


def peak_mb(run: Callable[[], object]) -> float:
    """MLX's peak of active memory over `run()` (its result evaluated), in MB."""
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    mx.eval(run())
    return mx.get_peak_memory() / MB


class sequential:  # noqa: N801  (a context, named for what runs inside it)
    """mlx-lm's own gated_delta_update (its token loop in training) in the qwen3_5 and
    qwen3_next modules for the duration."""

    MODULES = ("qwen3_5", "qwen3_next")

    def __enter__(self) -> None:
        import importlib

        self.kept = {}
        for name in self.MODULES:
            module = importlib.import_module(f"mlx_lm.models.{name}")
            self.kept[module] = module.gated_delta_update
            module.gated_delta_update = ORIGINALS.get(module.gated_delta_update,
                                                      module.gated_delta_update)

    def __exit__(self, *exc: object) -> None:
        for module, function in self.kept.items():
            module.gated_delta_update = function


def layer_peaks(lengths: list[int], sequential_max: int) -> dict:
    """One GatedDeltaNet's forward + backward (its weights), both paths, MB by length."""
    from mlxlab.models.decoders.gated_delta_swap import chunked_in_training

    args = qwen3_5.TextModelArgs.from_dict(HYBRID["text_config"])
    layer = qwen3_5.GatedDeltaNet(args)
    layer.train()
    mx.eval(layer.parameters())
    own = qwen3_5.gated_delta_update
    original = ORIGINALS.get(own, own)
    paths = {"sequential (mlx-lm)": original, "chunked": chunked_in_training(original)}
    rows = {}
    for length in lengths:
        x = mx.random.normal((1, length, args.hidden_size))
        step = nn.value_and_grad(layer, lambda m, x=x: m(x).square().mean())
        row = {}
        for name, function in paths.items():
            if name.startswith("sequential") and length > sequential_max:
                continue
            qwen3_5.gated_delta_update = function
            row[name] = peak_mb(lambda step=step, x=x: step(layer, x))
        rows[length] = row
        print(f"layer {length}: {row}", flush=True)
    qwen3_5.gated_delta_update = own
    return rows


def model_step(config: dict, length: int) -> tuple[Callable[[], object], float]:
    """mlxlab's mlx-lm decoder built from `config` with LoRA: one loss + gradient at `length`,
    and the MB its weights (base and adapters) hold."""
    model = MLXLMDecoder(vocab_size=WIDTH["vocab_size"], hf_config=config,
                         lora={**LORA, "targets": LORA_TARGETS})
    model.train()
    mx.eval(model.parameters())
    ids = mx.random.randint(0, WIDTH["vocab_size"], (1, length + 1))

    def loss(m: nn.Module) -> mx.array:
        return nn.losses.cross_entropy(m(ids[:, :-1]), ids[:, 1:]).mean()

    value_grad = nn.value_and_grad(model, loss)
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters())) / MB
    return (lambda: value_grad(model)), weights


def model_peaks(lengths: list[int], sequential_max: int) -> dict:
    """Each length's peaks (MB) and their ratio, whole and above the weights."""
    rows = {}
    for length in lengths:
        # one model alive at a time: each peak holds its own weights only
        plain, plain_weights = model_step(PLAIN, length)
        row = {"plain qwen3": peak_mb(plain), "plain weights": plain_weights}
        del plain
        hybrid, hybrid_weights = model_step(HYBRID, length)
        row.update({"hybrid, chunked": peak_mb(hybrid), "hybrid weights": hybrid_weights})
        if length <= sequential_max:
            with sequential():
                row["hybrid, sequential (mlx-lm)"] = peak_mb(hybrid)
        del hybrid
        row["hybrid / plain"] = row["hybrid, chunked"] / row["plain qwen3"]
        row["above weights: hybrid / plain"] = ((row["hybrid, chunked"] - hybrid_weights)
                                               / (row["plain qwen3"] - plain_weights))
        rows[length] = row
        print(f"model {length}: {row}", flush=True)
    return rows


def table(rows: dict, columns: list[str]) -> dict:
    body = [[f"{length:,}", *(f"{row[c]:,.2f}" if c.endswith(" / plain") else
                              f"{row[c]:,.0f}" if c in row else "-" for c in columns)]
            for length, row in rows.items()]
    return {"head": ["tokens", *columns], "rows": body}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_options(parser, layer_lengths=("256,512,1024,2048,4096", "one layer's lengths"),
                model_lengths=("512,1024,2048,4096", "the models' lengths"),
                sequential_max=(2048, "the longest sequential (token loop) layer run"),
                model_sequential_max=(1024, "the longest sequential hybrid model run"))
    opts = parser.parse_args()
    if opts.smoke:
        opts.layer_lengths, opts.model_lengths = "70", "70"
    layer = layer_peaks([int(n) for n in opts.layer_lengths.split(",")], opts.sequential_max)
    model = model_peaks([int(n) for n in opts.model_lengths.split(",")],
                        opts.model_sequential_max)
    tables = {"layer": table(layer, ["sequential (mlx-lm)", "chunked"]),
              "model": table(model, ["plain qwen3", "hybrid, chunked",
                                     "hybrid, sequential (mlx-lm)", "hybrid / plain",
                                     "plain weights", "hybrid weights",
                                     "above weights: hybrid / plain"])}
    for t in tables.values():
        print_table(t)
    longest = max(model)
    write_record("hybrid-memory", {"tables": tables, "layer_mb": layer, "model_mb": model,
                                   "hybrid": HYBRID, "plain": PLAIN, "lora": LORA,
                                   "lora_targets": LORA_TARGETS},
                 question="memory", reference="a plain qwen3 of the same width and depth",
                 ratio=round(model[longest]["hybrid / plain"], 3), smoke=opts.smoke,
                 summary=f"MLX peak of a LoRA step, Qwen3.5-shaped hybrid (chunked gated delta) "
                         f"over plain Qwen3, {longest:,} tokens (lower is better)")


if __name__ == "__main__":
    main()
