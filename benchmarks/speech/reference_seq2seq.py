"""The reference beside mlxlab's Whisper LoRA fine-tune: transformers' Seq2SeqTrainer + PEFT on
the same folder and speech set (make_speech_set.py's audiofolder), on the CPU. The decoder prompt
<|startoftranscript|><|en|><|transcribe|><|notimestamps|>, the loss on the text and end tokens
only (SPEECH.md's batches); LoRA on --targets of every layer (no dropout), Adam(W, no decay) at a
constant --lr, --steps of --batch utterances. Records examples/s per step, the process's peak
RSS, and the held-out WER per utterance (greedy, make_speech_set.score) -- with --score-base the
base model's too, on the same utterances, for a paired verdict.

    python benchmarks/speech/reference_seq2seq.py [--data DIR] [--model DIR] [--steps 100]
        [--batch 8] [--lr 1e-3] [--rank 8] [--alpha 16] [--targets q_proj,v_proj] [--score-base]
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
from benchmarks.harness import add_options, peak_rss_mb, reset_peak_rss, write_record  # noqa: E402
from benchmarks.speech.make_speech_set import heldout, read_split  # noqa: E402
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

    model = get_peft_model(model, LoraConfig(
        r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, bias="none",
        target_modules=args.targets.split(",")))
    settings = Seq2SeqTrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="seq2seq_ref_"), per_device_train_batch_size=args.batch,
        max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, optim="adamw_torch", logging_steps=1, save_strategy="no", report_to=[],
        seed=args.seed, remove_unused_columns=False, dataloader_num_workers=0, use_cpu=True,
        disable_tqdm=True)
    clock = step_clock()
    trainer = Seq2SeqTrainer(model=model, args=settings, train_dataset=data, callbacks=[clock],
                             data_collator=lambda rows: collate(rows, processor.tokenizer.eos_token_id))
    reset_peak_rss()
    metrics = trainer.train().metrics
    timed = clock.seconds[args.skip:] or clock.seconds
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"model": model.eval(), "median_examples_per_s": args.batch / statistics.median(timed),
            "trainer_samples_per_s": metrics.get("train_samples_per_second"),
            "step_seconds": [round(s, 3) for s in clock.seconds], "loss": losses,
            "peak_rss_mb": peak_rss_mb(), "trainable": sum(
                p.numel() for p in model.parameters() if p.requires_grad)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_options(p, data=str(CACHE / "speech-set"), model=str(CACHE / "whisper-base"), steps=100,
                batch=8, lr=1e-3, rank=8, alpha=16.0, targets="q_proj,v_proj", seed=0, skip=2,
                eval_limit=(None, "only the first N held-out utterances", int),
                score_base=(False, "score the base model on the held-out split first"))
    args = p.parse_args(argv)
    if args.smoke:
        from benchmarks.speech.make_speech_set import main as make_set

        args.data = make_set(["--smoke"])["out"]
        args.steps, args.batch, args.skip, args.eval_limit = 2, 2, 0, 2
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    torch.manual_seed(args.seed)
    data, model_dir = Path(args.data), Path(args.model)
    processor = WhisperProcessor.from_pretrained(model_dir)
    model = WhisperForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    base = heldout(model.eval(), processor, data / "test", args.eval_limit) if args.score_base else None
    trained = train(args, model, processor, examples(processor, data / "train"))
    tuned = heldout(trained.pop("model"), processor, data / "test", args.eval_limit)
    print(json.dumps({k: v for k, v in trained.items() if k != "step_seconds"}))
    print(json.dumps({"wer": tuned["wer"], "invented_words_right": tuned["invented_words_right"],
                      "examples": list(zip(tuned["hyps"][:4], tuned["ids"][:4]))}))
    row = ["transformers Seq2SeqTrainer + PEFT", f"{trained['median_examples_per_s']:.2f}",
           f"{trained['peak_rss_mb']:.0f}", f"{tuned['wer']:.3f}",
           "-" if base is None else f"{base['wer']:.3f}"]
    figures = {"table": {"head": ["trainer", "examples/s (median step)", "peak RSS MB",
                                  "held-out WER", "base WER"], "rows": [row]},
               "settings": {k: v for k, v in vars(args).items()}, "torch": torch.__version__,
               "train": trained, "heldout": tuned, "base": base}
    write_record("whisper-lora-seq2seq-reference", figures, question="quality",
                 reference="transformers Seq2SeqTrainer + PEFT", smoke=args.smoke)
    return figures


if __name__ == "__main__":
    main()
