"""Gradient checkpointing with dropout on: the backward's recompute draws the masks the forward
drew, so the gradient is that of the loss the forward computed. The reference is the same model,
seed and draws with the recompute taken away (grad_checkpoint.checkpoint as the identity: the
gradient of the forward as it ran); before recomputes drew their own keys, they drew new masks
and the two gradients differed by a few percent (trainer.grad_checkpoint's blocks, CachedMNRL's
mini-batches, FSDP's units)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from embedder_fixtures import write_tiny_folder
from mlxlab.data.sentence_pairs import column_keys
from mlxlab.models.decoders.transformer import Transformer
from mlxlab.models.embedders.embedder_model import EmbedderModel
from mlxlab.models.layers import grad_checkpoint
from mlxlab.models.layers.grad_checkpoint import checkpoint_blocks
from mlxlab.objectives.embedding.cached_mnrl import CachedMultipleNegativesRankingLoss
from mlxlab.runtime.cluster import distributed
from mlxlab.training.parallel.fully_sharded import shard_fully

IDS = np.random.default_rng(0).integers(1, 64, size=(4, 16))


def value_and_grads(model: nn.Module, loss, seed: int = 7) -> tuple[float, dict]:
    mx.random.seed(seed)
    value, grads = nn.value_and_grad(model, loss)(model)
    mx.eval(value, grads)
    return float(value), dict(tree_flatten(grads))


def same_gradient(model: nn.Module, loss, monkeypatch) -> tuple[float, float, float]:
    """(the loss, the recomputed gradient's largest gap to the plain one over the plain's
    largest entry, the loss in eval mode); the plain run has no recompute."""
    model.train()
    value, grads = value_and_grads(model, loss)
    with monkeypatch.context() as patched:
        patched.setattr(grad_checkpoint, "checkpoint", lambda fn: fn)
        plain_value, plain = value_and_grads(model, loss)
    assert value == plain_value  # the same draws in the forward
    largest = max(float(np.abs(np.array(g)).max()) for g in plain.values())
    gap = max(float(np.abs(np.array(grads[k]) - np.array(plain[k])).max()) for k in plain)
    model.eval()
    return value, gap / largest, value_and_grads(model, loss)[0]


@pytest.mark.parametrize("dropouts", [{"dropout": 0.3},
                                      {"lora": {"rank": 4, "dropout": 0.3}}],
                         ids=["model", "lora"])  # mlxlab's Dropout; LoRA's, MLX's nn.Dropout
def test_checkpointed_blocks_with_dropout_give_the_logged_losss_gradient(monkeypatch, dropouts):
    mx.random.seed(0)
    model = Transformer(vocab_size=64, dim=32, num_layers=2, num_heads=2, max_seq_len=32,
                        **dropouts)
    for _, layer in model.named_modules():
        if "lora_b" in layer:  # an update already learned: the adapters' dropout shows
            layer.lora_b = 0.5 * mx.random.normal(layer.lora_b.shape)
    assert checkpoint_blocks(model) == 2
    ids = mx.array(IDS)

    def loss(m):
        return nn.losses.cross_entropy(m(ids)[:, :-1], ids[:, 1:]).mean()

    value, gap, eval_value = same_gradient(model, loss, monkeypatch)
    assert abs(value - eval_value) > 1e-3  # dropout is on in training
    assert gap < 1e-5, gap


def test_cached_mnrl_with_the_folders_dropout_gives_the_logged_losss_gradient(tmp_path,
                                                                            monkeypatch):
    """A BERT folder's hidden dropout (its config's default 0.1) in training."""
    model = EmbedderModel(vocab_size=10, pretrained=str(write_tiny_folder(tmp_path / "st")))
    model.train()
    assert any(isinstance(m, nn.Dropout) and m._p_1 < 1 for _, m in model.named_modules())
    rng = np.random.default_rng(1)
    batch = {}
    for c in range(3):
        ids_key, mask_key = column_keys(c)
        batch[ids_key] = mx.array(rng.integers(5, 10, size=(8, 6)).astype(np.int32))
        batch[mask_key] = mx.ones((8, 6), mx.int32)
    cached = CachedMultipleNegativesRankingLoss(mini_batch_size=2)
    value, gap, eval_value = same_gradient(model, lambda m: cached.loss(m, batch)[0],
                                           monkeypatch)
    assert abs(value - eval_value) > 1e-4
    assert gap < 1e-5, gap


def test_fsdp_units_with_dropout_give_the_logged_losss_gradient(monkeypatch):
    """FSDP's units gather and recompute in the backward: here over a one-rank group (the
    same ShardedUnit code a launched rank runs; tests/test_sharded_training.py runs two)."""
    mx.random.seed(0)
    model = Transformer(vocab_size=64, dim=32, num_layers=2, num_heads=2, max_seq_len=32,
                        dropout=0.3)
    world = distributed.World(group=mx.distributed.init(), rank=0, size=1)
    assert shard_fully(model, world) == ["embed_tokens", "layers.0", "layers.1", "norm"]
    ids = mx.array(IDS)

    def loss(m):
        return nn.losses.cross_entropy(m(ids)[:, :-1], ids[:, 1:]).mean()

    value, gap, eval_value = same_gradient(model, loss, monkeypatch)
    assert abs(value - eval_value) > 1e-3
    assert gap < 1e-5, gap


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_a_recompute_without_dropout_draws_nothing(p):
    """Dropout off (p 0, or eval mode): the recompute takes no key, the global state moves as
    it would without checkpointing."""
    mx.random.seed(0)
    model = Transformer(vocab_size=64, dim=32, num_layers=2, num_heads=2, max_seq_len=32,
                        dropout=p)
    checkpoint_blocks(model)
    model.eval()
    mx.random.seed(3)
    before = mx.random.state[0].tolist()
    mx.eval(model(mx.array(IDS)))
    assert mx.random.state[0].tolist() == before
