"""Whisper LoRA fine-tuning beside transformers' Seq2SeqTrainer + PEFT at equal settings, on the
CPU: whisper-base (whisper_checkpoint.py: mlxlab reads the CTranslate2 folder, transformers the
same weights converted), the speech set (make_speech_set.py: 400 training utterances in six
voices, 100 held out in three others), LoRA rank 8 (alpha 16) on the decoder's attention
projections and fc1/fc2, AdamW at a constant --lr with no decay, clip 1.0, --batch utterances,
float32, each trainer in its own process.

    python benchmarks/speech/bench_speech_finetune.py [--part speed|quality|both]
        [--speed-rows 64] [--speed-steps 16] [--rounds 2] [--skip 2] [--steps 30]
        [--seeds 0,1,2] [--reference-seeds 0,1,2] [--work DIR] [--reuse] [--smoke]

- speed: --rounds alternating rounds (ABBA) of --speed-steps steps on the first --speed-rows
  training utterances (16 steps of 8 over 64: two epochs, as the experiment's 100 steps over
  400): examples/s over the steps after --skip but the last (mlxlab's whole loop,
  benchmarks.callbacks.StepTimes; its last step holds the closing validation; the reference's
  optimizer steps), each epoch's median step, each process's peak RSS, mlxlab's MLX peak;
- quality: the base scored on the held-out utterances (`mlxlab eval`), then per seed both
  fine-tunes of --steps steps scored on them by mlxlab's judge (Whisper's English normalizer,
  jiwer): WER per utterance paired (evaluation/paired.py) per seed and pooled over the seeds,
  each fine-tune against the base and mlxlab against the reference.
"""

from __future__ import annotations

import argparse
import csv
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
    print_table,
    run_with_peak_rss,
    write_record,
)
from benchmarks.speech.make_speech_set import INVENTED, read_split  # noqa: E402
from benchmarks.speech.whisper_checkpoint import CACHE  # noqa: E402
from benchmarks.speed.bench_lora import csv_metrics, run_mlxlab  # noqa: E402

REFERENCE = REPO / "benchmarks" / "speech" / "reference_seq2seq.py"


def overrides(args, steps: int, seed: int, heldout: Path | None, data: Path | None = None
              ) -> list[str]:
    # the quality runs' validation: 8 held-out utterances (its loss decides nothing: one
    # evaluation, at the end), not the audiofolder's 100-utterance test split
    tasks = [f"eval.tasks=[{heldout}]", f"trainer.eval_every_steps={steps}",
             f"data.val_file={heldout.with_name('val8.jsonl')}"] if heldout else [
        "trainer.eval_every_steps=100000"]
    return ["experiment=finetune_speech", f"model.pretrained={args.ct2}",
            f"data.train_file={data or args.data}", "model.lora.modules=[decoder]",
            "trainer.schedule.name=constant", "trainer.schedule.warmup_steps=0",
            f"trainer.batch_size={args.batch}",
            f"optimizer.learning_rate={args.lr}", f"trainer.max_steps={steps}", f"seed={seed}",
            *tasks]


def finished(log: Path) -> Path:
    """The marker written beside a run's log once its command exited 0: a failed or killed
    run leaves its log (to read) but no marker, so --reuse runs it again."""
    return log.with_name(log.name + ".done")


def run_marked(cmd: list[str], log: Path, reuse: bool, **kwargs) -> float | None:
    """run_with_peak_rss(cmd, log=log, ...) unless `reuse` and the run finished before (then
    None: its peak RSS was its own run's figure); its success marked (`finished`)."""
    if reuse and finished(log).exists():
        return None
    finished(log).unlink(missing_ok=True)
    _, rss = run_with_peak_rss(cmd, log=log, **kwargs)
    finished(log).touch()
    return rss


def reference(args, work: Path, steps: int, seed: int, score: bool, env: dict,
              data: Path | None = None, reuse: bool = False) -> dict:
    """The reference trainer's run (its JSON, with its peak RSS); `reuse`: a finished one
    --work holds (the quality part's; each timing round of the speed part runs its own)."""
    out = work / f"reference_s{seed}_{steps}.json"
    cmd = [sys.executable, str(REFERENCE), "--data", str(data or args.data), "--model", args.hf,
           "--steps",
           str(steps), "--batch", str(args.batch), "--lr", str(args.lr), "--modules", "decoder",
           "--seed", str(seed), "--skip", str(args.skip), "--json", str(out),
           *([] if score else ["--eval-limit", "0"])]
    rss = run_marked(cmd, out.with_suffix(".log"), reuse, what="reference", env=env)
    return {**json.loads(out.read_text()), "rss_mb": rss}


def subset(args, work: Path) -> Path:
    """The first --speed-rows training utterances and 8 held-out ones (mlxlab's validation) as
    an audiofolder of links: --speed-steps then spans epochs."""
    folder, data = work / "speed-set", Path(args.data)
    for split, n in (("train", args.speed_rows), ("validation", 8)):
        rows = read_split(data / ("test" if split == "validation" else split))[:n]
        (folder / split).mkdir(parents=True, exist_ok=True)
        for r in rows:
            link = folder / split / r["file_name"]
            link.unlink(missing_ok=True)
            link.symlink_to(data / ("test" if split == "validation" else split) / r["file_name"])
        with open(folder / split / "metadata.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return folder


def rates(args, seconds: list[float]) -> dict:
    """Examples/s over the steps after --skip but the last (mlxlab's holds the closing
    validation; the reference's is left out alike), and the median step of each epoch."""
    per_epoch = args.speed_rows // args.batch
    timed = seconds[args.skip:-1]
    return {"examples_per_s": args.batch * len(timed) / sum(timed), "step_s": seconds,
            "median_step_s_by_epoch": [statistics.median(seconds[e:e + per_epoch][args.skip:] or
                                                         seconds[e:e + per_epoch])
                                       for e in range(0, len(seconds), per_epoch)]}


def speed(args, work: Path, env: dict) -> dict:
    rows: dict[str, list] = {"mlxlab": [], "reference": []}
    data = subset(args, work)
    for rnd in range(args.rounds):
        for who in in_round(list(rows), rnd):
            before = load()
            if who == "mlxlab":
                out = work / f"speed_mlxlab_{rnd}"
                r = run_mlxlab(out, overrides(args, args.speed_steps, 0, None, data), env=env,
                               step_times=True)
                clock = [float(x) for x in out.with_name(out.name + ".times").read_text().split()]
                rows[who].append({**rates(args, [b - a for a, b in zip(clock, clock[1:])]),
                                  "rss_mb": r["rss_mb"], "mlx_peak_mb": max(
                                      m.get("memory/peak_mb", 0) for m in csv_metrics(out).values())})
            else:
                r = reference(args, work, args.speed_steps, 0, False, env, data)
                rows[who].append({**rates(args, r["train"]["step_seconds"]), "rss_mb": r["rss_mb"]})
            rows[who][-1]["load"] = [before, load()]
            print(who, json.dumps(rows[who][-1]), flush=True)
    rate = {k: statistics.median(r["examples_per_s"] for r in v) for k, v in rows.items()}
    table = {"head": ["trainer", "examples/s (median of rounds)", "median step s by epoch",
                      "peak RSS MB"], "rows": [
        [k, f"{rate[k]:.3f}", " / ".join(f"{t:.2f}" for t in v[-1]["median_step_s_by_epoch"]),
         f"{max(r['rss_mb'] for r in v):.0f}"] for k, v in rows.items()]}
    return {"rounds": rows, "table": table, "ratio": rate["mlxlab"] / rate["reference"]}


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
    run_marked(mlxlab_cli("eval", args.ct2, str(heldout)), work / "base_eval.log", args.reuse,
               what="base eval", env=env, cwd=env["MLXLAB_ROOT"])
    base = scores((work / "base_eval.log").read_text())
    task = next(iter(base))
    ours, theirs, per_seed = {}, {}, []
    for seed in args.seeds:
        log = work / f"train_s{seed}.log"
        run_marked(mlxlab_cli("train", *overrides(args, args.steps, seed, heldout)), log,
                   args.reuse, what="mlxlab train", env=env, cwd=env["MLXLAB_ROOT"])
        ours[seed] = scores(log.read_text())
        if seed in args.reference_seeds:
            ref = reference(args, work, args.steps, seed, True, env,
                            reuse=args.reuse)["heldout"]
            rows = we.score_transcriptions(ref["ids"], ref["refs"], ref["hyps"],
                                           we.text_normalizer("english"))
            t = base[task]
            theirs[seed] = {task: SavedTask(task, t.kind, we.corpus_rates(rows), rows, t.prompts)}
        per_seed.append({"seed": seed, **{name: {
            "vs_base": [p.as_dict() for p in pr.pair_runs(base, group[seed])],
            "invented_words_right": invented_right(group[seed][task].rows)}
            for name, group in (("mlxlab", ours), ("reference", theirs)) if seed in group}})
    pooled = {"mlxlab_vs_base": pr.pair_replicates({"base": base}, ours),
              "reference_vs_base": pr.pair_replicates({"base": base}, theirs),
              "mlxlab_vs_reference": pr.pair_replicates(theirs, ours)}
    return {"base": {**base[task].metrics, "invented_words_right": invented_right(base[task].rows)},
            "per_seed": per_seed,
            "pooled": {k: [p.as_dict() for p in v] for k, v in pooled.items()}}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_options(p, data=str(CACHE / "speech-set"), ct2=str(CACHE / "whisper-base-ct2"),
                hf=str(CACHE / "whisper-base"), steps=30, seeds="0,1,2", speed_steps=16, rounds=2,
                speed_rows=64, skip=2, batch=8, lr=1e-3, part="both", reference_seeds="0,1,2",
                work=str(Path("/tmp") / "bench_speech_finetune"),
                reuse=(False, "quality: keep the finished runs --work holds (a rerun after a kill)"))
    args = p.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.reference_seeds = [int(s) for s in args.reference_seeds.split(",")]
    if args.smoke:
        from benchmarks.speech.make_speech_set import main as make_set

        args.data = make_set(["--smoke"])["out"]
        args.steps, args.speed_steps, args.rounds, args.skip, args.seeds = 2, 4, 1, 0, [0]
        args.batch, args.speed_rows = 2, 4
    work = Path(args.work)
    env, uri = cli_root(work)
    if args.part in ("speed", "both"):
        figures = {"settings": vars(args), **speed(args, work, env)}
        print_table(figures["table"])
        write_record("whisper-lora-speed-vs-seq2seq", figures, question="speed-pytorch",
                     reference="transformers Seq2SeqTrainer + PEFT (CPU)", ratio=figures["ratio"],
                     smoke=args.smoke, summary="Whisper-base decoder LoRA, 2 epochs: examples/s "
                     "at equal settings (higher is better)")
    if args.part in ("quality", "both"):
        heldout = work / "held_out.jsonl"
        rows = [(r["file_name"], str(Path(args.data) / "test" / r["file_name"]),
                 r["transcription"]) for r in read_split(Path(args.data) / "test")]
        heldout.write_text("".join(json.dumps({"id": i, "audio": a, "text": t}) + "\n"
                                   for i, a, t in rows))
        heldout.with_name("val8.jsonl").write_text("".join(json.dumps(
            {"file_name": a, "transcription": t}) + "\n" for _, a, t in rows[:8]))
        figures = {"settings": vars(args), **quality(args, work, env, uri, heldout)}
        q = figures["pooled"]
        figures["table"] = {"head": ["trainer", "held-out WER (pooled seeds)", "vs the base"],
                            "rows": [["base", f"{figures['base']['wer']:.3f}", "-"]] + [
            [name, f"{q[key][0]['b']:.3f}", q[key][0]["verdict"]]
            for name, key in (("mlxlab", "mlxlab_vs_base"), ("reference", "reference_vs_base"))]}
        print_table(figures["table"])
        print(q["mlxlab_vs_reference"][0]["verdict"])
        write_record("whisper-lora-wer-vs-seq2seq", figures, question="quality",
                     reference="transformers Seq2SeqTrainer + PEFT (CPU)", smoke=args.smoke)

if __name__ == "__main__":
    main()
