"""What does rendering chats with mlxlab's renderer cost beside transformers' apply_chat_template,
and do they agree on every chat (text, ids, and ChatML's assistant mask)? For each template style
and the shipped chats, both in this process, alternating `--rounds` times: median seconds per
1,000 chats, the ratio, and the chats that agree.

    python benchmarks/parity/bench_chat.py [--rounds 3] [--chats 200]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlxlab  # noqa: F401  (first: the fast BLAS, as every benchmark)
from mlxlab.config import asset_path
from mlxlab.data.chat import encode_chats, load_chat_template

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: benchmarks.*
from benchmarks.harness import add_smoke, cpu_model, tiny_hf_model, write_record  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
STYLES = ("chatml", "llama3", "qwen2.5")


def tagged_chatml() -> str:
    """ChatML with each reply and its <|im_end|> in {% generation %} tags."""
    return ("{% for message in messages %}{% if message['role'] == 'assistant' %}"
            "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + "
            "'<|im_end|>' }}{% endgeneration %}{{ '\\n' }}{% else %}{{ '<|im_start|>' + "
            "message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endif %}"
            "{% endfor %}")


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def measure(style: str, folder: Path, chats: list[dict], rounds: int) -> str:
    """One table row: median seconds per 1,000 chats each way, and the agreement counts."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    template = load_chat_template(folder)
    hf = AutoTokenizer.from_pretrained(str(folder))
    ours_s, theirs_s, masked_s = [], [], []
    for _ in range(rounds):
        t, ours = timed(lambda: encode_chats(tok, template, chats))
        ours_s.append(t)
        t, theirs = timed(lambda: [hf.apply_chat_template(c["messages"], return_dict=True)
                                   ["input_ids"] for c in chats])
        theirs_s.append(t)
        if style == "chatml":
            t, masks = timed(lambda: [hf.apply_chat_template(
                c["messages"], chat_template=tagged_chatml(), return_dict=True,
                return_assistant_tokens_mask=True)["assistant_masks"] for c in chats])
            masked_s.append(t)
    texts = [hf.apply_chat_template(c["messages"], tokenize=False) for c in chats]
    same = sum(o.text == text and o.ids.tolist() == list(ids)
               for o, text, ids in zip(ours, texts, theirs))
    same_mask = masked = "-"
    per = 1000 / len(chats)
    if style == "chatml":
        agree = sum(o.assistant_mask.astype(int).tolist() == m for o, m in zip(ours, masks))
        same_mask, masked = f"{agree}/{len(chats)}", f"{statistics.median(masked_s) * per:.2f}"
    ours_m, theirs_m = statistics.median(ours_s) * per, statistics.median(theirs_s) * per
    return (f"| {style} | {ours_m:.2f} | {theirs_m:.2f} | {ours_m / theirs_m:.2f}x | {masked} | "
            f"{same}/{len(chats)} | {same_mask} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chats", type=int, default=200)
    add_smoke(parser)
    args = parser.parse_args()
    if args.smoke:  # 4 chats, one round, every style
        args.rounds, args.chats = 1, 4
    tiny = tiny_hf_model()
    lines = Path(asset_path("tinystories/chats.jsonl")).read_text().splitlines()[: args.chats]
    chats = [json.loads(line) for line in lines]
    print(f"CPU: {cpu_model()}; {len(chats)} chats, {args.rounds} rounds")
    print("| template | mlxlab s / 1,000 chats (text, ids, mask) | transformers s / 1,000 (ids) "
          "| ratio | transformers with its mask (tagged) | same text+ids | same mask |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for style in STYLES:
            folder = tiny.save_chat_tokenizer(style, Path(root) / style)
            rows.append(measure(style, folder, chats, args.rounds))
            print(rows[-1])
    write_record("chat", {"chats": len(chats), "rounds": args.rounds, "rows": rows},
                 question="parity", smoke=args.smoke)


if __name__ == "__main__":
    main()
