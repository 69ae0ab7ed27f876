"""The PyTorch twin of the default experiment's whole run: mlxlab's BERT classifier in PyTorch
(bench_torch.py), trained as a PyTorch user would, on the exact batches the mlxlab run trains and
evaluates on (bench_default_run.py dumps them), with the same optimizer, warmup-cosine schedule,
clip and per-epoch evaluation (the best epoch's weights kept), in a process that never imports
mlxlab or MLX (checked). Prints one JSON line: wall, loop, each step's seconds, best and last
validation accuracy.

    python benchmarks/speed/torch_bert_run.py --data DIR --threads 2   (DIR: train.npz, val.npz, run.json)

`--bf16`: forward passes (training and evaluation) under `torch.autocast("cpu", dtype=torch.bfloat16)`,
PyTorch's CPU mixed precision (float32 weights, bf16 products), the loss in float32.
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()  # before torch's import: a user's script pays it too

import argparse  # noqa: E402
import contextlib  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: benchmarks.*
from benchmarks.harness import add_options, load_batches, refuse_foreign, smoke_dir  # noqa: E402
from benchmarks.speed.bench_torch import torch_models, torch_warmup_cosine  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_options(parser, data=(None, "the folder bench_default_run.py writes"), threads=2)
    parser.add_argument("--bf16", action="store_true", help="forward passes under torch.autocast bf16")
    args = parser.parse_args()
    if args.smoke:  # one epoch, its batches dumped by bench_default_run.py in its own process
        args.data = str(smoke_dir("torch_bert_run"))
        subprocess.run([sys.executable, str(Path(__file__).with_name("bench_default_run.py")),
                        "--dump", args.data, "--epochs=1"], check=True, capture_output=True)
    if not args.data:
        parser.error("--data is required")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    folder = Path(args.data)
    hp = json.loads((folder / "run.json").read_text())

    def tensors(name: str) -> list[tuple[torch.Tensor, ...]]:
        return [(torch.from_numpy(b["input_ids"]).long(), torch.from_numpy(b["attention_mask"]),
                 torch.from_numpy(b["labels"]).long()) for b in load_batches(folder / name)]

    train, val = tensors("train.npz"), tensors("val.npz")
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.bf16 else contextlib.nullcontext
    _, BertClassifier = torch_models()
    model = BertClassifier(hp["vocab_size"], hp["num_labels"], **hp["model"])
    opt = torch.optim.AdamW(model.parameters(), lr=hp["learning_rate"], betas=hp["betas"],
                            eps=hp["eps"], weight_decay=hp["weight_decay"], foreach=True)
    schedule = torch_warmup_cosine(opt, len(train), hp["warmup_steps"], hp["min_lr_ratio"])
    epochs, per_epoch = hp["epochs"], len(train) // hp["epochs"]

    def evaluate() -> tuple[float, float]:
        model.eval()
        correct = total = 0
        loss = 0.0
        with torch.no_grad():
            for ids, mask, labels in val:
                with autocast():
                    logits = model(ids, mask).float()
                loss += F.cross_entropy(logits, labels, reduction="sum").item()
                correct += (logits.argmax(-1) == labels).sum().item()
                total += len(labels)
        model.train()
        return correct / total, loss / total

    loop_started = time.perf_counter()
    steps, history, best, best_state = [], [], -1.0, None
    model.train()
    for epoch in range(epochs):
        for ids, mask, labels in train[epoch * per_epoch:(epoch + 1) * per_epoch]:
            t = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            with autocast():
                logits = model(ids, mask)
            loss = F.cross_entropy(logits.float(), labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), hp["grad_clip"])
            opt.step()
            schedule.step()
            loss.item()  # the loss a user prints or logs
            steps.append(time.perf_counter() - t)
        accuracy, val_loss = evaluate()
        history.append(accuracy)
        if accuracy > best:
            best, best_state = accuracy, copy.deepcopy(model.state_dict())
        print(f"epoch {epoch + 1}/{epochs} val/loss {val_loss:.4f} val/accuracy {accuracy:.4f}",
              file=sys.stderr)
    model.load_state_dict(best_state)
    done = time.perf_counter()
    refuse_foreign("torch_bert_run")
    print(json.dumps({
        "wall_s": done - STARTED, "loop_s": done - loop_started, "step_s": steps,
        "best_accuracy": best, "last_accuracy": history[-1], "threads": args.threads,
        "bf16": args.bf16,
        "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
