"""Vocabulary remapping (data/vocab_remap.py): a model with only the used (or top-k) tokens'
rows, trained on remapped batches, whose checkpoint generates in the tokenizer's own ids."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlxlab.config import instantiate
from mlxlab.data.batching import Batching
from mlxlab.export import ExportError, export_run
from mlxlab.models.remapped import RemappedLM
from mlxlab.models.transformer import generate_step
from mlxlab.runs import load_run_model
from mlxlab.train import train

LM = ["experiment=tinystories_nano", "model.dim=32", "model.num_layers=1", "model.num_heads=2",
      "model.max_seq_len=32", "data.seq_len=32", "data.tokenizer.max_vocab=1024",
      "data.tokenizer.vocab_size=1024", "data.max_examples=60", "data.val_examples=10",
      "data.shuffle_buffer=0", "trainer.batch_size=4", "callbacks.progress.enabled=false", "tracking=none"]


def module(make_cfg, tmp_path, *overrides):
    data = instantiate(make_cfg(*LM, *overrides).data)
    data.setup(tmp_path / "run")
    return data


def test_used_tokens_shrink_the_vocabulary_and_map_back_exactly(make_cfg, tmp_path):
    plain = module(make_cfg, tmp_path)
    remapped = module(make_cfg, tmp_path, "data.vocab_remap=used")
    vmap = remapped.vocab_map
    assert remapped.full_vocab_size == plain.vocab_size == 1024
    assert remapped.vocab_size == vmap.size < 0.6 * plain.vocab_size  # 60 stories use few
    batching = Batching(batch_size=4)
    for a, b in zip(plain.train_batches(batching, 0), remapped.train_batches(batching, 0)):
        ids = np.array(b["input_ids"])
        assert ids.max() < vmap.unk  # every training token is kept: no UNK
        np.testing.assert_array_equal(vmap.keep[ids], np.array(a["input_ids"]))
        np.testing.assert_array_equal(vmap.keep[np.array(b["labels"])], np.array(a["labels"]))
    topk = module(make_cfg, tmp_path, "data.vocab_remap=topk", "data.vocab_remap_k=40")
    assert topk.vocab_size <= 40 + 4  # + the kept special tokens and UNK
    ids = np.concatenate([np.array(b["input_ids"]).ravel()
                          for b in topk.train_batches(batching, 0)])
    assert 0.05 < np.mean(ids == topk.vocab_map.unk) < 0.9  # the rest is UNK


def test_remapped_run_generates_in_the_tokenizers_ids(make_cfg, tmp_path):
    cfg = make_cfg(*LM, "data.vocab_remap=used", "trainer.max_steps=6",
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
    full = [t for t, _ in zip(generate_step(model, prompt, temperature=0), range(12))]
    small = [t for t, _ in zip(generate_step(model.inner, [to_new[t] for t in prompt],
                                             temperature=0), range(12))]
    assert full == keep[small].tolist()
    with pytest.raises(ExportError, match="vocab_remap"):
        export_run(run_dir, tmp_path / "exported")
