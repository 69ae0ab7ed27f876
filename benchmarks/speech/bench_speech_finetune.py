"""Whisper LoRA fine-tuning beside transformers' Seq2SeqTrainer + PEFT at equal settings, on the
CPU: whisper-base (whisper_checkpoint.py: mlxlab reads the CTranslate2 folder, transformers the
same weights converted), the speech set (make_speech_set.py: 400 training utterances in six
voices, 100 held out in three others), LoRA rank 8 (alpha 16) on the decoder's attention
projections and fc1/fc2, AdamW at a constant --lr with no decay, clip 1.0, --batch utterances,
float32, each trainer in its own process.

    python benchmarks/speech/bench_speech_finetune.py [--steps 30] [--seeds 0,1,2]
        [--speed-steps 8] [--rounds 2] [--skip 2] [--work DIR] [--smoke]

- speed: --rounds alternating rounds (ABBA) of --speed-steps steps: examples/s of the median
  step after --skip (mlxlab's whole loop, benchmarks.callbacks.StepTimes, but its last step,
  which holds the closing validation; the reference's optimizer step), each process's peak RSS and mlxlab's MLX peak;
- quality: the base scored on the held-out utterances (`mlxlab eval`), then per seed both
  fine-tunes of --steps steps scored on them by mlxlab's judge (Whisper's English normalizer,
  jiwer): WER per utterance paired (evaluation/paired.py) per seed and pooled over the seeds,
  each fine-tune against the base and mlxlab against the reference.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from benchmarks.harness import (  # noqa: E402
    add_options,
    cli_root,
    in_round,
    load,
    mlxlab_cli,
    run_with_peak_rss,
    write_record,
)
from benchmarks.speech.make_speech_set import INVENTED, read_split  # noqa: E402
from benchmarks.speech.whisper_checkpoint import CACHE  # noqa: E402
from benchmarks.speed.bench_lora import csv_metrics, run_mlxlab  # noqa: E402

REFERENCE = REPO / "benchmarks" / "speech" / "reference_seq2seq.py"


def overrides(args, steps: int, seed: int, heldout: Path | None) -> list[str]:
    tasks = [f"eval.tasks=[{heldout}]", f"trainer.eval_every_steps={steps}"] if heldout else [
        "trainer.eval_every_steps=100000"]
    return ["experiment=finetune_speech", f"model.pretrained={args.ct2}",
            f"data.train_file={Path(args.data) / 'train'}", "model.lora.modules=[decoder]",
            "trainer.schedule.name=constant", f"trainer.batch_size={args.batch}",
            f"optimizer.learning_rate={args.lr}", f"trainer.max_steps={steps}", f"seed={seed}",
            *tasks]


def reference(args, work: Path, steps: int, seed: int, score: bool, env: dict) -> dict:
    out = work / f"reference_s{seed}_{steps}.json"
    cmd = [sys.executable, str(REFERENCE), "--data", args.data, "--model", args.hf, "--steps",
           str(steps), "--batch", str(args.batch), "--lr", str(args.lr), "--modules", "decoder",
           "--seed", str(seed), "--skip", str(args.skip), "--json", str(out),
           *([] if score else ["--eval-limit", "0"])]
    _, rss = run_with_peak_rss(cmd, what="reference", log=out.with_suffix(".log"), env=env)
    return {**json.loads(out.read_text()), "rss_mb": rss}


def speed(args, work: Path, env: dict) -> dict:
    rows: dict[str, list] = {"mlxlab": [], "reference": []}
    for rnd in range(args.rounds):
        for who in in_round(list(rows), rnd):
            before = load()
            if who == "mlxlab":
                out = work / f"speed_mlxlab_{rnd}"
                r = run_mlxlab(out, overrides(args, args.speed_steps, 0, None), env=env,
                               step_times=True)
                clock = [float(x) for x in out.with_name(out.name + ".times").read_text().split()]
                seconds = [b - a for a, b in zip(clock, clock[1:])]
                # the last step holds the run's closing validation: left out
                rows[who].append({"examples_per_s": args.batch / statistics.median(
                    seconds[args.skip:-1] or seconds), "rss_mb": r["rss_mb"], "mlx_peak_mb": max(
                        m.get("memory/peak_mb", 0) for m in csv_metrics(out).values()),
                    "step_s": seconds})
            else:
                r = reference(args, work, args.speed_steps, 0, False, env)
                rows[who].append({"examples_per_s": r["train"]["median_examples_per_s"],
                                  "rss_mb": r["rss_mb"], "step_s": r["train"]["step_seconds"]})
            rows[who][-1]["load"] = [before, load()]
            print(who, json.dumps(rows[who][-1]), flush=True)
    return rows


def invented_right(rows: list[dict]) -> float:
    """The share of the references' invented words (make_speech_set's) the transcripts spell."""
    words = [(w, set(r["hypothesis"].split())) for r in rows for w in r["reference"].split()
             if w.removesuffix("'s") in INVENTED]
    return sum(w in hyp for w, hyp in words) / max(1, len(words))


def run_id(log: str) -> str:
    return re.findall(r"mlflow run: ([0-9a-f]{32})", log)[-1]


def quality(args, work: Path, env: dict, uri: str, heldout: Path) -> dict:
    from mlflow import MlflowClient

    from mlxlab.evaluation import paired as pr
    from mlxlab.evaluation.results import SavedTask
    from mlxlab.evaluation.run_scores import run_scores
    from mlxlab.evaluation.speech import word_errors as we

    client = MlflowClient(uri)
    scores = lambda log: run_scores(client, client.get_run(run_id(log)), None, "last")  # noqa: E731
    done, _ = run_with_peak_rss(mlxlab_cli("eval", args.ct2, str(heldout)), what="base eval",
                                env=env, cwd=env["MLXLAB_ROOT"], log=work / "base_eval.log")
    base = scores(done.stdout + done.stderr)
    task = next(iter(base))
    ours, theirs, per_seed = {}, {}, []
    for seed in args.seeds:
        log = work / f"train_s{seed}.log"
        run_with_peak_rss(mlxlab_cli("train", *overrides(args, args.steps, seed, heldout)),
                          what="mlxlab train", env=env, cwd=env["MLXLAB_ROOT"], log=log)
        ours[seed] = scores(log.read_text())
        ref = reference(args, work, args.steps, seed, True, env)["heldout"]
        rows = we.score_transcriptions(ref["ids"], ref["refs"], ref["hyps"],
                                       we.text_normalizer("english"))
        t = base[task]
        theirs[seed] = {task: SavedTask(task, t.kind, we.corpus_rates(rows), rows, t.prompts)}
        per_seed.append({"seed": seed, **{name: {
            "vs_base": [p.as_dict() for p in pr.pair_runs(base, group[seed])],
            "invented_words_right": invented_right(group[seed][task].rows)}
            for name, group in (("mlxlab", ours), ("reference", theirs))}})
    pooled = {"mlxlab_vs_base": pr.pair_replicates({"base": base}, ours),
              "reference_vs_base": pr.pair_replicates({"base": base}, theirs),
              "mlxlab_vs_reference": pr.pair_replicates(theirs, ours)}
    return {"base": {**base[task].metrics, "invented_words_right": invented_right(base[task].rows)},
            "per_seed": per_seed,
            "pooled": {k: [p.as_dict() for p in v] for k, v in pooled.items()}}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_options(p, data=str(CACHE / "speech-set"), ct2=str(CACHE / "whisper-base-ct2"),
                hf=str(CACHE / "whisper-base"), steps=30, seeds="0,1,2", speed_steps=8, rounds=2,
                skip=2, batch=8, lr=1e-3, work=str(Path("/tmp") / "bench_speech_finetune"))
    args = p.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",")]
    if args.smoke:
        from benchmarks.speech.make_speech_set import main as make_set

        args.data = make_set(["--smoke"])["out"]
        args.steps, args.speed_steps, args.rounds, args.skip, args.seeds = 2, 2, 1, 0, [0]
        args.batch = 2
    work = Path(args.work)
    env, uri = cli_root(work)
    heldout = work / "held_out.jsonl"
    heldout.write_text("".join(json.dumps({"id": r["file_name"], "audio": str(
        Path(args.data) / "test" / r["file_name"]), "text": r["transcription"]}) + "\n"
        for r in read_split(Path(args.data) / "test")))
    figures = {"settings": vars(args), "speed": speed(args, work, env),
               "quality": quality(args, work, env, uri, heldout)}
    s, q = figures["speed"], figures["quality"]["pooled"]
    rate = {k: statistics.median(r["examples_per_s"] for r in v) for k, v in s.items()}
    figures["table"] = {"head": ["trainer", "examples/s (median of rounds)", "peak RSS MB",
                                 "held-out WER (pooled seeds)", "vs base"], "rows": [
        [name, f"{rate[name]:.3f}", f"{max(r['rss_mb'] for r in s[name]):.0f}",
         f"{q[key][0]['b']:.3f}", q[key][0]["verdict"]]
        for name, key in (("mlxlab", "mlxlab_vs_base"), ("reference", "reference_vs_base"))]}
    figures["ratio_examples_per_s"] = rate["mlxlab"] / rate["reference"]
    print(json.dumps(figures["table"], indent=1), q["mlxlab_vs_reference"][0]["verdict"])
    write_record("whisper-lora-vs-seq2seq", figures, question="speed-pytorch",
                 reference="transformers Seq2SeqTrainer + PEFT (CPU)",
                 ratio=figures["ratio_examples_per_s"], smoke=args.smoke,
                 summary="Whisper-base decoder LoRA, examples/s at equal settings (WER beside)")
    return figures


if __name__ == "__main__":
    main()
