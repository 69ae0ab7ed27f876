"""Vocabulary remapping (data/vocab_remap.py): a model with only the used (or top-k) tokens'
rows, trained on remapped batches, whose checkpoint generates in the tokenizer's own ids."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlxlab.config import instantiate, validate
from mlxlab.data.batching import Batching
from mlxlab.data.vocab_remap import VocabRemap
from mlxlab.decoding.generation import generate_tokens
from mlxlab.errors import ConfigError
from mlxlab.export import export_run
from mlxlab.models.decoders.remapped import RemappedLM
from mlxlab.runs import load_run_model
from mlxlab.train import train

LM = ["experiment=tinystories_nano", "model.dim=32", "model.num_layers=1", "model.num_heads=2",
      "model.max_seq_len=32", "data.packing.seq_len=32", "data.tokenizer.max_vocab=1024",
      "data.tokenizer.vocab_size=1024", "data.splits.max_examples=60", "data.splits.val_examples=10",
      "data.shuffle_buffer=0", "trainer.batch_size=4", "callbacks.progress.enabled=false", "tracking=none"]


def module(make_cfg, tmp_path, *overrides):
    data = instantiate(make_cfg(*LM, *overrides).data)
    data.setup(tmp_path / "run")
    return data


def test_used_tokens_shrink_the_vocabulary_and_map_back_exactly(make_cfg, tmp_path):
    plain = module(make_cfg, tmp_path)
    remapped = module(make_cfg, tmp_path, "data.vocab_remap.mode=used")
    vmap = remapped.vocab_map
    assert remapped.full_vocab_size == plain.vocab_size == 1024
    assert remapped.vocab_size == vmap.size < 0.6 * plain.vocab_size  # 60 stories use few
    batching = Batching(batch_size=4)
    for a, b in zip(plain.train_batches(batching, 0), remapped.train_batches(batching, 0)):
        ids = np.array(b["input_ids"])
        assert ids.max() < vmap.unk  # every training token is kept: no UNK
        np.testing.assert_array_equal(vmap.keep[ids], np.array(a["input_ids"]))
        np.testing.assert_array_equal(vmap.keep[np.array(b["labels"])], np.array(a["labels"]))
    topk = module(make_cfg, tmp_path, "data.vocab_remap.mode=topk", "data.vocab_remap.k=40")
    assert topk.vocab_size <= 40 + 4  # + the kept special tokens and UNK
    ids = np.concatenate([np.array(b["input_ids"]).ravel()
                          for b in topk.train_batches(batching, 0)])
    assert 0.05 < np.mean(ids == topk.vocab_map.unk) < 0.9  # the rest is UNK


def test_remapped_run_generates_in_the_tokenizers_ids(make_cfg, tmp_path):
    cfg = make_cfg(*LM, "data.vocab_remap.mode=used", "trainer.max_steps=6",
                   "trainer.eval_every_steps=6", "trainer.schedule.warmup_steps=0")
    train(cfg)
    run_dir = Path(cfg.paths.output_dir)
    model, state = load_run_model(run_dir)
    assert isinstance(model, RemappedLM) and model.vocab_size == 1024
    keep = np.array(state.data["vocab_map"]["keep"])
    assert state.model_init["vocab_size"] == len(keep) + 1  # the checkpoint is the small one
    prompt = keep[:5].tolist()
    to_new = {int(o): n for n, o in enumerate(keep)}
    logits = np.array(model(mx.array([prompt])))
    assert logits.shape == (1, 5, 1024)
    dropped = np.setdiff1d(np.arange(1024), keep)
    small_logits = np.array(model.inner(mx.array([[to_new[t] for t in prompt]])))
    np.testing.assert_array_equal(logits[..., keep], small_logits[..., :-1])
    # UNK's probability spread evenly over the ids the model never had: a full distribution
    spread = small_logits[..., -1:] - np.log(len(dropped))
    np.testing.assert_allclose(logits[..., dropped], np.broadcast_to(spread, logits[..., dropped].shape))
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    small = np.exp(small_logits - small_logits.max(-1, keepdims=True))
    np.testing.assert_allclose(probs.sum(-1) / small.sum(-1), 1.0, rtol=1e-5)
    # greedy generation through the wrapper = the small model's, mapped back to tokenizer ids
    full = [t for t, _ in zip(generate_tokens(model, prompt, temperature=0), range(12))]
    small = [t for t, _ in zip(generate_tokens(model.inner, [to_new[t] for t in prompt],
                                             temperature=0), range(12))]
    assert full == keep[small].tolist()
    export_checks(make_cfg, tmp_path, run_dir, model, keep)


def export_checks(make_cfg, tmp_path: Path, run_dir: Path, model: RemappedLM, keep: np.ndarray
                  ) -> None:
    """`mlxlab export` of the remapped run: mlx_lm.load gives the small model (+ UNK-copy rows
    for the BPE intermediates) and a tokenizer on its ids. The kept tokens' logits are mlxlab's,
    greedy generation picks the same tokens, and text round-trips through the tokenizer."""
    import mlx_lm
    from tokenizers import Tokenizer

    out = tmp_path / "exported"
    report = export_run(run_dir, out, fmt="mlx-lm")
    n, extra = len(keep), report["vocab_remap"]["intermediate_tokens"]
    assert report["vocab_remap"]["unk_id"] == n and extra > 0
    exported, wrapper = mlx_lm.load(str(out))
    original = Tokenizer.from_file(str(run_dir / "tokenizer.json"))
    remapped = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert remapped.get_vocab_size() == n + 1 + extra == exported.args.vocab_size
    to_new = np.full(original.get_vocab_size(), -1)
    to_new[keep] = np.arange(n)

    # Same prompt ids (in kept tokens), same logits for every kept token, UNK's for the rest.
    prompt = "Once upon a time, there was a little"
    ids = wrapper.encode(prompt)
    eot = original.token_to_id("<|endoftext|>")
    assert ids == to_new[[eot, *original.encode(prompt).ids]].tolist()
    ours = np.array(model(mx.array([keep[ids].tolist()])))
    theirs = np.array(exported(mx.array([ids])))
    np.testing.assert_allclose(theirs[..., :n], ours[..., keep], atol=1e-4)
    np.testing.assert_allclose(theirs[..., n:], np.repeat(theirs[..., n:n + 1], extra + 1, -1))
    # transformers gives the same small model (the export checks itself as it is written)
    check = export_run(run_dir, tmp_path / "hf", fmt="hf", dtype="float32")["check"]
    assert check["status"] == "checked" and check["max_abs_logit_gap"] <= check["allowed_gap"]
    # Greedy: mlx-lm's tokens are mlxlab's own greedy continuation, renumbered.
    from mlxlab.runs.inference import load_run, sample_ids

    run = load_run(run_dir)
    mine = list(sample_ids(run, prompt, max_tokens=12, temperature=0.0))
    got = [r.token for r in mlx_lm.stream_generate(exported, wrapper, prompt, max_tokens=len(mine))]
    assert keep[got].tolist() == mine and len(mine) > 3

    # Text of the training documents (kept tokens only) encodes to the same tokens, renumbered.
    data = module(make_cfg, tmp_path)
    for text in list(data.source.documents(data.streams.unshuffled_train()))[:20]:
        assert remapped.encode(text).ids == to_new[[eot, *original.encode(text).ids]].tolist()
        assert remapped.decode(remapped.encode(text).ids) == text
    # A dropped token made of kept characters (and not a BPE intermediate) is split into kept
    # pieces; an unseen character becomes UNK.
    dropped = sorted(t for t, i in original.get_vocab().items()
                     if to_new[i] < 0 and remapped.token_to_id(t) is None and len(t) > 2
                     and all(original.token_to_id(c) in keep for c in t))
    word = original.decode([original.token_to_id(dropped[0])])
    pieces = remapped.encode(word, add_special_tokens=False).ids
    assert len(pieces) > 1 and n not in pieces and remapped.decode(pieces) == word
    assert remapped.encode("a \u2603 b", add_special_tokens=False).ids.count(n) > 0
    remapped_exports_are_judged(run_dir, tmp_path)


def remapped_exports_are_judged(run_dir: Path, tmp_path: Path) -> None:
    """An export of the remapped run that changes its weights (--quantize, a GGUF quant) is
    read back and judged, as any other: on the run's validation rows as the exported tokenizer
    tokenizes them (the small model's ids), against the run and a uniform guess (its base: it
    was trained from scratch)."""
    from mlxlab.export import export_gguf
    from mlxlab.export.retention import Retention

    for report in (export_run(run_dir, tmp_path / "q4", fmt="mlx-lm", quantize=4,
                              retention=Retention(accept_loss=True)),
                   export_gguf(run_dir, tmp_path / "ft.gguf", "q8_0",
                               retention=Retention(accept_loss=True))):
        entry = report["retention"]
        assert entry is not None and report["vocab_remap"]["kept_tokens"] > 0
        assert {m["measure"] for m in entry["measures"]} >= {"val/accuracy", "val/loss"}
        assert entry["base"].startswith("trained from scratch")


def test_remapped_tokenizer_moves_a_roberta_post_processors_ids():
    """A BPE tokenizer whose post-processor names its specials as [token, id] pairs
    (RobertaProcessing) gets those ids moved too: the remapped tokenizer starts and ends a text
    with the new ids of <s> and </s>, not their old ones."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    from mlxlab.export.remapped import remap_tokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["the cat sat on the mat"] * 20,
                            trainers.BpeTrainer(vocab_size=60, special_tokens=["<s>", "</s>"]))
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    tok.post_processor = processors.RobertaProcessing(("</s>", eos), ("<s>", bos))
    words = tok.encode("the cat", add_special_tokens=False).ids
    keep = [*words, eos, bos]  # specials last: their new ids differ from the old ones
    out, _ = remap_tokenizer(json.loads(tok.to_str()), keep)
    remapped = Tokenizer.from_str(json.dumps(out))
    n = len(words)
    assert remapped.encode("the cat").ids == [n + 1, *range(n), n]


@pytest.mark.parametrize(("node", "message"), [
    ({"mode": "usd"}, r"data\.vocab_remap\.mode='usd': use used or topk \(or null for off\)"),
    ({"mode": "topk"}, r"data\.vocab_remap\.mode=topk needs data\.vocab_remap\.k=<tokens to keep>"),
    ({"mode": "topk", "k": 0}, r"needs data\.vocab_remap\.k=.*got k=0"),
])
def test_a_bad_vocab_remap_is_one_config_error(node, message):
    """A typo in data.vocab_remap is the user's to fix: a ConfigError from its settings record
    (train.py prints one line), not a ValueError's traceback after the documents were read."""
    with pytest.raises(ConfigError, match=message):
        VocabRemap(**node)
    assert VocabRemap(mode="topk", k=5).k == 5 and VocabRemap().mode is None


def test_a_bad_vocab_remap_fails_validation_before_anything_is_built(make_cfg):
    with pytest.raises(ConfigError, match="data.vocab_remap.mode='usd'"):
        validate(make_cfg(*LM, "data.vocab_remap.mode=usd"))
    with pytest.raises(ConfigError, match=r"data\.vocab_remap\.kk is not a setting"):
        validate(make_cfg(*LM, "+data.vocab_remap.kk=3"))
