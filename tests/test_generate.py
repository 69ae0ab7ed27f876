"""`mlxlab generate` and `mlxlab eval` on a real (tiny) tinystories_nano run, and inference.py's
sampling loop underneath: loading, sampling, streaming, errors."""

from __future__ import annotations

import json
import shutil
import subprocess
from itertools import islice

import pandas as pd
import pytest

from conftest import MLXLAB, mlxlab
from mlxlab.cli.main import main
from mlxlab.data.tokenizer import build_tokenizer
from mlxlab.decoding.generation import generate_tokens
from mlxlab.runs.inference import complete, decode_stream, load_run, predict_frame, sample_ids


@pytest.fixture(scope="module")
def loaded(tiny_lm_run):
    return load_run(tiny_lm_run[0])


def test_same_seed_same_text_other_seed_other_text(loaded):
    kw = dict(max_tokens=30, temperature=1.0, top_k=0, top_p=1.0)
    # Enough samples that some run the full 30 tokens: texts that differ, not just empty ones.
    texts = [complete(loaded, "Once upon a time", seed=s, **kw) for s in range(4)]
    assert texts == [complete(loaded, "Once upon a time", seed=s, **kw) for s in range(4)]
    assert len(set(texts)) > 1
    assert any(texts)


def test_stops_at_max_tokens_or_end_of_text(loaded):
    """The ids are generate_tokens's raw samples, cut before the first <|endoftext|> or after
    max_tokens; both stops occur among these seeds."""
    model, tok = loaded.model, loaded.tokenizer
    eot = tok.token_to_id("<|endoftext|>")
    prompt_ids = [eot, *tok.encode("Once upon a time").ids]
    stops = set()
    for seed in range(64):  # until both stops occurred (how often depends on the training)
        if stops == {"eot", "max"}:
            break
        raw = list(islice(generate_tokens(model, prompt_ids, 1.0, 0, 1.0, seed), 12))
        ids = list(sample_ids(loaded, "Once upon a time", 12, 1.0, 0, 1.0, seed))
        cut = raw.index(eot) if eot in raw else 12
        assert ids == raw[:cut]
        stops.add("eot" if eot in raw else "max")
        short = list(sample_ids(loaded, "Once upon a time", 3, 1.0, 0, 1.0, seed))
        assert short == ids[:3]
        assert complete(loaded, "Once upon a time", 3, 1.0, 0, 1.0, seed) == tok.decode(short)
    assert stops == {"eot", "max"}
    assert complete(loaded, "Once", max_tokens=0) == ""


def test_streamed_pieces_are_whole_characters(tmp_path):
    """Byte-level tokens split multi-byte characters; no piece shows a half character."""
    text = "naïve café, über 日本語 ☃ — done"
    tok = build_tokenizer([text] * 3, vocab_size=260, kind="bytelevel_bpe")
    ids = tok.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids[:3]) != text[:3]  # the test text does split characters
    pieces = list(decode_stream(tok, ids))
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert len(pieces) < len(ids)  # halves were held back and joined
    # an incomplete character at the very end is still shown (as U+FFFD)
    half = next(k for k in range(1, len(ids)) if tok.decode(ids[:k]).endswith("\ufffd"))
    assert "".join(decode_stream(tok, ids[:half])) == tok.decode(ids[:half])


def test_checkpoint_dir_and_run_dir_load_the_same_model(tiny_lm_run, loaded):
    assert loaded.checkpoint.name == "best" and loaded.task == "lm" and loaded.encoding is None
    again = load_run(tiny_lm_run[0] / "checkpoints" / "best")
    kw = dict(max_tokens=8, temperature=0.8, seed=5)
    assert complete(again, "The dog", **kw) == complete(loaded, "The dog", **kw)
    last = load_run(tiny_lm_run[0], "last")
    assert last.checkpoint.name.startswith("step_") and last.state.step == 30
    frame = predict_frame(loaded, pd.DataFrame({"prompt": ["The dog"]}), max_new_tokens=6)
    assert frame["completion"].tolist() == [complete(loaded, "The dog", 6, temperature=0.0)]


def test_generate_verb_streams_the_same_text(tiny_lm_run, loaded):
    args = ["--prompt", "Once upon a time", "--max-tokens", "10", "--temperature", "0.9",
            "--seed", "3", "--num-samples", "2"]
    out = mlxlab("generate", tiny_lm_run[0], *args)
    assert out.returncode == 0, out.stderr
    samples = out.stdout.split("\n" + "-" * 40 + "\n")
    expected = [
        "Once upon a time" + complete(loaded, "Once upon a time", 10, 0.9, 40, 0.95, seed)
        for seed in (3, 4)
    ]
    assert [s.rstrip("\n") for s in samples] == expected
    assert "checkpoints/best" in out.stderr


def test_eval_verb_on_the_validation_text_gives_the_runs_val_loss(tiny_lm_run, tmp_path):
    """The run's validation documents (the corpus' first 20) in a text file: `mlxlab eval`
    packs them as training's validation did, so loss and perplexity are the run's best ones."""
    run_dir, metrics, documents = tiny_lm_run
    held = tmp_path / "held_out.txt"
    held.write_text("\n\n".join(documents[:20]) + "\n")
    done = mlxlab("eval", run_dir, held, "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["loss"] == pytest.approx(metrics["val/loss"], rel=1e-4)
    assert report["perplexity"] == pytest.approx(metrics["val/perplexity"], rel=1e-3)
    assert report["tokens"] > 20 and report["checkpoint"].endswith("checkpoints/best")
    other = tmp_path / "other.txt"
    other.write_text("\n\n".join(documents[100:140]))
    table = mlxlab("eval", run_dir, other)
    assert table.returncode == 0, table.stderr
    assert "perplexity" in table.stdout and "tokens" in table.stdout


def test_clear_errors(tiny_lm_run, classifier_run, tmp_path, capsys):
    """Each bad input: exit 2 and one line naming it (in-process: the subprocess path of the
    same funnel is tested above and in test_predict)."""
    run_dir = tiny_lm_run[0]
    cases = {
        "does not exist": ["generate", tmp_path / "nope"],
        "no tokenizer.json": ["generate", tmp_path],
        "shorten --prompt": ["generate", run_dir, "--prompt", "word " * 80],
        "top_p": ["generate", run_dir, "--top-p", "0"],
        "needs a language model": ["generate", classifier_run[0]],
        "are for classifier runs": ["eval", run_dir, tmp_path, "--confusion", "x.png"],
    }
    # a run whose tokenizer.json was swapped for another one
    other = tmp_path / "other_run"
    shutil.copytree(run_dir, other)
    build_tokenizer(["some other text"] * 4, kind="bytelevel_bpe", save_to=other / "tokenizer.json",
                    retrain=True)
    cases["is not the tokenizer"] = ["generate", other]
    for expected, args in cases.items():
        assert main([str(a) for a in args]) == 2, args
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith(f"mlxlab {args[0]}: error: ") and expected in last, last


@pytest.mark.slow  # the default run's budget: test_serve_draft checks greedy equality with a draft
def test_speculative_decoding_with_a_draft(tmp_path):
    """`generate --draft`: under greedy decoding the text is the model's alone, token for
    token, and the draft's share is printed; a draft with another tokenizer, or one not smaller
    than the model, is one line before anything is generated."""
    from hf_helpers import save_tiny_model

    target = save_tiny_model("llama", tmp_path / "target", seed=0, num_hidden_layers=4)
    draft = save_tiny_model("llama", tmp_path / "draft", seed=0, num_hidden_layers=1)
    other = save_tiny_model("qwen2", tmp_path / "other", seed=0, num_hidden_layers=1)
    args = [MLXLAB, "generate", str(target), "--prompt", "Once upon a time", "--max-tokens",
            "24", "--temperature", "0"]
    alone = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert alone.returncode == 0, alone.stderr[-2000:]
    for k in ("1", "4"):
        fast = subprocess.run([*args, "--draft", str(draft), "--num-draft-tokens", k],
                              capture_output=True, text=True, timeout=300)
        assert fast.returncode == 0, fast.stderr[-2000:]
        assert fast.stdout == alone.stdout
        assert "proposed by the draft" in fast.stderr
    for bad, words in ((other, "tokenizer"), (target, "not smaller")):
        refused = subprocess.run([*args, "--draft", str(bad)], capture_output=True, text=True,
                                 timeout=300)
        assert refused.returncode == 2, refused.stderr[-2000:]
        assert words in refused.stderr.strip().splitlines()[-1]
