"""Does a vision-language fine-tune learn what only the picture holds? SmolLM2-135M-Instruct as the
language model of a fresh small SigLIP tower and projector (SmolVLM's architecture), trained by
`experiment=finetune_vision` on the shipped shapes task (colour, shape or count of a picture),
scored on the 60 held-out pictures before and after, over seeds, McNemar's test against the start.

    python benchmarks/quality/vision_shapes.py [--seeds 42,43,44] [--steps 300] [--smoke]
        [--reference-seeds 42]   # mlx-vlm 0.7.10's own trainer at the same steps, batch, rate
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
from benchmarks.harness import add_options, read_jsonl, write_record  # noqa: E402

SHAPES = REPO / "src" / "mlxlab" / "assets" / "shapes"
IMAGE_TOKENS = ["<fake_token_around_image>", "<image>", "<global-img>"]
# SmolLM2's own ChatML, with a user turn's image parts written as <image> (the processor expands
# each into the image's tokens between <fake_token_around_image> marks)
TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_folder(out: Path, seed: int = 0, vision_width: int = 256, vision_layers: int = 4) -> Path:
    """SmolVLM's architecture with SmolLM2-135M-Instruct's weights as its language model and a
    fresh vision tower and projector (4 image tokens a 64x64 picture: one per quadrant)."""
    if (out / "model.safetensors").is_file():
        return out
    import torch
    import transformers as tf

    from real_models import packaged_model, transformers_reference

    lm_folder = transformers_reference(packaged_model())
    lm = tf.AutoModelForCausalLM.from_pretrained(lm_folder, dtype=torch.float32)
    tokenizer = tf.AutoTokenizer.from_pretrained(lm_folder)
    tokenizer.add_special_tokens({"additional_special_tokens": IMAGE_TOKENS})
    tokenizer.chat_template = TEMPLATE
    text = lm.config.to_dict()
    text.update(vocab_size=len(tokenizer), tie_word_embeddings=False)
    text["rope_theta"] = text.get("rope_parameters", {}).get("rope_theta", 100000.0)
    ids = tokenizer.convert_tokens_to_ids(IMAGE_TOKENS)
    config = tf.SmolVLMConfig(
        text_config=text, scale_factor=2, image_token_id=ids[1], tie_word_embeddings=False,
        vision_config=dict(hidden_size=vision_width, intermediate_size=4 * vision_width,
                           num_hidden_layers=vision_layers, num_attention_heads=4,
                           patch_size=16, image_size=64))
    torch.manual_seed(seed)
    vlm = tf.SmolVLMForConditionalGeneration(config).float().eval()
    # the language model's weights are SmolLM2's; the new tokens' embeddings are the mean
    state = lm.state_dict()
    embed = state["model.embed_tokens.weight"]
    grown = torch.cat([embed, embed.mean(0, keepdim=True).repeat(len(tokenizer) - len(embed), 1)])
    target = vlm.model.text_model
    missing = target.load_state_dict({k.removeprefix("model."): v for k, v in state.items()
                                      if k.startswith("model.") and "embed_tokens" not in k},
                                     strict=False)
    assert missing.missing_keys == ["embed_tokens.weight"], missing.missing_keys
    target.embed_tokens.weight.data = grown.clone()
    vlm.lm_head.weight.data = grown.clone()  # SmolLM2 ties its head to the embeddings
    out.mkdir(parents=True, exist_ok=True)
    vlm.save_pretrained(out)
    tokenizer.save_pretrained(out)
    config_file = out / "config.json"
    saved = json.loads(config_file.read_text())
    saved["text_config"]["rope_theta"] = text["rope_theta"]  # where mlx-vlm reads it
    config_file.write_text(json.dumps(saved, indent=1))
    (out / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "SmolVLMImageProcessor", "processor_class": "SmolVLMProcessor",
        "do_resize": True, "size": {"longest_edge": 64}, "max_image_size": {"longest_edge": 64},
        "do_image_splitting": False, "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        "do_pad": True, "resample": 1, "do_convert_rgb": True}))
    (out / "processor_config.json").write_text(json.dumps(
        {"processor_class": "SmolVLMProcessor", "image_seq_len": 4}))
    return out


def answers(model_path: str, rows: list[dict], vlm=None) -> list[str]:
    """Greedy replies (at most 4 tokens) of a run or folder to each held-out picture; `vlm`:
    an mlx-vlm model (its own trainer's adapters on the folder's base) answering in its place."""
    from mlxlab.runs.generate import continue_ids, image_prompt
    from mlxlab.runs.named_model import load_eval_model

    model = load_eval_model(model_path, "best", "template", purpose="vision_shapes")
    if vlm is not None:
        model.model.vlm = vlm
    out = []
    for row in rows:
        user = row["messages"][0]
        image = next(p["image"] for p in user["content"] if p.get("type") == "image")
        text = next(p["text"] for p in user["content"] if p.get("type") == "text")
        ids, inputs = image_prompt(model.model, model.template,
                                   [{"role": "user", "content": text}], [SHAPES / image])
        reply = continue_ids(model.model, model.tokenizer, model.tokenizer_folder, ids, 4, 0.0,
                             0, 1.0, 0, inputs)
        out.append(model.tokenizer.decode(list(reply)).strip().lower())
    return out


def correct(replies: list[str], rows: list[dict]) -> list[int]:
    truth = [r["messages"][1]["content"][0]["text"] for r in rows]
    return [int(a.split()[0].strip(".,!") == t if a.split() else 0)
            for a, t in zip(replies, truth)]


def chance(rows: list[dict]) -> float:
    kinds = {"colour": 4, "shape": 3, "count": 3}
    return sum(1 / next(n for k, n in kinds.items() if k in r["messages"][0]["content"][1]["text"]
                        .replace("How many", "count").replace("Which shape", "shape")
                        .replace("What colour", "colour")) for r in rows) / len(rows)


def train(folder: Path, work: Path, seed: int, steps: int, extra: list[str]) -> Path:
    run_root = work / f"seed{seed}"
    shutil.rmtree(run_root, ignore_errors=True)  # one run a seed: never an older one's folder
    run_root.mkdir(parents=True)
    command = [str(Path(sys.executable).parent / "mlxlab"), "train", "experiment=finetune_vision",
               f"model.pretrained={folder}", f"seed={seed}", f"trainer.max_steps={steps}",
               f"trainer.eval_every_steps={max(steps // 3, 1)}", "trainer.batch_size=8",
               "model.lora.rank=16", "model.lora.modules=[language_model,projector,vision_tower]",
               "optimizer.learning_rate=1e-3", "tracking=none", f"paths.root_dir={run_root}",
               *extra]
    started = time.time()
    subprocess.run(command, cwd=run_root, check=True)
    print(f"seed {seed}: trained {steps} steps in {time.time() - started:.0f} s", flush=True)
    return next((run_root / "outputs" / "finetune_vision").iterdir())


def mlx_vlm_rows(out: Path) -> Path:
    """The shapes task as mlx-vlm's trainer reads a JSONL folder (train.jsonl, valid.jsonl)."""
    from benchmarks.speed.bench_vision import both_formats

    out.mkdir(parents=True, exist_ok=True)
    for split, source in (("train", SHAPES / "train.jsonl"), ("valid", SHAPES / "val.jsonl")):
        rows = [both_formats(json.loads(line), SHAPES)[1] for line in source.read_text().splitlines()]
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def train_mlx_vlm(folder: Path, work: Path, seed: int, steps: int):
    """mlx-vlm's own trainer on the same rows, rank and rate (batch 1 x 8 times the steps: 0.7.10
    fails SmolVLM at a batch over 1), the vision tower and projector unfrozen (--train-vision),
    the loss on every token but padding and images (its --train-on-completions needs a Qwen
    token); the mlx-vlm model with its trained adapters."""
    out = work / f"mlx_vlm_seed{seed}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    data = mlx_vlm_rows(work / "mlx_vlm_data")
    started = time.time()
    from benchmarks.speed.bench_vision import MLX_VLM_WORKER

    subprocess.run([sys.executable, "-c", MLX_VLM_WORKER, str(out / "report.jsonl"),
                    "--model", str(folder), "--data", str(data),
                    "--iters", str(8 * steps), "--batch-size", "1", "--learning-rate", "1e-3",
                    "--lora-rank", "16", "--lora-alpha", "16", "--seed", str(seed),
                    "--target-modules", "q_proj", "k_proj", "v_proj", "o_proj",
                    "--train-vision", "--steps-per-eval", str(10 * steps),
                    "--steps-per-save", str(8 * steps),
                    "--adapter-file", str(out / "adapters.safetensors")], cwd=out, check=True)
    print(f"mlx-vlm seed {seed}: trained {steps} steps in {time.time() - started:.0f} s",
          flush=True)
    from mlx_vlm.utils import load

    model, _ = load(str(folder), adapter_path=str(out))
    return model


def scored(start: list[int], after: list[int]) -> dict:
    """The held-out exact match, and McNemar's exact p of it against the start's."""
    from mlxlab.stats.paired import mcnemar_exact

    return {"exact_match": sum(after) / len(after),
            "mcnemar_p": float(mcnemar_exact([bool(b) for b in start], [bool(a) for a in after])[2])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_options(parser, seeds="42,43,44", steps=300, work=Path("/tmp/mlxlab-vision-shapes"),
                reference_seeds=("", "seeds of mlx-vlm's own trainer at the same settings (e.g. 42)"))
    args = parser.parse_args()
    import mlxlab  # noqa: F401  (OpenBLAS for MLX before anything computes)

    seeds = [int(s) for s in args.seeds.split(",") if s]
    steps, rows = (2, read_jsonl(SHAPES / "val.jsonl")[:6]) if args.smoke else (args.steps, read_jsonl(SHAPES / "val.jsonl"))
    folder = build_folder(args.work / "smollm2-vlm")
    start = correct(answers(str(folder), rows), rows)
    record = {"steps": steps, "chance": chance(rows), "start": sum(start) / len(rows), "seeds": {}}
    print(f"start: {record['start']:.3f} exact match on {len(rows)} held-out pictures "
          f"(chance {record['chance']:.3f})", flush=True)
    for seed in seeds:
        run = train(folder, args.work, seed, steps, [])
        after = correct(answers(str(run), rows), rows)
        record["seeds"][seed] = {**scored(start, after), "run": str(run)}
        print(f"seed {seed}: {sum(after) / len(rows):.3f} exact match (McNemar p against the "
              f"start {record['seeds'][seed]['mcnemar_p']:.2g})", flush=True)
    scores = [v["exact_match"] for v in record["seeds"].values()]
    record["mean"] = sum(scores) / len(scores) if scores else None
    record["mlx_vlm"] = {}
    for seed in [int(s) for s in args.reference_seeds.split(",") if s]:
        after = correct(answers(str(folder), rows, train_mlx_vlm(folder, args.work, seed, steps)),
                        rows)
        record["mlx_vlm"][seed] = scored(start, after)
        print(f"mlx-vlm seed {seed}: {sum(after) / len(rows):.3f} exact match", flush=True)
    print(json.dumps(record, indent=1))
    write_record("vision-shapes", record, question="quality", smoke=args.smoke)


if __name__ == "__main__":
    main()
