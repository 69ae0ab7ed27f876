"""callbacks=analysis: analyses of the weights of step t (a snapshot, not later weights), computed
off the training thread; attention entropy and the rest measured against known answers."""

from __future__ import annotations

import math
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from conftest import FAST
from mlxlab.models.decoders.transformer import Transformer
from mlxlab.models.encoders.bert import BertClassifier
from mlxlab.tracking.csv_files import read_metrics
from mlxlab.train import train
from mlxlab.training.analysis import analyse, attention_entropies, grouped_norms, sample_text


def test_logged_norms_are_those_of_the_snapshot_step(make_cfg):
    cfg = make_cfg(*FAST, "trainer.max_steps=10", "trainer.eval_every_steps=null",
                   "tracking=csv", "callbacks=analysis", "callbacks.analysis.every_steps=5",
                   "checkpoint.save_every_steps=5", "checkpoint.keep_last_n=5")
    train(cfg)
    run_dir = Path(cfg.paths.output_dir)
    rows = read_metrics(run_dir / "tracking")
    for step in (5, 10):
        weights = mx.load(str(run_dir / "checkpoints" / f"step_{step:08d}" / "model.safetensors"))
        tree = {}
        for key, value in weights.items():  # flat names -> nested, as model.parameters() gives
            node = tree
            *parents, leaf = key.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value
        expected = grouped_norms(tree)
        assert "encoder.layers.0" in expected
        for layer, norm in expected.items():
            logged = dict(rows[f"analysis/weight_norm/{layer}"])
            assert math.isclose(logged[step], norm, rel_tol=1e-6), (step, layer)
    assert [s for s, _ in rows["analysis/grad_norm/classifier"]] == [5, 10]
    assert [s for s, _ in rows["analysis/attention_entropy/encoder.layers.0"]] == [5, 10]
    assert {s for s, _ in rows["analysis/embedding/effective_rank"]} == {5, 10}


def uniform_attention(model: nn.Module) -> None:
    """Zero query weights: every query scores every key alike, so attention is uniform."""
    for _, m in model.named_modules():
        if hasattr(m, "query"):
            m.query.weight = mx.zeros_like(m.query.weight)
            if "bias" in m.query:
                m.query.bias = mx.zeros_like(m.query.bias)


def test_attention_entropy_of_uniform_attention_is_log_of_the_keys_seen():
    mx.random.seed(0)
    lm = Transformer(vocab_size=50, dim=16, num_layers=2, num_heads=2, max_seq_len=16)
    uniform_attention(lm)
    probe = {"input_ids": mx.array(np.arange(12).reshape(1, 12) % 50)}
    causal = np.mean([math.log(i + 1) for i in range(12)])  # query i sees i + 1 keys
    got = attention_entropies(lm, probe)
    assert list(got) == ["layers.0", "layers.1"]
    assert all(math.isclose(v, causal, rel_tol=1e-5) for v in got.values()), got
    assert type(lm.layers[0].attention).__name__ == "Attention"  # put back as it was

    bert = BertClassifier(vocab_size=50, num_labels=2, hidden_size=16, num_layers=1, num_heads=2)
    bert.eval()
    uniform_attention(bert)
    mask = np.array([[1, 1, 1, 1, 0, 0, 0, 0], [1] * 8])
    probe = {"input_ids": mx.array(np.ones((2, 8), np.int32)), "attention_mask": mx.array(mask)}
    (value,) = attention_entropies(bert, probe).values()
    assert math.isclose(value, (math.log(4) + math.log(8)) / 2, rel_tol=1e-5)  # padding unseen


def test_analysis_of_an_lm_has_every_part_and_a_sample():
    mx.random.seed(0)
    lm = Transformer(vocab_size=40, dim=16, num_layers=1, num_heads=2, max_seq_len=32)
    ids = mx.array(np.arange(20).reshape(2, 10) % 40)
    probe = {"input_ids": ids, "labels": ids, "loss_mask": mx.ones(ids.shape)}
    out = analyse(lm, probe, "lm")
    assert {"analysis/weight_norm/layers.0", "analysis/grad_norm/layers.0",
            "analysis/attention_entropy/layers.0", "analysis/embedding/effective_rank"} <= set(out)
    assert 1.0 < out["analysis/embedding/effective_rank"] <= 16.0

    class Chars:
        def decode(self, ids):
            return "".join(chr(65 + i % 26) for i in ids)

    text = sample_text(lm, probe, Chars(), max_tokens=5)
    prompt, sample = text.strip().split(" ||| ")
    assert prompt == "ABCDEFGH" and len(sample) == 5


def test_attention_weights_are_what_the_forward_pass_mixes_the_values_with():
    """Attention.weights (what the entropy is measured on) uses the layer's own projections and
    rotary positions: mixing the values with them gives the layer's output."""
    from mlxlab import kernels
    from mlxlab.models.layers.blocks import Attention, padding_mask

    mx.random.seed(0)
    x = mx.random.normal((2, 6, 16))
    keys = mx.array(np.array([[1, 1, 1, 1, 0, 0], [1] * 6]))
    cases = [(Attention(16, 4, num_kv_heads=2, rope=nn.RoPE(4)), "causal"),
             (Attention(16, 2, bias=True), padding_mask(keys))]
    for attention, mask in cases:
        p = attention.weights(x, mask)
        assert np.allclose(np.array(p.sum(axis=-1)), 1.0, atol=1e-5)
        _, _, v = attention.project(x)
        v = mx.repeat(v, attention.num_heads // attention.num_kv_heads, axis=1)
        mixed = attention.out(kernels.merge_heads(p @ v))
        assert np.allclose(np.array(mixed), np.array(attention(x, mask)), atol=1e-5)
