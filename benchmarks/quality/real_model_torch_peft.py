"""The real-model fine-tune of real_model_finetune.py in PyTorch + PEFT: the reference beside
mlxlab and mlx_lm.lora. Reads the rows real_model_finetune.py wrote to --work and needs no MLX (a
GPU image): transformers' GGUF load of the same file in --dtype, LoRA rank 8 (alpha 16) on
q/k/v/o, Adam at a constant --lr, the loss on the assistant turn; held-out greedy exact match.
Writes W/stages/train_torch_peft_<round>.json and, in round 0, W/stages/torch-peft.json.

    python benchmarks/quality/real_model_torch_peft.py --work W --gguf SmolLM2.Q4_1.gguf
        [--steps 80] [--batch 4] [--lr 1e-3] [--dtype bfloat16] [--round 0]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: benchmarks.*
from benchmarks.harness import add_options, read_jsonl  # noqa: E402  (standard library and numpy only)

MAX_NEW_TOKENS = 16
RANK, ALPHA = 8, 16.0


def encode_chat(tok, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(input ids, labels): the whole conversation as the template renders it, -100 up to the
    assistant's reply (the rendered prompt with the generation prompt is a prefix of it)."""
    full = tok.apply_chat_template(messages, tokenize=False)
    prompt = tok.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    if not full.startswith(prompt):
        raise ValueError("the chat template's prompt is not a prefix of the conversation")
    ids = tok(full, add_special_tokens=False)["input_ids"]
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    return ids, [-100] * n_prompt + ids[n_prompt:]


def peft_lora(model):
    """`model` with LoRA rank 8 (alpha 16) on q/k/v/o of every layer, no dropout (PEFT)."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(
        r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))


def train_steps(model, tok, chats: list[list[dict]], steps: int, batch: int, lr: float,
                order: list[int] | None = None) -> list[dict]:
    """Adam at a constant `lr` on `batch` chats a step (in `order`, else as given), padded to the
    longest, the loss on the last reply; each step's trained tokens/s, seconds, peak MB (CUDA's
    allocator, else the process's RSS) and loss."""
    import torch

    dev = next(model.parameters()).device
    cuda = dev.type == "cuda"
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    train = [encode_chat(tok, messages) for messages in chats]
    order = order or list(range(len(train)))
    opt = torch.optim.Adam([q for q in model.parameters() if q.requires_grad], lr=lr)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    out = []
    model.train()
    for step in range(1, steps + 1):
        picked = [train[order[((step - 1) * batch + i) % len(order)]] for i in range(batch)]
        width = max(len(ids) for ids, _ in picked)
        ids = torch.tensor([i + [pad] * (width - len(i)) for i, _ in picked], device=dev)
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in picked], device=dev)
        mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in picked], device=dev)
        tokens = int((labels[:, 1:] != -100).sum())
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        peak = (torch.cuda.max_memory_allocated() / 2**20 if cuda
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        out.append({"step": step, "tokens_per_sec": tokens / seconds, "seconds": seconds,
                    "peak_mb": peak, "loss": loss.item()})
        print(json.dumps(out[-1]), flush=True)
    return out


def smoke_inputs(args: argparse.Namespace) -> None:
    """--smoke: rows from real_model_finetune.py's generator in a new folder, the packaged GGUF."""
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
    from benchmarks.quality.real_model_finetune import date_rows, write_jsonl
    from real_models import packaged_model

    work = Path(args.work or tempfile.mkdtemp(prefix="real_model_torch_peft_"))
    train, _, heldout = date_rows(8, 2, 4)
    write_jsonl(work / "data" / "train.jsonl", train)
    write_jsonl(work / "dates.jsonl", heldout)
    args.work, args.gguf = str(work), str(packaged_model())
    args.steps, args.batch, args.skip, args.dtype, args.eval_batch = 2, 2, 0, "float32", 4


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_options(p, work=None, gguf=None, steps=80, batch=4, lr=1e-3, seed=0, skip=2,
                dtype="bfloat16", eval_batch=50,
                heldout=(None, "only the first N held-out rows", int),
                round=(0, "a timed round: round 0 also scores the held-out rows"),
                compile=(False, "torch.compile the model"))
    args = p.parse_args(argv)
    if args.smoke:
        smoke_inputs(args)
    elif not (args.work and args.gguf):
        p.error("--work and --gguf (or --smoke)")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(args.seed)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    work, gguf = Path(args.work), Path(args.gguf)
    started = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype).to(dev)
    load_s = time.perf_counter() - started
    model = peft_lora(model)
    if args.compile:
        model = torch.compile(model)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    chats = [r["messages"] for r in read_jsonl(work / "data" / "train.jsonl")]
    order = list(range(len(chats)))
    random.Random(args.seed).shuffle(order)
    steps = train_steps(model, tok, chats, args.steps, args.batch, args.lr, order)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    train_wall = time.perf_counter() - started
    timed = [s for s in steps if s["step"] > args.skip] or steps
    trained = {"steps": steps, "rss_mb": rss_mb, "first_step_s": steps[0]["seconds"],
               "wall_s": train_wall, "load_s": load_s, "load_1min": [None, None],
               "torch": torch.__version__, "device": torch.cuda.get_device_name() if
               dev.type == "cuda" else "cpu", "dtype": args.dtype, "compile": args.compile,
               "median_tokens_per_sec": statistics.median(s["tokens_per_sec"] for s in timed)}

    stages = work / "stages"
    stages.mkdir(parents=True, exist_ok=True)
    (stages / f"train_torch_peft_{args.round}.json").write_text(json.dumps(trained, indent=1))
    print(json.dumps({k: v for k, v in trained.items() if k != "steps"}))
    if args.round:
        return {"train": trained}

    # held-out: greedy, left-padded batches, the template's generation prompt
    model.eval()
    tok.padding_side = "left"
    heldout = read_jsonl(work / "dates.jsonl")[: args.heldout]
    stops = [t for t in {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}
             if isinstance(t, int) and t >= 0]
    outputs, right, t0 = {}, 0, time.perf_counter()
    for i in range(0, len(heldout), args.eval_batch):
        part = heldout[i:i + args.eval_batch]
        prompts = [tok.apply_chat_template([{"role": "user", "content": r["prompt"]}],
                                           tokenize=False, add_generation_prompt=True)
                   for r in part]
        enc = tok(prompts, add_special_tokens=False, return_tensors="pt", padding=True).to(dev)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                                 eos_token_id=stops, pad_token_id=pad)
        for r, seq in zip(part, out[:, enc["input_ids"].shape[1]:]):
            text = tok.decode(seq, skip_special_tokens=True).split("\n")[0]
            outputs[r["id"]] = text
            right += text.strip() == r["answer"].strip()
    evaluated = {"accuracy": right / len(heldout), "n": len(heldout), "outputs": outputs,
                 "seconds": time.perf_counter() - t0, "load_1min": [None, None]}
    (stages / "torch-peft.json").write_text(json.dumps(evaluated, indent=1))
    print(json.dumps({k: v for k, v in evaluated.items() if k != "outputs"}))
    return {"train": trained, "eval": evaluated}


if __name__ == "__main__":
    sys.exit(main() and 0)
