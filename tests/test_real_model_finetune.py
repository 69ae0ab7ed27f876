"""benchmarks/quality/real_model_finetune.py: the date task it teaches SmolLM2-135M-Instruct, the base
model scored from its GGUF by `mlxlab eval`, and the whole pipeline (the smoke run on a tiny
random llama; the full run on the real model, slow)."""

from __future__ import annotations

import calendar
import datetime
import json
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.quality import real_model_finetune as bench  # noqa: E402

WORDS = {bench.ordinal(d): d for d in range(1, 32)}


def _parse(prompt: str) -> datetime.date:
    """The date a prompt writes in words, read back independently of how it was written."""
    phrase = prompt.removeprefix(bench.INSTRUCTION)
    month = next(m for m in calendar.month_name[1:] if m in phrase)
    day = next(WORDS[w] for w in sorted(WORDS, key=len, reverse=True)
               if re.search(rf"\b{w}\b", phrase))
    year = int(re.search(r"\b(\d{4})$", phrase).group(1))
    return datetime.date(year, list(calendar.month_name).index(month), day)


def test_ordinals_are_english():
    assert [bench.ordinal(n) for n in (1, 2, 3, 4, 11, 12, 20, 21, 22, 29, 30, 31)] == [
        "first", "second", "third", "fourth", "eleventh", "twelfth", "twentieth",
        "twenty-first", "twenty-second", "twenty-ninth", "thirtieth", "thirty-first"]
    assert len(set(WORDS)) == 31


def test_date_rows_are_right_distinct_and_seeded():
    train, val, heldout = bench.date_rows(400, 32, 200, seed=0)
    assert (len(train), len(val), len(heldout)) == (400, 32, 200)
    chats = [(c["messages"][0]["content"], c["messages"][1]["content"]) for c in train + val]
    assert all(c["messages"][0]["role"] == "user" and c["messages"][1]["role"] == "assistant"
               for c in train + val)
    pairs = chats + [(r["prompt"], r["answer"]) for r in heldout]
    for prompt, answer in pairs:  # every answer is the ISO form of the date in the prompt
        assert answer == _parse(prompt).isoformat(), prompt
    dates = [a for _, a in pairs]
    assert len(set(dates)) == len(dates)  # no held-out date is trained on
    assert len({r["id"] for r in heldout}) == 200
    assert len({(" day of " in p, " of " in p) for p, _ in pairs}) == len(bench.PHRASES)
    assert bench.date_rows(400, 32, 200, seed=0) == (train, val, heldout)
    assert bench.date_rows(400, 32, 200, seed=1)[2] != heldout


def test_held_out_rows_are_an_eval_task(tmp_path):
    from mlxlab.evaluation.tasks import GENERATION, read_task

    _, _, heldout = bench.date_rows(4, 0, 5)
    task = read_task(bench.write_jsonl(tmp_path / "dates.jsonl", heldout))
    assert task.kind == GENERATION and len(task.examples) == 5
    assert task.examples[0].answer == (heldout[0]["answer"],)


@pytest.mark.slow  # the default run's test_real_model reads the GGUF through the same resolver
def test_eval_takes_a_gguf_file(tmp_path):
    """`mlxlab eval <file.gguf> task.jsonl`: the model resolver turns the file into its folder
    (it said "no tokenizer.json in <file>" before)."""
    from mlxlab.runs.named_model import load_eval_model
    from real_models import packaged_model

    source = load_eval_model(str(packaged_model()))
    assert source.kind == "pretrained" and (source.path / "config.json").is_file()
    assert source.template is not None  # the GGUF's chat template


@pytest.mark.slow
def test_smoke_pipeline(tmp_path):
    """Every stage on a tiny random llama: base eval, mlxlab LoRA, its eval, the paired test,
    the GGUF Q8_0 export scored in llama.cpp, mlx_lm.lora and its fused eval."""
    pytest.importorskip("xllamacpp")
    result = bench.main(["--smoke", "--work", str(tmp_path)])
    for key in ("base", "mlxlab", "mlx-lm", "mlx-lm-fast", "llama.cpp"):
        assert result[key]["n"] == 4 and 0.0 <= result[key]["accuracy"] <= 1.0
    assert result["paired"]["n"] == 4 and result["paired"]["test"] == "mcnemar"
    assert result["export"]["bytes"] > 0
    assert json.loads((tmp_path / "results.json").read_text())["settings"]["steps"] == 2


@pytest.mark.slow
def test_real_model_learns_the_dates(tmp_path):
    """The full run on SmolLM2-135M-Instruct (tens of minutes on 2 cores): the fine-tune beats
    the base at p < 0.01, llama.cpp's GGUF Q8_0 keeps its accuracy within 2 points, and
    mlx_lm.lora's loop on the same settings does not score higher."""
    pytest.importorskip("xllamacpp")
    result = bench.main(["--work", str(tmp_path)])
    assert result["base"]["accuracy"] < 0.2
    assert result["paired"]["p"] < 0.01 and result["paired"]["diff"] > 0
    assert abs(result["llama.cpp"]["accuracy"] - result["mlxlab"]["accuracy"]) <= 0.02
    assert result["mlxlab"]["accuracy"] >= result["mlx-lm-fast"]["accuracy"]
