"""scripts/generate.py on a real (tiny) tinystories_nano run: loading, sampling, streaming, errors."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from itertools import islice
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra

from conftest import PYTHON, REPO, compose_cfg
from mlxlab.config import asset_path
from mlxlab.data.tokenizer import build_tokenizer
from mlxlab.models.transformer import generate_step
from mlxlab.train import train

SCRIPT = REPO / "scripts" / "generate.py"
spec = importlib.util.spec_from_file_location("generate_script", SCRIPT)
gen = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gen)

TINY = [
    "experiment=tinystories_nano", "tracking=none", "callbacks.progress.enabled=false",
    "model.dim=32", "model.num_layers=1", "model.num_heads=2", "model.max_seq_len=64",
    "data.seq_len=64", "data.tokenizer.max_vocab=512", "data.tokenizer_sample=300",
    "data.val_examples=20", "trainer.batch_size=8", "trainer.max_steps=30",
    "trainer.eval_every_steps=15", "trainer.schedule.warmup_steps=3",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished tiny run on short documents (first sentences of the shipped TinyStories
    sample), so the model learns to end texts with <|endoftext|> within a few steps."""
    root = tmp_path_factory.mktemp("lm")
    stories = Path(asset_path("tinystories/sample.txt")).read_text().split("\n\n")
    firsts = [s.strip().split(". ")[0] + "." for s in stories[:800] if s.strip()]
    corpus = root / "first_sentences.txt"
    corpus.write_text("\n\n".join(firsts))
    cfg = compose_cfg(root, [*TINY, f"data.data_files={corpus}"])
    train(cfg)
    GlobalHydra.instance().clear()
    return Path(cfg.paths.output_dir)


@pytest.fixture(scope="module")
def loaded(run_dir):
    return gen.load_run(run_dir)


def test_same_seed_same_text_other_seed_other_text(loaded):
    model, tok, _ = loaded
    kw = dict(max_tokens=30, temperature=1.0, top_k=0, top_p=1.0)
    # Enough samples that some run the full 30 tokens: texts that differ, not just empty ones.
    texts = [gen.generate(model, tok, "Once upon a time", seed=s, **kw) for s in range(4)]
    assert texts == [gen.generate(model, tok, "Once upon a time", seed=s, **kw) for s in range(4)]
    assert len(set(texts)) > 1
    assert any(texts)


def test_stops_at_max_tokens_or_end_of_text(loaded):
    """The ids are generate_step's raw samples, cut before the first <|endoftext|> or after
    max_tokens; both stops occur among these seeds."""
    model, tok, _ = loaded
    eot = tok.token_to_id("<|endoftext|>")
    prompt_ids = [eot, *tok.encode("Once upon a time").ids]
    stops = set()
    for seed in range(64):  # until both stops occurred (how often depends on the training)
        if stops == {"eot", "max"}:
            break
        raw = list(islice(generate_step(model, prompt_ids, 1.0, 0, 1.0, seed), 12))
        ids = list(gen.sample_ids(model, tok, "Once upon a time", 12, 1.0, 0, 1.0, seed))
        cut = raw.index(eot) if eot in raw else 12
        assert ids == raw[:cut]
        stops.add("eot" if eot in raw else "max")
        short = list(gen.sample_ids(model, tok, "Once upon a time", 3, 1.0, 0, 1.0, seed))
        assert short == ids[:3]
        assert gen.generate(model, tok, "Once upon a time", 3, 1.0, 0, 1.0, seed) == tok.decode(
            short
        )
    assert stops == {"eot", "max"}
    assert gen.generate(model, tok, "Once", max_tokens=0) == ""


def test_streamed_pieces_are_whole_characters(tmp_path):
    """Byte-level tokens split multi-byte characters; no piece shows a half character."""
    text = "naïve café, über 日本語 ☃ — done"
    tok = build_tokenizer([text] * 3, vocab_size=260, kind="bytelevel_bpe")
    ids = tok.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids[:3]) != text[:3]  # the test text does split characters
    pieces = list(gen.decode_stream(tok, ids))
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert len(pieces) < len(ids)  # halves were held back and joined
    # an incomplete character at the very end is still shown (as U+FFFD)
    half = next(k for k in range(1, len(ids)) if tok.decode(ids[:k]).endswith("\ufffd"))
    assert "".join(gen.decode_stream(tok, ids[:half])) == tok.decode(ids[:half])


def test_checkpoint_dir_and_run_dir_load_the_same_model(run_dir, loaded):
    model, tok, state = loaded
    assert Path(state["checkpoint_path"]).name == "best"
    again, tok2, _ = gen.load_run(run_dir / "checkpoints" / "best")
    kw = dict(max_tokens=8, temperature=0.8, seed=5)
    assert gen.generate(again, tok2, "The dog", **kw) == gen.generate(model, tok, "The dog", **kw)


def test_clear_errors(run_dir, tmp_path, capsys):
    assert gen.main([str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert gen.main([str(tmp_path / "empty")]) == 2
    assert "no tokenizer.json" in capsys.readouterr().err
    # a run whose tokenizer.json was swapped for another one
    other = tmp_path / "other_run"
    shutil.copytree(run_dir, other)
    build_tokenizer(["some other text"] * 4, kind="bytelevel_bpe", save_to=other / "tokenizer.json",
                    retrain=True)
    assert gen.main([str(other)]) == 2
    assert "is not the tokenizer" in capsys.readouterr().err
    assert gen.main([str(run_dir), "--prompt", "word " * 80]) == 2
    assert "shorten --prompt" in capsys.readouterr().err
    assert gen.main([str(run_dir), "--top-p", "0"]) == 2
    assert "top_p" in capsys.readouterr().err


def test_script_streams_the_same_text(run_dir, loaded):
    model, tok, _ = loaded
    args = ["--prompt", "Once upon a time", "--max-tokens", "10", "--temperature", "0.9",
            "--seed", "3", "--num-samples", "2"]
    out = subprocess.run([PYTHON, str(SCRIPT), str(run_dir), *args], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    samples = out.stdout.split("\n" + "-" * 40 + "\n")
    expected = [
        "Once upon a time" + gen.generate(model, tok, "Once upon a time", 10, 0.9, 40, 0.95, seed)
        for seed in (3, 4)
    ]
    assert [s.rstrip("\n") for s in samples] == expected
    assert "checkpoints/best" in out.stderr
