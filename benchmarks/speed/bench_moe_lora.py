"""Adapters on a MoE model's routed experts: tokens/s and peak memory with attention-only vs
attention + expert adapters, mlxlab beside mlx_lm.lora's own expert LoRA (LoRASwitchLinear).

    python benchmarks/speed/bench_moe_lora.py [--layers 2] [--seq 256] [--steps 6] [--rounds 1]
                                               [--tools mlxlab,mlx-lm-openblas] [--work DIR]

The model: Qwen3-30B-A3B's layer shape with random N(0, 0.02) float32 weights (hidden 2048, 32
query / 4 key-value heads of 128, 128 experts of 768, 8 a token, q/k norms), reduced to what a
24 GB machine trains: `--layers` of its 48 and the 512-token BPE of scripts/tiny_hf_model.py (its
151,936-token vocabulary would add 622M parameters of embedding and head that neither adapter
touches). Written with MLX in mlx-lm's stacked layout (switch_mlp), which mlx-lm and mlxlab load
alike. Both tools train LoRA rank 8 (scale 2) at batch 2 on bench_lora.py's long rows, every
position trained: `attention` = q/k/v/o, `experts` = q/k/v/o + every expert's gate/up/down
(mlxlab `model.lora.targets=[query,key,value,out,experts]`, mlx-lm's keys
`mlp.switch_mlp.*_proj`). tokens/s and MLX's peak as bench_lora.py measures them (its
run_mlxlab / run_mlx_lm); `mlx-lm-openblas` is mlx-lm on the same OpenBLAS as mlxlab.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))
from benchmarks.harness import add_smoke, cpu_model  # noqa: E402
from benchmarks.speed.bench_lora import (  # noqa: E402
    MLX_LM_KEYS,
    print_table,
    run_mlx_lm,
    run_mlxlab,
    summarize,
    write_data,
)

# Qwen3-30B-A3B's config.json, but its layer count and vocabulary (module docstring)
SHAPE = dict(hidden_size=2048, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
             num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
             intermediate_size=6144)
SMOKE_SHAPE = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                   intermediate_size=128)
TARGETS = {"attention": ("query,key,value,out", MLX_LM_KEYS),
           "experts": ("query,key,value,out,experts",
                       [*MLX_LM_KEYS, "mlp.switch_mlp.gate_proj", "mlp.switch_mlp.up_proj",
                        "mlp.switch_mlp.down_proj"])}
BATCH = 2


def write_model(path: Path, layers: int, shape: dict, std: float = 0.02) -> Path:
    """A random qwen3_moe folder of `shape` in mlx-lm's stacked layout (module docstring)."""
    import mlx.core as mx

    from tiny_hf_model import tiny_tokenizer

    if (path / "config.json").exists():
        return path
    path.mkdir(parents=True, exist_ok=True)
    tok = tiny_tokenizer("qwen2", 512)
    vocab, h = tok.get_vocab_size(), shape["hidden_size"]
    heads, kv, hd = shape["num_attention_heads"], shape["num_key_value_heads"], shape["head_dim"]
    experts, ffn = shape["num_experts"], shape["moe_intermediate_size"]
    config = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
              "vocab_size": vocab, "num_hidden_layers": layers, **shape,
              "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True,
              "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
              "tie_word_embeddings": False, "torch_dtype": "float32",
              "eos_token_id": tok.token_to_id("<|endoftext|>")}
    key = mx.random.key(0)

    def normal(*dims: int) -> mx.array:
        nonlocal key
        key, sub = mx.random.split(key)
        return std * mx.random.normal(dims, key=sub)

    weights = {"model.embed_tokens.weight": normal(vocab, h), "model.norm.weight": mx.ones((h,)),
               "lm_head.weight": normal(vocab, h)}
    for i in range(layers):
        p = f"model.layers.{i}."
        weights.update({
            p + "self_attn.q_proj.weight": normal(heads * hd, h),
            p + "self_attn.k_proj.weight": normal(kv * hd, h),
            p + "self_attn.v_proj.weight": normal(kv * hd, h),
            p + "self_attn.o_proj.weight": normal(h, heads * hd),
            p + "self_attn.q_norm.weight": mx.ones((hd,)),
            p + "self_attn.k_norm.weight": mx.ones((hd,)),
            p + "mlp.gate.weight": normal(experts, h),
            p + "mlp.switch_mlp.gate_proj.weight": normal(experts, ffn, h),
            p + "mlp.switch_mlp.up_proj.weight": normal(experts, ffn, h),
            p + "mlp.switch_mlp.down_proj.weight": normal(experts, h, ffn),
            p + "input_layernorm.weight": mx.ones((h,)),
            p + "post_attention_layernorm.weight": mx.ones((h,)),
        })
        mx.eval(weights)
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    (path / "config.json").write_text(json.dumps(config, indent=2))
    tok.save(str(path / "tokenizer.json"))
    specials = {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    (path / "tokenizer_config.json").write_text(json.dumps(
        {**specials, "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2))
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--skip", type=int, default=2, help="first steps left out (compiling)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--tools", default="mlxlab,mlx-lm-openblas")
    p.add_argument("--targets", default="attention,experts")
    p.add_argument("--work", default=None)
    add_smoke(p)
    args = p.parse_args()
    shape = SMOKE_SHAPE if args.smoke else SHAPE
    if args.smoke:
        args.layers, args.seq, args.steps, args.skip = 1, 32, 2, 0
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_moe_lora_"))
    model = write_model(work / ("smoke-model" if args.smoke else f"qwen3-30b-a3b-{args.layers}l"),
                        args.layers, shape)
    data = write_data(work / f"data-{args.seq}", seq=args.seq)["long"]
    tools, results = args.tools.split(","), {}
    for rnd in range(args.rounds):
        for target in args.targets.split(","):
            for tool in tools if rnd % 2 == 0 else tools[::-1]:
                out = work / "runs" / f"{target}-{tool}-{rnd}"
                mlxlab_targets, keys = TARGETS[target]
                if tool == "mlxlab":
                    steps = run_mlxlab(model, data, "long", args.steps, out, args.seq,
                                       targets=mlxlab_targets, batch=BATCH)
                else:
                    steps = run_mlx_lm(model, data, "long", args.steps, out,
                                       openblas=tool.endswith("openblas"), seq=args.seq,
                                       keys=keys, batch=BATCH)
                s = summarize(steps, args.skip)
                results.setdefault((target, tool), []).append(s)
                print(json.dumps({"round": rnd, "targets": target, "tool": tool, **s}), flush=True)
    print(f"\n{cpu_model()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f} at the end; "
          f"qwen3_moe {shape['num_experts']} experts x {shape['moe_intermediate_size']}, "
          f"{shape['num_experts_per_tok']} a token, hidden {shape['hidden_size']}, {args.layers} "
          f"layers; batch {BATCH} x {args.seq} positions; {args.steps} steps, the first "
          f"{args.skip} left out; median of {args.rounds} rounds\n")
    print_table(results, args.targets.split(","), tools, "adapters on")

if __name__ == "__main__":
    main()
