"""GGUF files whose header contradicts their tensors (src/mlxlab/models/sources/gguf_header.py):
real files, a tiny Llama's GGUF with its header rewritten by llama.cpp's `gguf` package. Each is
one line naming the file and what disagrees, before anything is written to the conversion
cache; a conversion that does not load in mlx-lm is not kept; `mlxlab train` exits 2 with no run
folder and `mlxlab generate` names the file."""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest

from gguf_files import DROP, rewrite_gguf, tiny_llama_gguf
from mlxlab.errors import ConfigError
from mlxlab.models import sources
from mlxlab.models.sources import resolve
from one_process import each_in_one_process

STRING = gguf.GGUFValueType.STRING


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_llama_gguf(tmp_path_factory.mktemp("header"))


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A cache of the test's own, and resolve() reading files afresh."""
    monkeypatch.setenv("MLXLAB_CACHE_DIR", str(tmp_path / "cache"))
    sources._resolved.clear()
    yield tmp_path / "cache"
    sources._resolved.clear()


def _tokens(tiny: Path, extra: int) -> dict:
    """The vocabulary with `extra` tokens more than the embedding has rows."""
    fields = gguf.GGUFReader(str(tiny)).fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    types = fields["tokenizer.ggml.token_type"].contents()
    return {"tokenizer.ggml.tokens": tokens + [f"extra{i}" for i in range(extra)],
            "tokenizer.ggml.token_type": types + [1] * extra, "llama.vocab_size": DROP}


# the tiny Llama: 2 blocks, width 64, 4 query heads and 2 key/value heads of 16, 512 tokens
CASES = {
    "a head count that does not divide the query rows": (
        {"llama.attention.head_count": 5},
        "llama.attention.head_count=5 does not divide blk.0.attn_q.weight's 64 rows"),
    "a kv head count that does not divide the key rows": (
        {"llama.attention.head_count_kv": 3},
        "llama.attention.head_count_kv=3 does not divide blk.0.attn_k.weight's 32 rows"),
    "head counts giving query and key heads of two sizes": (
        {"llama.attention.head_count": 8},
        "make query heads of 8 (blk.0.attn_q.weight: 64 rows) and key heads of 16"),
    "more blocks than the file holds": (
        {"llama.block_count": 3}, "llama.block_count=3 but the file holds blocks 0..1 (2 of them)"),
    "fewer blocks than the file holds": (
        {"llama.block_count": 1}, "llama.block_count=1 but the file holds blocks 0..1"),
    "a vocabulary larger than the embedding": (
        "tokens", "the vocabulary has 600 tokens but token_embd.weight has 512 rows"),
    "a vocab_size other than the embedding's rows": (
        {"llama.vocab_size": 600}, "llama.vocab_size=600 but token_embd.weight has 512 rows"),
    "a width other than the embedding's": (
        {"llama.embedding_length": 60}, "llama.embedding_length=60 but token_embd.weight is 64 wide"),
    "a feed-forward size other than the MLP's": (
        {"llama.feed_forward_length": 100},
        "6 tensors have other shapes than the header's sizes (embedding_length 64, "
        "feed_forward_length 100"),
    "a block count that is not a number": (
        {"llama.block_count": ("two", STRING)}, "llama.block_count='two' is not a whole number"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_header_that_contradicts_its_tensors_is_one_line_and_converts_nothing(
        case, tiny, cache, tmp_path):
    changes, message = CASES[case]
    file = rewrite_gguf(tiny, tmp_path / "lying.gguf",
                        _tokens(tiny, 88) if changes == "tokens" else changes)
    with pytest.raises(ConfigError) as err:
        resolve(str(file))
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"model.pretrained={file}: the GGUF header "
                                                "contradicts its tensors: "), text
    assert message in text, text
    assert not (cache / "models" / "gguf").exists() or not any((cache / "models" / "gguf").iterdir())


def test_the_untouched_file_converts(tiny, cache):
    """The files above differ from this one in their header alone."""
    source = resolve(str(tiny))
    assert (source.folder / ".complete").is_file()


def test_a_conversion_that_does_not_load_is_not_kept(tiny, cache, tmp_path):
    """A header that passes every shape check but gives mlx-lm a model that cannot run (a rope
    base that is text): the conversion is loaded and run once before it is kept, fails, and
    leaves nothing; the next try fails the same way on the user's file, not on a cache folder."""
    file = rewrite_gguf(tiny, tmp_path / "text_theta.gguf",
                        {"llama.rope.freq_base": ("ten thousand", STRING)})
    for _ in range(2):
        with pytest.raises(ConfigError, match="its conversion does not load in mlx-lm") as err:
            resolve(str(file))
        assert str(err.value).startswith(f"model.pretrained={file}: ")
        assert "nothing was kept" in str(err.value) and "\n" not in str(err.value)
        assert list((cache / "models" / "gguf").iterdir()) == []
        sources._resolved.clear()


def test_a_header_mlx_lm_cannot_build_a_model_from_is_one_line(tiny, cache, tmp_path):
    file = rewrite_gguf(tiny, tmp_path / "text_eps.gguf",
                        {"llama.attention.layer_norm_rms_epsilon": ("tiny", STRING)})
    with pytest.raises(ConfigError, match="mlx-lm's llama model cannot be built from the GGUF "
                                          "header") as err:
        resolve(str(file))
    assert str(err.value).startswith(f"model.pretrained={file}: ") and "\n" not in str(err.value)
    assert not (cache / "models" / "gguf").exists()


def test_train_and_generate_name_the_file_exit_2_and_create_nothing(tiny, tmp_path, cli_env):
    file = rewrite_gguf(tiny, tmp_path / "lying.gguf", {"llama.attention.head_count": 5})
    env = {**cli_env, "MLXLAB_CACHE_DIR": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    root = tmp_path / "project"
    root.mkdir()
    (root / "chats.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}, '
                                      '{"role": "assistant", "content": "hello"}]}\n')
    env["MLXLAB_ROOT"] = str(root)
    # the two in turn in one process (mlxlab-train: the training app `mlxlab train` supervises)
    commands = (["mlxlab-train", "experiment=finetune_chat", "data.train_file=chats.jsonl",
                 f"model.pretrained={file}"],
                ["mlxlab", "generate", str(file), "--prompt", "hi", "--max-tokens", "2"])
    done = each_in_one_process(list(commands), env, cwd=root, after="one_process:names_here")
    for args, (code, stderr, names) in zip(commands, done, strict=True):
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert code == 2, (args[0], stderr[-2000:])
        assert len(lines) == 1 and str(file) in lines[0], (args[0], lines)
        assert "head_count=5 does not divide" in lines[0], lines
        assert names == ["chats.jsonl"], (args[0], names)
    assert sorted(p.name for p in root.iterdir()) == ["chats.jsonl"]
    assert not (tmp_path / "cache" / "models").exists() or not any(
        (tmp_path / "cache" / "models" / "gguf").iterdir())


@pytest.mark.slow
def test_the_real_smollm2_gguf_with_a_lying_header_is_one_line(cache, tmp_path):
    """SmolLM2-135M-Instruct's own GGUF (llama.cpp's converter: 30 blocks, 9 query heads of 64)
    with its header rewritten: each lie one line naming the file, nothing converted; the file
    as it is converts and loads."""
    from real_models import packaged_model

    real = packaged_model()
    lies = {"llama.attention.head_count": (7, "head_count=7 does not divide "
                                               "blk.0.attn_q.weight's 576 rows"),
            "llama.block_count": (32, "llama.block_count=32 but the file holds blocks 0..29")}
    for key, (value, message) in lies.items():
        file = rewrite_gguf(real, tmp_path / "smollm2-lying.gguf", {key: value})
        with pytest.raises(ConfigError, match=message) as err:
            resolve(str(file))
        assert str(file) in str(err.value) and "\n" not in str(err.value)
        sources._resolved.clear()
    assert not (cache / "models" / "gguf").exists() or not any((cache / "models" / "gguf").iterdir())
    assert (resolve(str(real)).folder / ".complete").is_file()
