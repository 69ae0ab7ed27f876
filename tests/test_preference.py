"""Preference tuning (issue 50): data=preference renders pairs as data=chat renders chats, and
experiment=dpo_chat / orpo_chat train through the one loop on a tiny random Llama with a ChatML
template, logging the reward metrics to a real MLflow store; a SIGKILLed DPO run resumes
bitwise."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from hf_helpers import save_tiny_model
from mlxlab.data.batching import Batching
from mlxlab.data.chat import encode_chat, load_chat_template
from mlxlab.data.preference import PreferencePairs
from mlxlab.errors import ConfigError

WORDS = ["cat", "dog", "sun", "tree", "ball", "milk", "red", "big", "hat", "cup"]


def generated_pairs(n: int, seed: int = 0) -> list[dict]:
    """`n` pairs a model can learn to tell apart: the chosen reply repeats one pattern
    ("yes yes yes"), the rejected one is random words; prompts are random words too. Every
    fourth pair is conversational (TRL's form), the rest strings (mlx-lm-lora's)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        prompt = " ".join(rng.choice(WORDS, 4))
        chosen = " ".join(["yes"] * int(rng.integers(2, 5)))
        rejected = " ".join(rng.choice(WORDS, int(rng.integers(2, 5))))
        if i % 4 == 3:
            rows.append(
                {
                    "prompt": [{"role": "user", "content": prompt}],
                    "chosen": [{"role": "assistant", "content": chosen}],
                    "rejected": [{"role": "assistant", "content": rejected}],
                }
            )
        else:
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def pref_model(tmp_path_factory) -> dict:
    """A tiny random Llama with ChatML's tokens and template, 240 training and 40 held-out
    generated pairs."""
    root = tmp_path_factory.mktemp("preference")
    folder = save_tiny_model("llama", root / "tiny-chatml", chat="chatml")
    return {
        "folder": folder,
        "root": root,
        "train": write_jsonl(root / "train.jsonl", generated_pairs(240)),
        "val": write_jsonl(root / "val.jsonl", generated_pairs(40, seed=1)),
    }


def pairs_data(folder: Path, train: Path, **kwargs) -> PreferencePairs:
    data = PreferencePairs(str(train), tokenizer={"path": str(folder / "tokenizer.json")}, **kwargs)
    data.setup(None)
    return data


# --- data=preference --------------------------------------------------------------------------


def test_each_side_is_the_chat_renderers_chat_scored_on_its_reply(pref_model, tmp_path):
    """Every form of a row gives the ids encode_chat gives for prompt + reply (data=chat's one
    renderer), and the completion mask is the reply and its <|im_end|> alone."""
    system = {"role": "system", "content": "be kind"}
    user = {"role": "user", "content": "hi there"}
    yes, no = {"role": "assistant", "content": "yes yes"}, {"role": "assistant", "content": "no"}
    rows = [
        {"prompt": "hi there", "chosen": "yes yes", "rejected": "no", "system": "be kind"},
        {"prompt": [system, user], "chosen": [yes], "rejected": no},
        {"chosen": [system, user, yes], "rejected": [system, user, no]},
    ]  # implicit prompt
    folder = pref_model["folder"]
    data = pairs_data(
        folder, write_jsonl(tmp_path / "p.jsonl", rows), val_file=str(tmp_path / "p.jsonl")
    )
    template = load_chat_template(folder)
    for side, reply in (("chosen", yes), ("rejected", no)):
        expected = encode_chat(data.tokenizer, template, [system, user, reply])
        for i in range(3):
            ids, mask = data.val.ids[side][i], data.val.masks[side][i]
            assert np.array_equal(ids, expected.ids), (side, i)
            learnt = data.tokenizer.decode(
                [int(t) for t, m in zip(ids, mask) if m], skip_special_tokens=False
            )
            assert learnt == reply["content"] + "<|im_end|>"

    batch = next(iter(data.val_batches(Batching(batch_size=3))))
    assert batch["chosen_input_ids"].shape == batch["rejected_input_ids"].shape
    assert batch["index"].tolist() == [0, 1, 2]
    # labels are the inputs shifted by one; the mask sits on the positions predicting the reply
    ids = np.array(batch["chosen_input_ids"])
    assert np.array_equal(np.array(batch["chosen_labels"])[:, :-1], ids[:, 1:])


def test_long_pairs_are_cut_or_dropped_and_counted(pref_model, caplog):
    folder, train = pref_model["folder"], pref_model["train"]
    full = pairs_data(folder, train)
    longest = int(full.train.lengths().max())
    with caplog.at_level(logging.WARNING):
        cut = pairs_data(folder, train, max_length=longest - 3)
        dropped = pairs_data(folder, train, max_length=longest - 3, too_long="drop")
    lines = [r.getMessage() for r in caplog.records]
    assert any("were cut (data.too_long=truncate)" in line for line in lines)
    n_long = int(lines[0].split(": ")[1].split(" of ")[0])
    assert n_long > 0 and len(dropped.train) == len(full.train) - n_long
    assert len(cut.train) == len(full.train)
    assert max(len(ids) for ids in cut.train.ids["chosen"]) <= longest - 2


def test_a_bad_row_names_its_line_and_the_fix(pref_model, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [*generated_pairs(2), {"prompt": "a", "chosen": "b"}])
    with pytest.raises(
        ConfigError,
        match=r"bad.jsonl:3: not a JSON object with 'chosen' and "
        r"'rejected'; fix the line",
    ):
        pairs_data(pref_model["folder"], bad)
    with pytest.raises(ConfigError, match="data.keys has unknown keys"):
        PreferencePairs(str(bad), keys={"answer": "x"})
