"""Does a gated-delta hybrid learn at length? A key stated more than 2,048 tokens before its
question, recalled after fine-tuning: held-out exact match, paired per seed against the base and
against the same fine-tune cut at 512 tokens.

1. A Qwen3.5-shaped hybrid, random weights (transformers' Qwen3_5TextConfig, saved as a Hugging
   Face folder mlx-lm loads: hidden 128, 3 gated-delta layers and 1 attention layer, a 2,048-token
   BPE trained on the shipped TinyStories text), pretrained through mlxlab on the TinyStories
   paragraphs the task's training filler comes from, each followed by its copy
   (`experiment=finetune_text`, full fine-tune), exported (`mlxlab export --format mlx-lm`): the
   base. On the plain text, 400 steps leave a base whose fine-tunes stay at chance even with the
   key 40 tokens back; with the copies they learn it there (small runs, CHANGELOG).
   --short-filler N: the base is then fine-tuned once on the task with the key N tokens back
   (within the cut, so both arms start from it; short_base says why).
2. The task (data=completions rows): "The secret word is <w>." then --filler tokens of TinyStories
   paragraphs, then "What is the secret word? The secret word is" -> " <w>", <w> one of --keys
   one-token words (chance 1 / --keys). Training and held-out rows draw their filler from disjoint
   paragraphs, with fixed seeds.
3. Fine-tunes from the base, full (model.lora.rank=0), per seed: "full" on the whole rows
   (data.max_length covers them), "cut" at --cut tokens. data.too_long=truncate keeps a row's
   first tokens and drops its end, which would drop the question and its answer and leave nothing
   to learn, so the cut rows are the full rows' last tokens instead: the question and answer, the
   filler before them, never the key (checked). Every model is scored on the same full-length
   held-out prompts by the run's own evaluation (eval.tasks, greedy; `mlxlab eval` for the base),
   paired example by example (mlxlab.evaluation.paired: McNemar per seed, bootstrap over seeds).

    python benchmarks/quality/bench_long_recall.py --work DIR --copy-distance 250 \
        --short-filler 150 --steps 300 --lr 1e-3   (--help: the sizes)

--work keeps each finished stage (the base, each fine-tune's scores): a second call runs only
what is missing.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # benchmarks.*
import benchmarks.harness as h  # noqa: E402
from mlxlab.data.tokenizer import build_tokenizer  # noqa: E402
from mlxlab.evaluation.paired import pair_replicates  # noqa: E402
from mlxlab.evaluation.results import read_scores  # noqa: E402

TEXT = REPO / "src" / "mlxlab" / "assets" / "tinystories" / "sample.txt"
# Words TinyStories uses often enough that a 2,048-token BPE keeps each as one token after a space
WORDS = ("cat", "dog", "ball", "tree", "sun", "bird", "fish", "cake", "car", "box", "hat", "boat",
         "duck", "park", "apple", "bear", "red", "blue", "book", "toy", "girl", "boy")
QUESTION = "\n\nWhat is the secret word? The secret word is"
TASK = "recall"  # the held-out task file's stem: eval/recall/exact_match
COMMON = ("callbacks.progress.enabled=false", "tracking=none", "optimized_metric=val/loss",
          "optimized_mode=min")


def hybrid_folder(folder: Path, paragraphs: list[str], a) -> Path:
    """The random Qwen3.5-shaped hybrid and its tokenizer, written once."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    import transformers as t

    tok = build_tokenizer(paragraphs[:3000], vocab_size=2048, kind="bytelevel_bpe",
                          special_tokens=["<|endoftext|>"])
    eos = tok.token_to_id("<|endoftext|>")
    config = t.Qwen3_5TextConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=a.hidden, intermediate_size=3 * a.hidden,
        num_hidden_layers=4, layer_types=["linear_attention"] * 3 + ["full_attention"],
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, linear_conv_kernel_dim=4,
        linear_key_head_dim=32, linear_value_head_dim=32, linear_num_key_heads=2,
        linear_num_value_heads=4, max_position_embeddings=4096, tie_word_embeddings=True,
        eos_token_id=eos, pad_token_id=eos, bos_token_id=None)
    torch.manual_seed(0)
    t.AutoModelForCausalLM.from_config(config).float().save_pretrained(folder)
    t.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                              pad_token="<|endoftext|>").save_pretrained(folder)
    return folder


def recall_rows(pool: list[list[int]], tok, keys: list[str], n: int, filler: tuple[int, int],
                seed: int) -> list[dict]:
    """`n` rows: a key, then tokens of paragraphs drawn from `pool` (token ids), as many as
    `filler` (lo, hi) says (log-uniform between them: each doubling of the distance gets as many
    rows), then the question."""
    rng, sep, rows = random.Random(seed), tok.encode("\n\n").ids, []
    for _ in range(n):
        ids: list[int] = []
        length = round(math.exp(rng.uniform(math.log(filler[0]), math.log(filler[1]))))
        while len(ids) < length:
            ids += rng.choice(pool) + sep
        key = rng.choice(keys)
        prompt = f"The secret word is {key}.\n\n{tok.decode(ids[:length]).strip()}{QUESTION}"
        rows.append({"prompt": prompt, "completion": f" {key}", "answer": key})
    return rows


def cut_row(row: dict, tok, cut: int) -> dict:
    """The row's last tokens: prompt + completion + EOS within `cut` + 1; the key is left out
    of every row that does not fit whole."""
    ids, keep = tok.encode(row["prompt"]).ids, cut - 3
    if len(ids) <= keep:
        return row
    while len(tok.encode(prompt := tok.decode(ids[-keep:])).ids) > cut - 1:
        keep -= 1  # a cut through a word can encode longer than it was
    assert "secret word is " + row["answer"] not in prompt
    return {**row, "prompt": prompt}


def make_task(out: Path, tok, a) -> dict:
    """train/val (full and cut) and held-out jsonl; their token lengths."""
    paragraphs = [p.strip() for p in TEXT.read_text().split("\n\n") if p.strip()]
    split = int(len(paragraphs) * 0.7)  # training filler: the first 70 %, held-out: the rest
    pools = [[tok.encode(p).ids for p in part] for part in (paragraphs[:split], paragraphs[split:])]
    keys = [w for w in WORDS if len(tok.encode(" " + w).ids) == 1][:a.keys]
    if len(keys) < a.keys:
        sys.exit(f"only {len(keys)} one-token keys in WORDS: lower --keys")
    spread = (a.filler_min or a.filler, a.filler)
    rows = {"train": recall_rows(pools[0], tok, keys, a.train_rows, spread, 1),
            "val": recall_rows(pools[0], tok, keys, a.val_rows, spread, 2),
            TASK: recall_rows(pools[1], tok, keys, a.heldout_rows, (a.filler, a.filler), 3)}
    rows |= {f"{s}_cut": [cut_row(r, tok, a.cut) for r in rows[s]] for s in ("train", "val")}
    for name, some in rows.items():
        keep = ("prompt", "answer") if name == TASK else ("prompt", "completion")
        h.write_jsonl(out / f"{name}.jsonl", [{k: r[k] for k in keep} for r in some])
    lengths = [len(tok.encode(r["prompt"]).ids) for r in rows[TASK]]
    back = [n - len(tok.encode(QUESTION).ids) - len(tok.encode(f"The secret word is {r['answer']}.").ids)
            for n, r in zip(lengths, rows[TASK])]
    # The pretraining text: each training paragraph, then the same again (one document), so
    # the base learns to copy what it saw before (as real pretrained models can) in a few
    # hundred steps: from TinyStories' own text it would take far more than this budget
    # (--copy-distance N: N tokens of the next paragraphs between a paragraph and its copy)
    docs, train = [], paragraphs[:split]
    for i, p in enumerate(train):
        between, n, j = [], 0, i + 1
        while n < a.copy_distance and j < len(train):
            between.append(train[j])
            n, j = n + len(pools[0][j]), j + 1
        docs.append("\n".join([p, *between, p]))
    (out / "pretrain.txt").write_text("\n\n".join(docs))
    return {"keys": keys, "chance": 1 / len(keys), "prompt_tokens": [min(lengths), max(lengths)],
            "tokens_between_key_and_question": min(back)}


def pretrain(out: Path, folder: Path, env: dict, a) -> Path:
    """The base: the random hybrid pretrained on the training paragraphs, exported once."""
    base = out / "base"
    if not (base / "config.json").is_file():
        text, _ = h.run_logged(h.train_cli(
            "experiment=finetune_text", "task_name=recall_pretrain", f"model.pretrained={folder}",
            "model.lora.rank=0", f"data.source.data_files={out / 'pretrain.txt'}",
            f"data.packing.seq_len={a.pretrain_len}", "data.splits.val_examples=20",
            f"trainer.batch_size={a.batch}", f"trainer.max_steps={a.pretrain_steps}",
            f"trainer.eval_every_steps={a.pretrain_steps}", "trainer.schedule.warmup_steps=20",
            f"optimizer.learning_rate={a.pretrain_lr}", *COMMON), env, out / "pretrain.log")
        run_dir = h.line_value(text, "run dir:")
        h.run_logged(h.mlxlab_cli("export", run_dir, "--format", "mlx-lm", "--out", str(base),
                                  "--overwrite"), env, out / "export.log")
    return base


def base_scores(out: Path, base: Path, env: dict) -> Path:
    """The base's per-example scores on the held-out prompts (`mlxlab eval`), written once."""
    scores = out / "scores_base"
    if not (scores / "summary.json").is_file():
        h.run_logged(h.mlxlab_cli("eval", str(base), str(out / f"{TASK}.jsonl"), "--tasks",
                                  "--max-new-tokens", "4", "--no-track", "--out", str(scores)),
                     env, out / "base_eval.log")
    return scores


def fine_tune(out: Path, base: Path, env: dict, arm: str, seed: int, a) -> Path:
    """One fine-tune ("full" or "cut") of the base at `seed`: the folder of its held-out scores."""
    scores = out / f"scores_{arm}_{seed}"
    if not (scores / "summary.json").is_file():
        shutil.copytree(train_arm(out, base, env, arm, seed, a) / "eval_tasks" / "last", scores)
    return scores


def short_base(out: Path, base: Path, tok, env: dict, a) -> Path:
    """--short-filler: the base fine-tuned once (seed 0, --short-steps, --short-lr) on the task
    with the key that many tokens back, within the cut, and exported: where both arms start, so that what
    each adds is training at length or at --cut tokens. This small random hybrid learns the
    look-up from nothing only with the key close (150 tokens back in 1,000 steps; at 300 to
    2,200 tokens, and with distances mixed up to 2,200, its fine-tunes stayed at chance)."""
    folder = out / "base_short"
    if not (folder / "config.json").is_file():
        short = argparse.Namespace(**{**vars(a), "filler": a.short_filler, "filler_min": None,
                                      "steps": a.short_steps, "lr": a.short_lr,
                                      "max_tokens": None})
        (out / "short").mkdir(exist_ok=True)
        task = make_task(out / "short", tok, short)
        short.max_length = task["prompt_tokens"][1] + 32
        run = train_arm(out / "short", base, env, "full", 0, short)
        h.run_logged(h.mlxlab_cli("export", str(run), "--format", "mlx-lm", "--out", str(folder),
                                  "--overwrite"), env, out / "export_short.log")
    return folder


def train_arm(out: Path, base: Path, env: dict, arm: str, seed: int, a) -> Path:
    """The run folder of one fine-tune of `base` on out's rows (full or cut), scored on out's
    held-out prompts."""
    suffix, length = ("", a.max_length) if arm == "full" else ("_cut", a.cut)
    text, _ = h.run_logged(h.train_cli(
        "experiment=finetune_completions", f"task_name=recall_{arm}", f"model.pretrained={base}",
        "model.lora.rank=0", f"data.train_file={out / f'train{suffix}.jsonl'}",
        f"data.val_file={out / f'val{suffix}.jsonl'}", f"data.max_length={length}",
        "data.too_long=drop", f"trainer.batch_size={a.batch}", f"trainer.max_steps={a.steps}",
        *(("trainer.batching.dynamic=true", f"trainer.batching.max_tokens={a.max_tokens}",
           f"trainer.batching.max_batch_size={a.batch}", "trainer.batching.bucket_multiple=128")
          if a.max_tokens else ()),
        f"trainer.eval_every_steps={a.steps}", f"optimizer.learning_rate={a.lr}", f"seed={seed}",
        f"eval.tasks=[{out / f'{TASK}.jsonl'}]", "eval.max_new_tokens=4", *COMMON),
        env, out / f"{arm}_{seed}.log")
    if "were dropped" in text:
        sys.exit(f"{arm} seed {seed}: rows longer than data.max_length={length} (see its log)")
    return Path(h.line_value(text, "run dir:"))


def paired(a_group: dict, b_group: dict) -> dict:
    """B against A over the seeds (mlxlab.evaluation.paired), exact match only."""
    found = [p for p in pair_replicates(a_group, b_group) if p.metric == "exact_match"]
    return found[0].as_dict()


def main() -> None:
    parser = argparse.ArgumentParser()
    h.add_options(parser, work=(None, "keeps each stage (default /tmp/bench_long_recall)"),
                  seeds=3, filler=(2200, "tokens of filler between the key and the question"),
                  filler_min=(None, "training rows' filler drawn log-uniform from here to "
                              "--filler (held-out rows: --filler)", int),
                  max_tokens=(None, "fine-tunes batch rows by length under this many tokens", int),
                  cut=(512, "the cut run's data.max_length"), keys=(16, "one-token keys"),
                  hidden=128, pretrain_steps=400, pretrain_len=512, pretrain_lr=2e-3,
                  train_rows=800, val_rows=16, heldout_rows=96, steps=100, batch=8, lr=2e-3,
                  copy_distance=(0, "tokens between a pretraining paragraph and its copy"),
                  short_filler=(None, "both arms start from the base fine-tuned with the key "
                                "this many tokens back (short_base)", int), short_steps=1000,
                  short_lr=2e-3)
    a = parser.parse_args()
    if a.smoke:  # the whole path at a toy size: its figures mean nothing
        a.work, a.seeds, a.filler, a.cut, a.pretrain_steps, a.pretrain_len = None, 1, 80, 48, 4, 64
        a.train_rows, a.val_rows, a.heldout_rows, a.steps = 16, 4, 8, 4
        a.short_filler, a.short_steps = 16, 4
    out = Path(a.work or (h.smoke_dir("long_recall") if a.smoke else "/tmp/bench_long_recall"))
    out.mkdir(parents=True, exist_ok=True)
    env, _ = h.cli_root(out)
    from tokenizers import Tokenizer

    times: dict[str, float] = {}
    started = time.perf_counter()
    paragraphs = [p.strip() for p in TEXT.read_text().split("\n\n") if p.strip()]
    folder = hybrid_folder(out / "init", paragraphs, a)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    task = make_task(out, tok, a)
    a.max_length = task["prompt_tokens"][1] + 32  # the longest row, its answer and EOS
    base = pretrain(out, folder, env, a)
    if a.short_filler:
        base = short_base(out, base, tok, env, a)
    times["base"] = time.perf_counter() - started
    groups: dict[str, dict] = {"base": {}, "full": {}, "cut": {}}
    base_tasks = read_scores(base_scores(out, base, env))
    for seed in range(a.seeds):
        groups["base"][str(seed)] = base_tasks
        for arm in ("full", "cut"):
            clock = time.perf_counter()
            groups[arm][str(seed)] = read_scores(fine_tune(out, base, env, arm, seed, a))
            times[f"{arm}_{seed}"] = time.perf_counter() - clock
    exact = {arm: {s: t[TASK].metrics["exact_match"] for s, t in g.items()}
             for arm, g in groups.items()}
    results = {**task, "settings": {k: v for k, v in vars(a).items() if k != "smoke"},
               "exact_match": exact, "full_vs_base": paired(groups["base"], groups["full"]),
               "full_vs_cut": paired(groups["cut"], groups["full"]), "wall_s": times,
               "load_average": h.load()}
    start = f"base + {a.short_filler}-token fine-tune" if a.short_filler else "base"
    table = {"head": ["seed", start, f"cut at {a.cut}", "full"],
             "rows": [[s, exact["base"][s], exact["cut"][s], exact["full"][s]]
                      for s in exact["full"]]}
    results["table"] = table
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    h.write_record("long-recall", results, question="quality", smoke=a.smoke,
                   raw=str(out / "results.json"))
    h.print_table(table)
    print(results["full_vs_base"]["verdict"], results["full_vs_cut"]["verdict"], sep="\n")
    print("wall time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))


if __name__ == "__main__":
    main()
