"""Packed batches of hybrid models (data.pack=true; models/layers/packed_rows.py): in Qwen3.5,
Qwen3-Next, Kimi-Linear (its latent attention given the rows' mask as the boolean it applies),
OLMo-Hybrid, Nemotron-H (layers of an MLP alone among its mixers), Falcon-H1 (attention and
Mamba side by side), Granite-4.0-H, Mamba-2 and LFM2 (convolution layers) each packed row's
logits and every gradient equal those of the row run alone, the same sequences without their
rows differ by far more, and so do they with the rule's reset or the convolution's row
positions taken away; with gradient checkpointing (mixers, cores) and with the fused kernels off
(the chunked rule, MLX's convolution) too. Where a layer still mixes rows the model is refused in
one line before a run: a Mamba-2 scan without the kernels (mlx-lm's)."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlxlab.errors import ConfigError

PACKS = ["qwen3_5", "qwen3_next", "kimi_linear", "olmo_hybrid", "nemotron_h", "falcon_h1",
         "granitemoehybrid", "mamba2", "lfm2"]
LENGTHS = [7, 20, 13, 25]  # rows shorter than the convolution's reach (4) included


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from hybrid_families import save_tiny_hybrid

    root = tmp_path_factory.mktemp("hybrids")
    return {kind: save_tiny_hybrid(kind, root / kind) for kind in PACKS}


def _model(folder):
    from mlxlab.models.decoders.mlx_lm_decoder import MLXLMDecoder

    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    MLXLMDecoder.check_packing({"pretrained": str(folder)})
    return MLXLMDecoder(vocab_size=vocab, pretrained=str(folder)), vocab


def _rows(vocab: int):
    """The rows one to a batch row (zero-padded) and packed into one sequence."""
    rows = [np.random.default_rng(n).integers(3, vocab, size=n) for n in LENGTHS]
    plain = np.zeros((len(rows), max(LENGTHS)), np.int32)
    scored = np.zeros(plain.shape, np.float32)
    for i, r in enumerate(rows):
        plain[i, :len(r)] = r
        scored[i, :len(r)] = 1
    seg = np.concatenate([np.full(n, i + 1) for i, n in enumerate(LENGTHS)])[None]
    return (mx.array(plain), mx.array(scored), mx.array(np.concatenate(rows)[None].astype(np.int32)),
            mx.array(seg.astype(np.int32)))


def _gaps(model, vocab: int) -> tuple[float, float, float]:
    """(largest logit gap packed - alone, the same without segment ids, the largest gradient
    gap as a share of that parameter's largest gradient alone), for the summed logits of the
    rows' tokens under a random readout."""
    plain, scored, ids, seg = _rows(vocab)
    readout = mx.array(np.random.default_rng(1).normal(size=(vocab,)).astype(np.float32))
    alone = np.array(model(plain))
    packed, leaking = np.array(model(ids, segment_ids=seg)), np.array(model(ids))
    starts = np.cumsum([0, *LENGTHS])

    def gap(logits):
        return max(np.abs(logits[0, a:a + n] - alone[i, :n]).max()
                   for i, (a, n) in enumerate(zip(starts, LENGTHS)))

    def packed_loss(m):
        return (m(ids, segment_ids=seg) @ readout).sum()

    def alone_loss(m):
        return ((m(plain) @ readout) * scored).sum()

    grads = [dict(tree_flatten(nn.value_and_grad(model, f)(model)[1]))
             for f in (packed_loss, alone_loss)]
    assert grads[0].keys() == grads[1].keys() and grads[0]
    grad_gap = max(float(np.abs(np.array(grads[0][k]) - np.array(g)).max()
                         / (np.abs(np.array(g)).max() + 1e-12)) for k, g in grads[1].items())
    return gap(packed), gap(leaking), grad_gap


@pytest.mark.parametrize("kind", PACKS)
def test_packed_hybrid_rows_equal_each_row_alone(kind, folders):
    model, vocab = _model(folders[kind])
    model.train()
    gap, leak, grad_gap = _gaps(model, vocab)
    assert gap < 1e-4 < leak and grad_gap < 1e-4, (gap, leak, grad_gap)


@pytest.mark.parametrize("kind,mode", [("qwen3_5", "mixers"), ("qwen3_5", "cores"),
                                       ("mamba2", "cores"), ("falcon_h1", "mixers")])
def test_packed_hybrid_rows_with_checkpointed_mixers(kind, mode, folders):
    """The recompute after the packed pass runs the mixers on the pass's rows."""
    from mlxlab.models.layers.grad_checkpoint import checkpoint_mixers

    model, vocab = _model(folders[kind])
    model.train()
    checkpoint_mixers(model, cores=mode == "cores")
    gap, leak, grad_gap = _gaps(model, vocab)
    assert gap < 1e-4 < leak and grad_gap < 1e-4, (gap, leak, grad_gap)


def test_packed_hybrid_rows_without_the_kernels(folders, kernel_mode):
    """Kernels off: Qwen3.5 through the chunked rule and MLX's own convolution packs as
    exactly; Granite-4.0-H's Mamba-2 scan is mlx-lm's then, which cannot reset its state, and
    it is refused."""
    kernel_mode("off")
    model, vocab = _model(folders["qwen3_5"])
    model.train()
    gap, leak, grad_gap = _gaps(model, vocab)
    assert gap < 1e-4 < leak and grad_gap < 1e-4, (gap, leak, grad_gap)
    with pytest.raises(ConfigError,
                       match=r"granitemoehybrid's layers .*\(1 attention, 1 convolution of 3 "):
        _model(folders["granitemoehybrid"])


@pytest.mark.parametrize("part", ["rule", "convolution"])
def test_packed_hybrid_rows_need_the_reset_and_the_row_positions(part, folders, monkeypatch):
    """Either part alone leaves the rows mixed: without the rule's reset, or with the
    convolution reading across rows, the packed logits leave the unpacked ones."""
    from mlxlab import kernels
    from mlxlab.models.layers import packed_rows

    model, vocab = _model(folders["qwen3_5"])
    model.train()
    if part == "rule":
        monkeypatch.setattr(packed_rows, "reset_log_gate", lambda log_g: log_g)
    else:
        convolution = kernels.depthwise_conv1d
        monkeypatch.setattr(kernels, "depthwise_conv1d",
                            lambda x, w, bias=None, silu=False, positions=None:
                            convolution(x, w, bias, silu))
    gap, _, _ = _gaps(model, vocab)
    assert gap > 1e-2, gap


def test_packed_hybrid_run_trains(folders, tmp_path):
    """A chat fine-tune of Qwen3.5 with data.pack=true and grad_checkpoint=cores trains through
    the real entry: 3 steps, each of 2 packed sequences, one compiled shape."""
    from mlxlab.tracking.csv_files import read_metrics
    from test_packing import _train

    metrics, run_dir = _train(tmp_path / "run", f"model.pretrained={folders['qwen3_5']}",
                              "data.pack=true", "trainer.grad_checkpoint=cores")
    assert np.isfinite(metrics["val/loss"])
    assert [s for s, _ in read_metrics(run_dir / "tracking")["train/loss"]][-1] == 3
    tags = json.loads((run_dir / "tracking" / "tags.json").read_text())
    assert tags["mlxlab.compiles"] == "1"
