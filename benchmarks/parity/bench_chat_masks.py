"""Are the assistant masks right on the real chat templates (tests/chat_templates)? For each, on
a chat with and without tools: the tokens mlxlab marks as the assistant's, those the replies and
their end-of-turn tokens hold (tests/chat_fixtures.py REPLIES), and whether text and ids equal
transformers'. Runs against whichever mlxlab is on the path (PYTHONPATH=<checkout>/src).

    python benchmarks/parity/bench_chat_masks.py
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import mlxlab  # noqa: F401  (first: the fast BLAS, as every benchmark)
from mlxlab.data.chat import encode_chat, load_chat_template

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
from chat_fixtures import (  # noqa: E402
    REPLIES,
    STYLES,
    SYSTEM,
    TOOLS,
    TURNS,
    WITH_TOOLS,
    base_tokenizer,
    save_style,
)

sys.path.insert(0, str(REPO))  # benchmarks.*
from benchmarks.harness import add_smoke, write_record  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_smoke(parser)  # the whole script is a smoke's size: --smoke runs it as it is
    args = parser.parse_args()
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    root, base = Path(tempfile.mkdtemp()), base_tokenizer()
    print("| template | chat | marked tokens | reply tokens (by hand) | right | same text+ids |")
    print("|---|---|---:|---:|---|---|")
    rows = []
    for style in STYLES:
        folder = save_style(style, root / style, base)
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        hf = AutoTokenizer.from_pretrained(str(folder))
        hand = sum(len(tok.encode(r, add_special_tokens=False).ids) for r in REPLIES[style])
        chats = [("system + 2 turns", [SYSTEM, *TURNS], None)]
        if style in WITH_TOOLS:
            chats.append(("tools, no call", TURNS, TOOLS))
        for name, messages, tools in chats:
            try:
                chat = encode_chat(tok, load_chat_template(folder), messages, tools=tools)
            except Exception as e:  # noqa: BLE001 (a refusal is a result here)
                rows.append(f"| {style} | {name} | refused: {str(e)[:80]} | {hand} | - | - |")
                print(rows[-1])
                continue
            ids = hf.apply_chat_template(messages, tools=tools, return_dict=True)["input_ids"]
            text = hf.apply_chat_template(messages, tools=tools, tokenize=False)
            marked = int(chat.assistant_mask.sum())
            same = chat.text == text and chat.ids.tolist() == list(ids)
            rows.append(f"| {style} | {name} | {marked} | {hand} | {marked == hand} | {same} |")
            print(rows[-1])
    write_record("chat-masks", {"rows": rows}, question="parity", smoke=args.smoke)


if __name__ == "__main__":
    main()
