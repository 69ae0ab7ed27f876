"""A hybrid's training memory and step: mlxlab's gated delta rule (models/layers/gated_delta.py)
beside mlx-lm's token loop, and Qwen3.5-shaped and Mamba-2 hybrids beside a plain Qwen3 of the
same width and depth. MLX peak memory (mx.get_peak_memory: the active buffers, independent of the
box's load), each case after mx.clear_cache and mx.reset_peak_memory.

1. One Qwen3.5 GatedDeltaNet layer, forward + backward, at --layer-lengths: mlx-lm's loop beside
   mlxlab's rule.
2. An 8-layer, hidden-512 Qwen3.5-shaped hybrid (6 gated-delta + 2 attention layers), a plain
   Qwen3 (8 attention layers) and the Mamba-2 families (Nemotron-H, Granite-4.0-H: 6 Mamba-2 + 2
   attention mixers; Falcon-H1: 8 parallel pairs; --families picks), built as mlxlab builds an
   mlx-lm model from its config (MLXLMDecoder(hf_config=...), LoRA rank 8 on attention, mixer
   projections and MLPs), random weights, batch 1: one LoRA loss + gradient at --model-lengths;
   the hybrid and plain model also with grad_checkpoint at --checkpoint-lengths.
3. mlx-lm's own path (its model, LoRA and loss; mlxlab never imported) at --mlx-lm-lengths, each
   in a subprocess a watchdog stops once its resident memory passes --guard-mb.
--shape qwen3.5-0.8b takes Qwen3.5-0.8B's published text config instead (24 layers, hidden 1024,
vocabulary 248,320; 18 gated delta + 6 attention layers) and a plain Qwen3 of that width, depth,
heads, MLP and vocabulary, LoRA on mlxlab's default targets, for every sweep. A case whose peak,
extrapolated from its shorter lengths (before any, from its weights and logits), would pass
--guard-mb is skipped.

--step-time times the step instead: the plain model's and --families' (the hybrid's) loss +
gradient at each --model-lengths, each (model, length) in its own process (one model's compiled
kernels and cache never help another), --repeats rounds in alternating order, the median of
--steps steps after a warm-up; each figure over the plain model's, per round; denormals flushed;
--shape's models. --mixers MODE: the hybrids with trainer.grad_checkpoint=MODE, mixers or cores.

    python benchmarks/memory/bench_hybrid_memory.py    (--help: each option's default)
    python benchmarks/memory/bench_hybrid_memory.py --step-time --model-lengths 2048,4096
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from statistics import median

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # benchmarks.*

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from mlx_lm.models import qwen3_5  # noqa: E402

from benchmarks import harness as h  # noqa: E402
from mlxlab import kernels  # noqa: E402
from mlxlab.models.decoders.gated_delta_swap import ORIGINALS  # noqa: E402
from mlxlab.models.decoders.mlx_lm_decoder import MLXLMDecoder  # noqa: E402
from mlxlab.models.layers import grad_checkpoint  # noqa: E402
from mlxlab.objectives.losses import task_loss  # noqa: E402

MB = 1 << 20
WIDTH = {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 8,
         "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 64,
         "vocab_size": 8192, "rms_norm_eps": 1e-6, "max_position_embeddings": 8192,
         "tie_word_embeddings": False}
# Qwen3-Next's proportions at hidden 512: value heads x 128 = 2 x hidden, key heads half of them
GATED_DELTA = {"linear_num_key_heads": 4, "linear_num_value_heads": 8,
               "linear_key_head_dim": 128, "linear_value_head_dim": 128,
               "linear_conv_kernel_dim": 4, "full_attention_interval": 4}


def hybrid_and_plain(width: dict, gated_delta: dict, rope_theta: float) -> dict[str, dict]:
    """A Qwen3.5 text config (gated delta layers, every `full_attention_interval`-th attention)
    and a plain Qwen3 of the same width, depth, heads, MLP and vocabulary."""
    return {"plain qwen3": {**width, "model_type": "qwen3", "rope_theta": rope_theta},
            "hybrid": {"model_type": "qwen3_5", "text_config": {
                **width, **gated_delta, "model_type": "qwen3_5_text"}}}


PLAIN, HYBRID = hybrid_and_plain(WIDTH, GATED_DELTA, 1e6).values()
LORA_TARGETS = ["query", "key", "value", "out", "in_proj_qkv", "in_proj_z", "gate_proj",
                "up_proj", "down_proj"]  # "out" is also the gated-delta layers' out_proj
LORA = {"rank": 8, "alpha": 16.0}
# Qwen3.5-0.8B's published text config (the hub's Qwen/Qwen3.5-0.8B config.json: 24 layers,
# 18 gated delta with 16 key and 16 value heads of 128, every 4th attention with 8 query and 2
# key/value heads of 256, the embeddings tied as the output head), beside a plain Qwen3 of that
# width, depth, heads, MLP and vocabulary; LoRA on mlxlab's default targets
# (conf/model/hf_decoder.yaml), which reach the gated delta layers' in_proj_qkv and out_proj
SHAPES = {
    "small": {"families": None, "lora_targets": LORA_TARGETS, "label": "Qwen3.5-shaped"},
    "qwen3.5-0.8b": {
        "families": hybrid_and_plain(
            {"hidden_size": 1024, "intermediate_size": 3584, "num_hidden_layers": 24,
             "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 256,
             "vocab_size": 248320, "rms_norm_eps": 1e-6, "max_position_embeddings": 262144,
             "tie_word_embeddings": True},
            {"linear_num_key_heads": 16, "linear_num_value_heads": 16,
             "linear_key_head_dim": 128, "linear_value_head_dim": 128,
             "linear_conv_kernel_dim": 4, "full_attention_interval": 4,
             "rope_parameters": {"type": "default", "mrope_section": [11, 11, 10],
                                 "rope_theta": 1e7, "partial_rotary_factor": 0.25}},
            1e7),
        "lora_targets": ["query", "key", "value", "out"], "label": "Qwen3.5-0.8B-shaped"},
}
# Mamba-2 mixers at hidden 512 in Nemotron-H's proportions (heads x head dim = 2 x hidden,
# state 128), 6 of them and 2 attention mixers as the hybrid has; Falcon-H1 runs both in each layer
MIXERS = ["mamba"] * 3 + ["attention"] + ["mamba"] * 3 + ["attention"]
FAMILIES = {
    "plain qwen3": PLAIN, "hybrid": HYBRID,
    "nemotron_h": {**WIDTH, "model_type": "nemotron_h", "attention_bias": False,
                   "hybrid_override_pattern": list("M-M-M-*-M-M-M-*-"), "mamba_num_heads": 16,
                   "mamba_head_dim": 64, "ssm_state_size": 128, "n_groups": 2, "conv_kernel": 4,
                   "mamba_proj_bias": False, "mlp_bias": False, "layer_norm_epsilon": 1e-5,
                   "use_bias": False, "use_conv_bias": True},
    "granitemoehybrid": {**WIDTH, "model_type": "granitemoehybrid", "attention_bias": False,
                         "embedding_multiplier": 12.0, "attention_multiplier": 1 / 64,
                         "logits_scaling": 8.0, "residual_multiplier": 0.22,
                         "layer_types": MIXERS, "shared_intermediate_size": 1536,
                         "mamba_n_heads": 16, "mamba_d_head": 64, "mamba_proj_bias": False,
                         "mamba_d_state": 128, "mamba_d_conv": 4, "mamba_n_groups": 1,
                         "mamba_conv_bias": True},
    "falcon_h1": {**WIDTH, "model_type": "falcon_h1", "mamba_n_heads": 16, "mamba_d_head": 64,
                  "mamba_d_ssm": 1024, "mamba_d_state": 128, "mamba_n_groups": 2},
}
REFERENCE = "plain qwen3"
# mlx_lm.lora's step as it runs it (rank 8, scale 2 on every linear layer, its default_loss),
# in a process that never imports mlxlab: argv = the hybrid's config, the length
MLX_LM_WORKER = """
import json, sys
import mlx.core as mx, mlx.nn as nn
from mlx_lm.models import qwen3_5
from mlx_lm.tuner.trainer import default_loss
from mlx_lm.tuner.utils import linear_to_lora_layers
config, length = json.loads(sys.argv[1]), int(sys.argv[2])
model = qwen3_5.Model(qwen3_5.ModelArgs.from_dict(config))
model.freeze()
linear_to_lora_layers(model, len(model.layers), {"rank": 8, "scale": 2.0, "dropout": 0.0})
model.train()
mx.eval(model.parameters())
batch = mx.random.randint(0, config["text_config"]["vocab_size"], (1, length + 1))
step = nn.value_and_grad(model, default_loss)
mx.reset_peak_memory()
mx.eval(step(model, batch, mx.array([[0, length]])))
print(mx.get_peak_memory() / 2**20)
"""


def peak_mb(run: Callable[[], object]) -> float:
    """MLX's peak of active memory over `run()` (its result evaluated), in MB."""
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    mx.eval(run())
    return mx.get_peak_memory() / MB


def layer_peaks(lengths: list[int], sequential_max: int, hybrid: dict = HYBRID) -> dict:
    """One GatedDeltaNet of `hybrid`'s forward + backward (its weights), both paths, MB by
    length."""
    from mlxlab.models.decoders.gated_delta_swap import chunked_in_training

    args = qwen3_5.TextModelArgs.from_dict(hybrid["text_config"])
    layer = qwen3_5.GatedDeltaNet(args).train()
    mx.eval(layer.parameters())
    own = qwen3_5.gated_delta_update
    original = ORIGINALS.get(own, own)
    paths = {"sequential (mlx-lm)": original, "mlxlab": chunked_in_training(original)}
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


def vocabulary(config: dict) -> int:
    return config.get("vocab_size") or config["text_config"]["vocab_size"]


def model_step(config: dict, length: int, checkpoint: bool | str = False,
               targets: list[str] = LORA_TARGETS, head_chunk: int = 0
               ) -> tuple[Callable[[], object], float]:
    """mlxlab's mlx-lm decoder built from `config` with LoRA on `targets` (its blocks recomputed
    in the backward with `checkpoint`, its mixers with "mixers" or "cores"): loss + gradient
    at `length`, and the MB its weights (base and adapters) hold. The loss is a run's
    (objective.head_chunk=`head_chunk`)."""
    vocab = vocabulary(config)
    model = MLXLMDecoder(vocab_size=vocab, hf_config=config, lora={**LORA, "targets": targets})
    if checkpoint in ("mixers", "cores") and grad_checkpoint.recurrent_mixers(model):
        grad_checkpoint.checkpoint_mixers(model, cores=checkpoint == "cores")
    elif checkpoint is True:
        grad_checkpoint.checkpoint_blocks(model)
    mx.eval(model.train().parameters())
    ids = mx.random.randint(0, vocab, (1, length + 1))  # head_chunk where the model splits it
    loss = task_loss("lm", head_chunk=head_chunk if model.head_split() else 0)
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    value_grad = nn.value_and_grad(model, lambda m: loss(m, batch)[0])
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters())) / MB
    return (lambda: value_grad(model)), weights


def expected_mb(seen: dict[int, float], weights: float, length: int, vocab: int = 0,
                head_chunk: int = 0) -> float:
    """A case's peak at `length` from its measured ones: the memory above the weights grown at
    the power its last two lengths show (at least linear; squared after a single length). Before
    any, the float32 logits over `vocab` and their gradient, both alive in the head's backward
    (the floor that dominates at a real vocabulary; `head_chunk` positions of them at a time)."""
    if not seen:
        return weights + 2 * min(length, head_chunk or length) * vocab * 4 / MB
    (n1, p1), (n2, p2) = ([(0, 0.0)] + sorted(seen.items()))[-2:]
    power = max(1.0, math.log((p2 - weights) / (p1 - weights)) / math.log(n2 / n1)) if n1 else 2.0
    return weights + (p2 - weights) * (length / n2) ** power


def guarded_sweep(columns: dict[str, dict], lengths: list[int], guard: float, label: str,
                  **build: object) -> dict:
    """Each column's peak (MB) at each length, one model alive at a time; a case expected over
    `guard` MB is not run (its row says what was expected)."""
    rows, seen, weights = {}, {name: {} for name in columns}, {}
    for length in lengths:
        row = {}
        for name, config in columns.items():
            vocab = vocabulary(config)
            chunk = int(build.get("head_chunk") or 0)
            step, expected = None, expected_mb(seen[name], weights.get(name, 0.0), length, vocab,
                                               chunk)
            if expected <= guard:  # built: its weights counted too
                step, weights[name] = model_step(config, length, **build)
                expected = expected_mb(seen[name], weights[name], length, vocab, chunk)
            if expected > guard:
                row[name] = f"skipped: {expected:,.0f} expected"
            else:
                started = time.perf_counter()
                row[name] = seen[name][length] = peak_mb(step)
                row[f"{name} weights"] = weights[name]
                row[f"{name} s"] = time.perf_counter() - started  # the step, its build apart
            del step
        if isinstance(base := row.get(REFERENCE), float):
            row.update({f"{n} / plain": row[n] / base for n in columns
                        if n != REFERENCE and isinstance(row.get(n), float)})
        rows[length] = row
        print(f"{label} {length}: {row}", flush=True)
    return rows


def mlx_lm_peaks(lengths: list[int], guard: float, hybrid: dict = HYBRID) -> dict:
    """mlx-lm's own LoRA step on `hybrid` (MLX_LM_WORKER in a fresh process), each length
    stopped by a watchdog once the process's resident memory passes `guard` MB."""
    rows = {}
    for length in lengths:
        worker = subprocess.Popen([sys.executable, "-c", MLX_LM_WORKER, json.dumps(hybrid),
                                   str(length)], stdout=subprocess.PIPE, text=True)
        top = 0.0
        while worker.poll() is None:
            with contextlib.suppress(FileNotFoundError):  # gone once it exited
                top = max(top, h.rss_mb(worker.pid))
            if top > guard:
                worker.kill()
            time.sleep(0.1)
        out = worker.stdout.read().strip()
        rows[length] = {"mlx-lm, sequential": float(out) if worker.returncode == 0 and out
                        else f"stopped: resident {top:,.0f} > {guard:,.0f}", "resident MB": top}
        print(f"mlx-lm {length}: {rows[length]}", flush=True)
    return rows


def step_worker(family: str, length: int, steps: int, checkpoint: bool | str, shape: str,
                head_chunk: int) -> None:
    """One process of --step-time: `family`'s step at `length` (`shape`'s), a warm-up, then the
    median of `steps` timed (s), printed."""
    step, _ = model_step((SHAPES[shape]["families"] or FAMILIES)[family], length, checkpoint,
                         SHAPES[shape]["lora_targets"], head_chunk)
    mx.eval(step())
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        mx.eval(step())
        seconds.append(time.perf_counter() - start)
    print(median(seconds))


def step_times(lengths: list[int], repeats: int, steps: int, smoke: bool, mixers: str,
               families: list[str], shape: str, head_chunk: int) -> None:
    """--step-time: the plain model's and the families' steps, a process each, alternating."""
    pair, rounds = (REFERENCE, *families), {n: [] for n in lengths}
    for length, r in ((n, r) for n in lengths for r in range(repeats)):
        rounds[length].append(row := {family: float(subprocess.run(
            [sys.executable, __file__, "--step-worker", family, "--model-lengths", str(length),
             "--steps", str(steps), "--shape", shape, "--head-chunk", str(head_chunk),
             *(["--mixers", mixers] if mixers else [])],
            capture_output=True, text=True, check=True).stdout.split()[-1])
            for family in h.in_round(list(pair), r)})
        print(f"{length} round {r + 1}: " + "  ".join(f"{k} {v:.2f} s" for k, v in row.items()),
              flush=True)
    ratios = {(n, f): sorted(row[f] / row[REFERENCE] for row in rounds[n]) for n in lengths
              for f in families}
    shown = {"head": ["tokens", *(f"{f} s / step" for f in pair),
                      *(f"{f} / plain" for f in families)],
             "rows": [[f"{n:,}", *(f"{median(r[f] for r in rounds[n]):.2f}" for f in pair),
                       *(f"{median(x):.2f}x ({x[0]:.2f}-{x[-1]:.2f})"
                         for x in (ratios[n, f] for f in families))] for n in lengths]}
    h.print_table(shown)
    tail = "".join(f"-{f}" for f in (shape, mixers, *families) if f not in ("small", "", "hybrid"))
    h.write_record("hybrid-step" + tail.replace("_", "-"),
                   {"rounds": rounds, "table": shown, "steps": steps}, question="speed-mlx",
                   reference="a plain qwen3 of the same width and depth", smoke=smoke,
                   ratio=round(median(ratios[lengths[-1], families[0]]), 3),
                   summary=f"LoRA step time (loss + gradient), {families[0]} over plain Qwen3, "
                           f"{lengths[-1]:,} tokens{f' (grad_checkpoint={mixers})' * bool(mixers)} "
                           "(lower is better)")


def table(rows: dict, columns: list[str]) -> dict:
    def cell(row: dict, column: str) -> str:
        value = row.get(column, "-")
        return value if isinstance(value, str) else f"{value:,.{2 * column.endswith(' / plain')}f}"

    return {"head": ["tokens", *columns],
            "rows": [[f"{length:,}", *(cell(row, c) for c in columns)]
                     for length, row in rows.items()]}


def lengths(text: str) -> list[int]:
    return [int(n) for n in text.split(",") if n]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    h.add_options(parser, layer_lengths=("256,512,1024,2048,4096", "one layer's lengths"),
                  model_lengths=("512,1024,2048,4096,8192", "the models' lengths"),
                  checkpoint_lengths=("2048,4096,8192,16384", "the lengths with grad_checkpoint"),
                  sequential_max=(2048, "the longest sequential (token loop) layer run"),
                  mlx_lm_lengths=("512,2048", "mlx-lm's own path's lengths (watchdog-guarded)"),
                  guard_mb=(8000.0, "the largest peak or resident MB a case may reach"),
                  shape=("small", f"the models' shape: {' | '.join(SHAPES)} (a published one: "
                                  "its hybrid and plain Qwen3 alone)"),
                  families=(None, f"the model sweep's families (separated by ;; the small shape's: "
                                  f"{'; '.join(FAMILIES)}); default all the shape's"),
                  step_time=(False, "time the plain and hybrid steps at --model-lengths instead"),
                  mixers=("", "the hybrids with grad_checkpoint=MODE: mixers or cores"),
                  repeats=(3, "--step-time's rounds"), steps=(3, "--step-time's timed steps"),
                  head_chunk=(0, "objective.head_chunk (MLX's memory limit then --guard-mb)"))
    parser.add_argument("--step-worker", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    kernels.flush_denormals(True)  # as the training loop does (trainer.flush_denormals)
    if opts.shape not in SHAPES:
        parser.error(f"--shape {opts.shape}: one of {', '.join(SHAPES)}")
    if opts.step_worker:
        return step_worker(opts.step_worker, int(opts.model_lengths), opts.steps,
                           opts.mixers or False, opts.shape, opts.head_chunk)
    if opts.step_time:
        if opts.smoke:
            opts.model_lengths, opts.repeats, opts.steps = "64", 1, 1
        timed = [f for f in (opts.families or "hybrid").split(";") if f and f != REFERENCE]
        if not timed or set(timed) - set(catalog := SHAPES[opts.shape]["families"] or FAMILIES):
            parser.error(f"--families: names from {'; '.join(catalog)}")
        return step_times(lengths(opts.model_lengths), opts.repeats, opts.steps, opts.smoke,
                          opts.mixers, timed, opts.shape, opts.head_chunk)
    shape = SHAPES[opts.shape]
    catalog = shape["families"] or FAMILIES
    names = [n for n in (opts.families or ";".join(catalog)).split(";") if n]
    families = {n: catalog[n] for n in names if n in catalog}
    if len(families) < len(names) or "hybrid" not in families:
        parser.error(f"--families: names from {'; '.join(catalog)}, with 'hybrid' (and "
                     f"{REFERENCE!r} for the ratios)")
    if opts.smoke:
        opts.layer_lengths = opts.model_lengths = opts.checkpoint_lengths = "70"
        opts.mlx_lm_lengths = "70"
    guard = opts.guard_mb
    hybrid, targets = catalog["hybrid"], shape["lora_targets"]
    layer = layer_peaks(lengths(opts.layer_lengths), opts.sequential_max, hybrid)
    build = {"targets": targets, "head_chunk": opts.head_chunk}
    mx.set_memory_limit(int(guard * MB) if opts.head_chunk else mx.get_memory_limit())
    model = guarded_sweep(families, lengths(opts.model_lengths), guard, "model",
                          checkpoint=opts.mixers or False, **build)
    kept = guarded_sweep({n: catalog[n] for n in (REFERENCE, "hybrid") if n in families},
                         lengths(opts.checkpoint_lengths), guard, "grad_checkpoint",
                         checkpoint=True, **build)
    mlx_lm = mlx_lm_peaks(lengths(opts.mlx_lm_lengths), guard, hybrid)
    pair = [REFERENCE, "hybrid", "hybrid / plain"]
    tables = {"layer": table(layer, ["sequential (mlx-lm)", "mlxlab"]),
              "model": table(model, [*families, *(f"{n} / plain" for n in families
                                                  if n != REFERENCE),
                                     *(f"{n} weights" for n in families)]),
              "grad_checkpoint": table(kept, pair),
              "mlx-lm": table(mlx_lm, ["mlx-lm, sequential", "resident MB"])}
    for t in tables.values():
        h.print_table(t)
    # the ratio at the longest length both models ran, with grad_checkpoint if only there
    measured = next(((s, r) for s, r in (("", model), (" with grad_checkpoint", kept))
                     if any(isinstance(row.get(pair[2]), float) for row in r.values())), None)
    if measured is None and REFERENCE in families:  # the guard stopped both at every length
        parser.exit(1, "no length measured under --guard-mb\n")
    # the hybrid alone (--families hybrid): its own peak at the longest length it ran
    sweep, rows = measured or (" with grad_checkpoint" if kept else "", kept or model)
    column = pair[2] if measured else "hybrid"
    longest = max((n for n, row in rows.items() if isinstance(row.get(column), float)),
                  default=None)
    if longest is None:
        parser.exit(1, "no length measured under --guard-mb\n")
    # one summary row per shape and sweep (the page shows each name's newest record)
    name = ("hybrid-memory" + ("" if opts.shape == "small" else f"-{opts.shape}")
            + ("-grad-checkpoint" if sweep else "") + ("-head-chunk" if opts.head_chunk else "")
            + (f"-{opts.mixers}" if opts.mixers else "")
            + ("" if measured else "-hybrid-alone"))
    alone = {} if measured else {"table": table(rows, ["hybrid", "hybrid weights", "hybrid s"])}
    h.write_record(name, {**alone, "tables": tables, "layer_mb": layer, "model_mb": model,
                          "grad_checkpoint_mb": kept, "mlx_lm_mb": mlx_lm, "shape": opts.shape,
                          "families": families, "lora": LORA, "lora_targets": targets,
                          "guard_mb": guard, "head_chunk": opts.head_chunk, "mixers": opts.mixers},
                   question="memory", reference="a plain qwen3 of the same width and depth",
                   ratio=round(rows[longest][pair[2]], 3) if measured else None,
                   smoke=opts.smoke,
                   summary=f"MLX peak of a LoRA step, {shape['label']} hybrid (mlxlab's gated "
                           f"delta)" + (f" over plain Qwen3, {longest:,} tokens{sweep} (lower is "
                                        "better)" if measured else f", {longest:,} tokens{sweep}: "
                                        f"{rows[longest]['hybrid']:,.0f} MB"))


if __name__ == "__main__":
    main()
