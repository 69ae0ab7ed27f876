"""bench_sizes.py's runs at equal work: every tool's trained tokens counted as mlxlab counts them.

    python benchmarks/speed/sizes_equal_count.py RUNS [--tokenizer DIR] [--skip 4] [--smoke]

(bench_sizes.py prints this table after its own; `--smoke` runs bench_sizes.py's smoke, which
ends with it.)

Each tool reports trained tokens by its own count, and the counts differ for the same chat:
mlx-lm's `--mask-prompt` mask runs from the reply's first token through one position past the
row's end (`steps <= lengths`), so it also scores the template's newline after `<|im_end|>` and a
padding position; PEFT's labels (real_model_torch_peft.py encode_chat) score that newline.
mlxlab scores the reply through `<|im_end|>`. Per chat the difference is a constant of the
template (checked on every training chat here: the script stops if it is not), so each step's
count is brought to mlxlab's by subtracting it once per chat in the step. Then, per tool, over
the steps after `--skip`: trained tokens / seconds (sums, not a median of per-step rates: the
tools' steps hold different chats), chats / second, and the median milliseconds a step.
Step seconds: mlx-lm's and PEFT's own per-step reports; mlxlab's trained tokens of the step
(its data module, the run's seed and settings: the same batches the run drew) over the step's
`train/tokens_per_sec` (log_every_steps=1).
"""

from __future__ import annotations

import argparse
import collections
import csv
import json
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
from benchmarks.common import add_smoke  # noqa: E402


def mlxlab_steps(data: Path, tokenizer: Path, packed: bool, steps: int, seed: int = 42
                 ) -> list[tuple[int, float]]:
    """(chats, trained tokens) of each of a bench_sizes mlxlab run's first `steps` steps."""
    from benchmarks.speed.bench_sizes import BATCH, SEQ
    from mlxlab.data.batching import Batching
    from mlxlab.data.completions import PromptCompletion

    module = PromptCompletion(train_file=str(data / "train.jsonl"),
                              val_file=str(data / "valid.jsonl"), max_length=SEQ,
                              tokenizer={"path": str(tokenizer / "tokenizer.json")}, pack=packed,
                              seed=seed)
    module.setup()
    out = []
    for _, batch in zip(range(steps), module.train_batches(Batching(1 if packed else BATCH), 0)):
        chats = int(batch["segment_ids"].max(axis=1).sum()) if packed else batch["input_ids"].shape[0]
        out.append((chats, float(batch["loss_mask"].sum())))
    return out


def count_differences(data: Path, tokenizer: Path) -> dict[str, int]:
    """Per chat, how many more tokens mlx-lm's and PEFT's counts score than mlxlab's: one
    constant each, or the script stops (no per-step correction would be exact)."""
    from transformers import AutoTokenizer

    from benchmarks.quality.real_model_torch_peft import encode_chat
    from benchmarks.speed.bench_sizes import SEQ
    from mlxlab.data.completions import PromptCompletion

    tok = AutoTokenizer.from_pretrained(str(tokenizer))
    module = PromptCompletion(train_file=str(data / "train.jsonl"),
                              val_file=str(data / "valid.jsonl"), max_length=SEQ,
                              tokenizer={"path": str(tokenizer / "tokenizer.json")})
    module.setup()
    ours = {tuple(ids): int(sum(mask[1:])) for ids, mask in zip(*module.train)}
    seen: dict[str, set[int]] = {"mlx-lm": set(), "torch-peft": set()}
    for line in (data / "train.jsonl").read_text().splitlines():
        messages = json.loads(line)["messages"]
        full = tok.apply_chat_template(messages, return_dict=False)
        offset = len(tok.apply_chat_template(messages[:-1], add_generation_prompt=True,
                                             return_dict=False))
        mine = ours[tuple(full)]
        seen["mlx-lm"].add(len(full) - offset + 1 - mine)
        ids, labels = encode_chat(tok, messages)
        seen["torch-peft"].add(sum(label != -100 for label in labels[1:]) - mine)
    if any(len(v) != 1 for v in seen.values()):
        sys.exit(f"the counts differ by no constant per chat: {seen}")
    return {tool: v.pop() for tool, v in seen.items()}


def run_steps(run: Path, tool: str, mlxlab_rows: dict, differences: dict
              ) -> list[tuple[int, float, float]] | None:
    """(chats, trained tokens at mlxlab's count, seconds) per step of one run's folder."""
    report = run / "report.jsonl"
    if tool == "mlx-lm" and report.is_file():
        rows = [json.loads(line) for line in report.read_text().splitlines()]
        before = [0] + [r["trained_tokens"] for r in rows]
        return [(4, r["trained_tokens"] - b - 4 * differences["mlx-lm"],
                 1 / r["iterations_per_second"]) for r, b in zip(rows, before)]
    if tool == "torch-peft" and report.is_file():
        rows = [json.loads(line) for line in report.read_text().splitlines()]
        return [(4, r["tokens_per_sec"] * r["seconds"] - 4 * differences["torch-peft"],
                 r["seconds"]) for r in rows]
    metrics = run / "tracking" / "metrics.csv"
    if not metrics.is_file():
        metrics = run / "metrics.csv"  # as kept under benchmarks/results
    if tool.startswith("mlxlab") and metrics.is_file():
        rates: dict[int, float] = {}
        for row in csv.DictReader(metrics.open()):
            if row["name"] == "train/tokens_per_sec":
                rates[int(row["step"])] = float(row["value"])
        drawn = mlxlab_rows[tool == "mlxlab-packed"]  # (mlxlab-b128: the same rows, wider)
        return [(chats, tokens, tokens / rates[s]) for s, (chats, tokens) in
                enumerate(drawn[:len(rates)], 1)]
    return None


def table(runs: Path, data: Path, tokenizer: Path, skip: int, steps: int = 64) -> str:
    differences = count_differences(data, tokenizer)
    mlxlab_rows = {p: mlxlab_steps(data, tokenizer, p, steps) for p in (False, True)}
    found: dict[tuple[str, str], dict[str, list]] = collections.defaultdict(dict)
    tools = ("mlx-lm", "mlxlab", "mlxlab-b128", "mlxlab-packed", "torch-peft")
    for run in sorted(runs.iterdir()):
        tool = next((t for t in sorted(tools, key=len, reverse=True)
                     if f"-{t}-" in run.name), None)
        if tool is None:
            continue
        size_mode = run.name[:run.name.index(f"-{tool}-")]
        got = run_steps(run, tool, mlxlab_rows, differences)
        if got:
            found[tuple(size_mode.rsplit("-", 1))].setdefault(tool, []).append(got[skip:])
    lines = [f"equal count: mlx-lm scores {differences['mlx-lm']} and PEFT "
             f"{differences['torch-peft']} tokens a chat more than mlxlab; steps after {skip}",
             "| model | mode | tool | tokens/s (mlxlab's count) | vs mlx_lm.lora | chats/s | "
             "ms a step (median) |", "|---|---|---|---:|---:|---:|---:|"]
    for (size, mode), by_tool in found.items():
        rate = {t: sum(s[1] for r in rs for s in r) / sum(s[2] for r in rs for s in r)
                for t, rs in by_tool.items()}
        for tool in tools:
            if tool not in by_tool:
                continue
            steps_ = [s for r in by_tool[tool] for s in r]
            chats = sum(s[0] for s in steps_) / sum(s[2] for s in steps_)
            ratio = f"{rate[tool] / rate['mlx-lm']:.2f}x" if "mlx-lm" in rate else "-"
            shown = f"{rate[tool]:.0f}" if rate[tool] >= 100 else f"{rate[tool]:.2f}"
            lines.append(f"| {size} | {mode} | {tool} | {shown} | {ratio} | {chats:.2f} "
                         f"| {1000 * statistics.median(s[2] for s in steps_):.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="?", help="bench_sizes.py's WORK/runs (or a copy of its logs)")
    p.add_argument("--tokenizer", default=None, help="SmolLM2's tokenizer folder "
                   "(default: the packaged GGUF's, as bench_sizes.py reads it)")
    p.add_argument("--skip", type=int, default=4)
    add_smoke(p)
    args = p.parse_args(argv)
    from benchmarks.speed.bench_sizes import data_folder
    from benchmarks.speed.bench_sizes import main as bench_sizes

    if args.smoke:
        bench_sizes(["--smoke", "--modes", "lora", "--tools", "mlx-lm,mlxlab,mlxlab-packed"])
        return
    if not args.runs:
        p.error("RUNS: bench_sizes.py's WORK/runs")

    work = Path(args.runs).resolve().parent  # bench_sizes.py's WORK holds data/; a copy may not
    data = work / "data" if (work / "data").is_dir() else data_folder(Path(tempfile.mkdtemp()))
    if args.tokenizer:
        tokenizer = Path(args.tokenizer)
    else:
        from mlxlab.models.sources import model_folder
        from real_models import packaged_model

        tokenizer = model_folder(str(packaged_model()))
    print(table(Path(args.runs), data, tokenizer, args.skip))


if __name__ == "__main__":
    main()
