"""The reference beside mlxlab's Whisper LoRA fine-tune (bench_speech_finetune.py starts it, a
process of its own that never imports mlxlab or MLX): transformers' Seq2SeqTrainer + PEFT on the
same weights and speech set (make_speech_set.py's audiofolder), on the CPU. The decoder prompt
<|startoftranscript|><|en|><|transcribe|><|notimestamps|>, the loss on the text and end tokens
only; LoRA on --targets of the --modules halves' layers (no dropout), AdamW (no decay) at a
constant --lr, --steps of --batch utterances. Writes to --json each step's seconds, the
examples/s of the median step after --skip, the loss, and (unless --eval-limit 0) its greedy
transcripts of the held-out split, which the caller scores with mlxlab's judge.

    python benchmarks/speech/reference_seq2seq.py --json OUT [--data DIR] [--model DIR]
        [--steps 30] [--batch 8] [--lr 1e-3] [--modules decoder] [--eval-limit N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: benchmarks.*
from benchmarks.harness import add_options  # noqa: E402
from benchmarks.speech.make_speech_set import read_split  # noqa: E402
from benchmarks.speech.whisper_checkpoint import CACHE  # noqa: E402

PROMPT = ["<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>"]


def examples(processor, split: Path) -> list[dict]:
    """Each utterance's log-mel features, decoder input and labels (-100 on the prompt)."""
    import soundfile as sf

    tok = processor.tokenizer
    prompt = tok.convert_tokens_to_ids(PROMPT)
    out = []
    for row in read_split(split):
        wave, _ = sf.read(split / row["file_name"], dtype="float32")
        feats = processor.feature_extractor(wave, sampling_rate=16000).input_features[0]
        full = prompt + tok(" " + row["transcription"], add_special_tokens=False).input_ids + [
            tok.eos_token_id]
        labels = [-100] * (len(prompt) - 1) + full[len(prompt):]
        out.append({"input_features": feats, "decoder_input_ids": full[:-1], "labels": labels})
    return out


def collate(rows: list[dict], pad: int) -> dict:
    """A batch padded to its longest decoder input (labels -100 there)."""
    import numpy as np
    import torch

    width = max(len(r["labels"]) for r in rows)
    return {"input_features": torch.from_numpy(np.stack([r["input_features"] for r in rows])),
            "decoder_input_ids": torch.tensor([r["decoder_input_ids"] + [pad] * (width - len(
                r["decoder_input_ids"])) for r in rows]),
            "labels": torch.tensor([r["labels"] + [-100] * (width - len(r["labels"])) for r in rows])}


def step_clock():
    """A TrainerCallback keeping each optimizer step's seconds."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.seconds: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self.t0)

    return Clock()


def train(args: argparse.Namespace, model, processor, data: list[dict]) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

    # PEFT full-matches a string as a regex: the --targets of the --modules halves only
    halves, names = args.modules.replace(",", "|"), args.targets.replace(",", "|")
    model = get_peft_model(model, LoraConfig(
        r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, bias="none",
        target_modules=rf".*\b({halves})\.layers\.\d+\..*\b({names})"))
    settings = Seq2SeqTrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="seq2seq_ref_"), per_device_train_batch_size=args.batch,
        max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, optim="adamw_torch", logging_steps=1, save_strategy="no", report_to=[],
        seed=args.seed, remove_unused_columns=False, dataloader_num_workers=0, use_cpu=True,
        disable_tqdm=True)
    clock = step_clock()
    trainer = Seq2SeqTrainer(model=model, args=settings, train_dataset=data, callbacks=[clock],
                             data_collator=lambda rows: collate(rows, processor.tokenizer.eos_token_id))
    metrics = trainer.train().metrics
    timed = clock.seconds[args.skip:] or clock.seconds
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"model": model.eval(), "median_examples_per_s": args.batch / statistics.median(timed),
            "trainer_samples_per_s": metrics.get("train_samples_per_second"),
            "step_seconds": [round(s, 3) for s in clock.seconds], "loss": losses,
            "trainable": sum(
                p.numel() for p in model.parameters() if p.requires_grad)}


def transcribe(model, processor, waves: list, batch: int = 16) -> list[str]:
    """transformers' greedy English transcripts (48 tokens at most: twice the longest sentence)."""
    import torch

    out = []
    for i in range(0, len(waves), batch):
        feats = processor(waves[i:i + batch], sampling_rate=16000, return_tensors="pt").input_features
        with torch.no_grad():
            ids = model.generate(feats.to(model.dtype), language="en", task="transcribe",
                                 num_beams=1, do_sample=False, max_new_tokens=48)
        out += [t.strip() for t in processor.batch_decode(ids, skip_special_tokens=True)]
    return out


def heldout(model, processor, split: Path, limit: int | None) -> dict:
    """The model's transcripts of a split's first `limit` utterances, with their ids and texts."""
    import soundfile as sf

    rows = read_split(split)[:limit]
    hyps = transcribe(model, processor, [sf.read(split / r["file_name"], dtype="float32")[0]
                                         for r in rows])
    return {"ids": [r["file_name"] for r in rows], "refs": [r["transcription"] for r in rows],
            "hyps": hyps}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_options(p, json=(None, "the file the figures go to"), data=str(CACHE / "speech-set"),
                model=str(CACHE / "whisper-base"), steps=30, batch=8, lr=1e-3, rank=8,
                alpha=16.0, targets="q_proj,k_proj,v_proj,out_proj,fc1,fc2", modules="decoder",
                seed=0, skip=2, eval_limit=(None, "the first N held-out utterances (0: none)", int))
    args = p.parse_args(argv)
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    torch.manual_seed(args.seed)
    data, model_dir = Path(args.data), Path(args.model)
    processor = WhisperProcessor.from_pretrained(model_dir)
    model = WhisperForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    trained = train(args, model, processor, examples(processor, data / "train"))
    model = trained.pop("model")
    tuned = None if args.eval_limit == 0 else heldout(model, processor, data / "test",
                                                      args.eval_limit)
    Path(args.json).write_text(json.dumps({"settings": vars(args), "torch": torch.__version__,
                                           "train": trained, "heldout": tuned}))


if __name__ == "__main__":
    main()
