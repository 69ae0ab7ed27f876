"""Vision-language LoRA speed and memory: mlxlab's `experiment=finetune_vision` beside mlx-vlm's
own trainer (`python -m mlx_vlm.train`, mlx-vlm 0.7.10), on the same rows, model folder, LoRA,
batch, steps and image size, each in its own process on the same MLX and OpenBLAS.

    python benchmarks/speed/bench_vision.py --shapes smolvlm --steps 6 --skip 2  (--help)

Random float32 models in the real shapes (never downloaded; tests/vision_models.py's tokenizer
and processor files): `smolvlm` (SmolVLM-256M: 512-pixel images, one row a batch, BATCH_LIMIT)
and `qwen2_5_vl` (Qwen2.5-VL-3B's widths, --qwen-layers layers, QLoRA 4-bit; 224-pixel images).
Rows: the shipped shapes task in each tool's format, the loss on the reply. LoRA rank 8 (alpha
16) on q/k/v/o, AdamW at 2e-4. Speed: the median step time after --skip (mlxlab's whole loop,
benchmarks.callbacks.StepTimes; mlx-vlm's step alone); peak: MLX's and the process's RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
import benchmarks.harness as h  # noqa: E402
from benchmarks.speed.bench_lora import lora_overrides  # noqa: E402
from benchmarks.speed.bench_lora import run_mlxlab as run_lora_mlxlab  # noqa: E402

RANK, ALPHA, LR = 8, 16.0, 2e-4
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
# the real checkpoints' sizes (their config.json); --qwen-layers cuts Qwen's layer counts
SMOLVLM_256M = dict(
    text=dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
              num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49280,
              max_position_embeddings=8192),
    vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, patch_size=16, image_size=512),
    scale_factor=4, image=512)
QWEN2_5_VL_3B = dict(
    text=dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
              num_attention_heads=16, num_key_value_heads=2, head_dim=128, vocab_size=151936,
              max_position_embeddings=128000, rms_norm_eps=1e-6),
    vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                out_hidden_size=2048, patch_size=14, spatial_merge_size=2,
                temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31]),
    image=224)
# mlx-vlm 0.7.10's trainer hands the model the rows' (B, T) padding mask as its `mask`, which
# SmolVLM's language model (idefics3/language.py) uses as the attention mask: (B, T) does not
# broadcast to the scores' (B, heads, T, T) for B > 1 (a ValueError), so SmolVLM runs one row a
# batch in both tools (at B = 1 the ones broadcast: an additive 1 on every score, which the
# softmax ignores, and no causal mask in mlx-vlm's forward; the cost of the step is the same)
BATCH_LIMIT = {"smolvlm": 1}
# smoke: the same families at toy sizes
SMOKE_SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16)

# mlx-vlm's own trainer (mlx_vlm.train.run, what its CLI calls) with a callback writing each
# per-step report as a json line. argv: report.jsonl CLI-ARGS...
MLX_VLM_WORKER = """
import json, sys
from mlxlab.runtime.compute.blas import setup_blas  # MLX's BLAS calls only; nothing else of mlxlab
print("blas:", setup_blas(), flush=True)
from mlx_vlm import train as cli
from mlx_vlm.trainer.common.callbacks import TrainingCallback

class Record(TrainingCallback):
    def on_train_loss_report(self, info):
        with open(sys.argv[1], "a") as f:
            f.write(json.dumps({k: v for k, v in info.items()
                                if isinstance(v, (int, float))}) + "\\n")

args, settings = cli.parse_args(sys.argv[2:])
cli.run(args, settings, training_callback=Record())
"""


def save_model(family: str, folder: Path, shape: dict, layers: int | None,
               smoke: bool) -> Path:
    """A `family` folder at `shape`'s sizes (random float32 weights), in the layout mlx-vlm reads,
    with tests/vision_models.py's tokenizer, template and processor files at `shape`'s image
    size."""
    if (folder / "config.json").exists():
        return folder
    import torch
    import transformers as tf

    sys.path.insert(0, str(REPO / "tests"))
    import vision_models as vm
    folder.mkdir(parents=True, exist_ok=True)
    _, tok = vm._tokenizer(family, folder)
    ids = {t: tok.token_to_id(t) for t in vm.FAMILIES[family]["tokens"]}
    eos, pad = ids[vm.FAMILIES[family]["eos"]], ids[vm.FAMILIES[family]["pad"]]
    text = {**shape["text"], "eos_token_id": eos, "pad_token_id": pad}
    vision = dict(shape["vision"])
    if smoke:
        text.update(SMOKE_SIZES, vocab_size=max(tok.get_vocab_size(), 512))
    if family == "smolvlm":
        if smoke:
            vision.update(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, image_size=64)
        config = tf.SmolVLMConfig(
            text_config={**text, "model_type": "llama", "rope_theta": 100000.0,
                         "rms_norm_eps": 1e-5, "tie_word_embeddings": False},
            vision_config=vision, scale_factor=2 if smoke else shape["scale_factor"],
            image_token_id=ids["<image>"], tie_word_embeddings=False, eos_token_id=eos,
            pad_token_id=pad)
    else:
        if layers:
            text["num_hidden_layers"] = layers
            vision.update(depth=layers, fullatt_block_indexes=[layers - 1])
        if smoke:
            vision.update(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                          out_hidden_size=64, fullatt_block_indexes=[1])
        half = text["head_dim"] // 2  # mrope over (time, height, width): the real 16/24/24 of 64
        section = [half // 4, 3 * half // 8, half - half // 4 - 3 * half // 8]
        config = tf.Qwen2_5_VLConfig(
            text_config={**text, "model_type": "qwen2_5_vl_text",
                         "rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                                             "mrope_section": section},
                         "tie_word_embeddings": True},
            vision_config=vision, image_token_id=ids["<|image_pad|>"],
            video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
            vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=True,
            eos_token_id=eos, pad_token_id=pad)
    torch.manual_seed(0)
    model = tf.AutoModelForImageTextToText.from_config(config).float().eval()
    model.save_pretrained(folder)
    del model
    vm._hub_layout(family, folder / "config.json")
    vm._processor_files(family, folder)
    _image_size(family, folder, 64 if smoke else shape["image"])
    return folder


def _image_size(family: str, folder: Path, size: int) -> None:
    """Every picture resized to `size` x `size` by the processor, one image (no tiles)."""
    path = folder / "preprocessor_config.json"
    pre = json.loads(path.read_text())
    if family == "smolvlm":
        pre.update(size={"longest_edge": size}, max_image_size={"longest_edge": size},
                   do_image_splitting=False)
        proc = json.loads((folder / "processor_config.json").read_text())
        config = json.loads((folder / "config.json").read_text())
        patches = config["vision_config"]["image_size"] // config["vision_config"]["patch_size"]
        proc["image_seq_len"] = patches ** 2 // config["scale_factor"] ** 2
        (folder / "processor_config.json").write_text(json.dumps(proc, indent=1))
    else:
        pre.update(min_pixels=size * size, max_pixels=size * size)
    path.write_text(json.dumps(pre, indent=1))


def both_formats(row: dict, base: Path) -> tuple[dict, dict]:
    """A shapes row as mlxlab's data=vision_chat reads it and as mlx-vlm's JSONL folder holds it
    (text messages and the row's `images`), its pictures under `base`."""
    images, messages = [], []
    for m in row["messages"]:
        parts = m["content"]
        images += [str(base / p["image"]) for p in parts if p["type"] == "image"]
        messages.append({"role": m["role"], "content": " ".join(p["text"] for p in parts
                                                                if p["type"] == "text")})
    user = [{"type": "image"}] * len(images) + [{"type": "text", "text": messages[0]["content"]}]
    ours = {"messages": [{"role": "user", "content": user}, *[
        {"role": m["role"], "content": [{"type": "text", "text": m["content"]}]}
        for m in messages[1:]]], "images": images}
    return ours, {"messages": messages, "images": images}


def write_rows(root: Path, rows: int) -> tuple[Path, Path]:
    """The shapes task's first `rows` training rows (and 8 validation rows) in both formats:
    (mlxlab's folder, mlx-vlm's folder)."""
    from mlxlab.config import asset_path

    source = Path(asset_path("shapes/train.jsonl"))
    lines = source.read_text().splitlines()
    folders = root / "mlxlab", root / "mlx_vlm"
    for split, chosen in (("train", lines[:rows]), ("valid", lines[rows:rows + 8])):
        converted = [both_formats(json.loads(line), source.parent) for line in chosen]
        for i, folder in enumerate(folders):
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{split}.jsonl").write_text("".join(json.dumps(r[i]) + "\n" for r in converted))
    return folders


def run_mlxlab(model: Path, data: Path, steps: int, batch: int, quantize: bool, out: Path,
               env: dict) -> dict:
    return run_lora_mlxlab(out, [
        "experiment=finetune_vision", *lora_overrides(model, data, steps, batch=batch, lr=LR),
        f"model.quantize={4 if quantize else 'null'}", f"trainer.eval_every_steps={10 * steps}",
        "optimizer.weight_decay=0.0"], env, step_times=True)


def run_mlx_vlm(model: Path, data: Path, steps: int, batch: int, quantize: bool, out: Path,
                env: dict) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    report = out / "report.jsonl"
    args = ["--model", str(model), "--data", str(data), "--iters", str(steps),
            "--batch-size", str(batch), "--learning-rate", str(LR), "--optimizer", "adamw",
            "--weight-decay", "0", "--lora-rank", str(RANK), "--lora-alpha", str(ALPHA),
            "--target-modules", *TARGETS, "--train-on-completions", "--steps-per-report", "1",
            "--steps-per-eval", str(10 * steps), "--steps-per-save", str(10 * steps),
            "--val-batches", "1", "--adapter-file", str(out / "adapters.safetensors")]
    if quantize:
        args += ["--quantization-bits", "4", "--quantization-group-size", "64"]
    _, rss = h.run_with_peak_rss([sys.executable, "-c", MLX_VLM_WORKER, str(report), *args],
                                 what="mlx-vlm", log=out.parent / f"{out.name}.log", cwd=out, env=env)
    rows = [json.loads(line) for line in report.read_text().splitlines()]
    return {"steps": [{"step": r["iteration"], "tokens_per_sec": r["tokens_per_second"],
                       "peak_mb": r["peak_memory"] * 1e9 / 2**20, "loss": r["train_loss"],
                       "seconds": r["step_time"]} for r in rows], "rss_mb": rss}


def summarize(run: dict, skip: int) -> dict:
    steps = run["steps"]
    timed = [s for s in steps if s["step"] > skip] or steps
    return {"tokens_per_sec": statistics.median(s["tokens_per_sec"] for s in timed),
            "step_s": statistics.median(s["seconds"] for s in timed),
            "peak_mb": max(s["peak_mb"] for s in steps), "rss_mb": run["rss_mb"],
            "loss_first": steps[0]["loss"], "steps": len(steps)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    h.add_options(p, shapes="smolvlm,qwen2_5_vl", tools="mlxlab,mlx-vlm", steps=6,
                  skip=(2, "first steps left out of tokens/s"), rounds=2, batch=4,
                  rows=(64, "training rows of the shapes task"),
                  qwen_layers=(2, "decoder and vision layers of the Qwen2.5-VL-3B-shaped model"),
                  work=None)
    args = p.parse_args()
    if args.smoke:
        args.steps, args.skip, args.rounds, args.batch, args.rows = 2, 0, 1, 2, 8
    work = Path(args.work) if args.work else (h.smoke_dir("bench_vision") if args.smoke else
                                              Path(tempfile.mkdtemp(prefix="bench_vision_")))
    mlxlab_data, vlm_data = write_rows(work / "data", args.rows)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    env.setdefault("MLXLAB_ROOT", str(work / "root"))
    shapes = {"smolvlm": (SMOLVLM_256M, None, False),
              "qwen2_5_vl": (QWEN2_5_VL_3B, args.qwen_layers, True)}
    tools = args.tools.split(",")
    results: dict[tuple[str, str], list[dict]] = {}
    for name in args.shapes.split(","):
        shape, layers, quantize = shapes[name]
        folder = work / f"{name}{'-smoke' if args.smoke else ''}"
        model = save_model(name, folder, shape, layers, args.smoke)
        batch = min(args.batch, BATCH_LIMIT.get(name, args.batch))
        for rnd, tool in ((r, t) for r in range(args.rounds) for t in h.in_round(tools, r)):
            run, data = (run_mlxlab, mlxlab_data) if tool == "mlxlab" else (run_mlx_vlm, vlm_data)
            s = {**summarize(run(model, data, args.steps, batch, quantize,
                                 work / "runs" / f"{name}-{tool}-{rnd}", env), args.skip),
                 "batch": batch, "load_1min": os.getloadavg()[0]}
            results.setdefault((name, tool), []).append(s)
            print(json.dumps({"round": rnd, "shape": name, "tool": tool, **s}), flush=True)
    table, shown = [], []
    for (name, tool), runs in results.items():
        row = {k: statistics.median(r[k] for r in runs)
               for k in ("step_s", "tokens_per_sec", "peak_mb", "rss_mb")}
        base = results.get((name, "mlxlab"))
        speed = peak = "-"
        if base and tool != "mlxlab":  # the same rows and images a step: step time compares
            speed = f"{row['step_s'] / statistics.median(r['step_s'] for r in base):.2f}x"
            peak = f"{statistics.median(r['peak_mb'] for r in base) / row['peak_mb']:.2f}x"
        loads = "-".join(f"{r['load_1min']:.1f}" for r in runs)
        table.append({"shape": name, "tool": tool, "batch": runs[0]["batch"], **row,
                      "loads": loads, "speed_ratio": speed, "peak_ratio": peak})
        shown.append([name, tool, runs[0]["batch"], f"{row['step_s']:.2f}", f"{row['tokens_per_sec']:.2f}",
                      f"{row['peak_mb']:.0f}", f"{row['rss_mb']:.0f}", loads, speed, peak])
    h.print_table({"head": ["shape", "tool", "batch", "step s", "trained tokens/s", "MLX peak MB",
                            "peak RSS MB", "load", "mlxlab's speed", "mlxlab's peak"], "rows": shown})
    first = next((row for row in table if row["speed_ratio"] != "-"), None)
    h.write_record("vision-vs-mlx-vlm", {"table": table, "runs": {f"{k[0]}/{k[1]}": v for k, v in results.items()}},
                   question="speed-mlx", reference=first and "mlx-vlm's own trainer (python -m mlx_vlm.train)",
                   ratio=first and float(first["speed_ratio"].rstrip("x")),
                   summary=first and f"vision-language LoRA step speed, {first['shape']} (higher is better)",
                   smoke=args.smoke)

if __name__ == "__main__":
    main()
