"""Packed batches (data.pack=true): rows concatenated into sequences, each row attending
only to itself (models/decoders/packing.py). On the real SmolLM2-135M-Instruct every row's loss and
the LoRA gradients of a packed batch equal the unpacked batch's to float tolerance, and the same
sequences without their segment ids do not (rows that see each other fail the test); tiny
random decoders of other architectures match or are refused in one line; a whole run trains
packed through the real entry, and the settings packing would ignore are refused."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlxlab.config import asset_path
from mlxlab.data.batching import Batching, pack_rows
from mlxlab.data.completions import PromptCompletion
from mlxlab.errors import ConfigError
from mlxlab.models.decoders.packing import segment_positions
from mlxlab.objectives.losses import forward, token_cross_entropy
from mlxlab.tracking.csv_files import read_metrics


def test_pack_rows_first_fit_decreasing_never_overfills():
    lengths = np.array([5, 9, 3, 7, 2, 10, 1, 4])
    packs = pack_rows(lengths, 10)
    assert sorted(np.concatenate(packs).tolist()) == list(range(len(lengths)))
    assert all(lengths[p].sum() <= 10 for p in packs)
    assert len(packs) == 5  # 41 positions, ceil(41 / 10) = 5: first-fit decreasing is tight here
    assert [p.tolist() for p in pack_rows(lengths, 10)] == [p.tolist() for p in packs]


def test_segment_positions_restart_at_each_row():
    seg = mx.array([[1, 1, 1, 2, 2, 3, 0, 0]])
    assert segment_positions(seg).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1]]


def _rows_losses(model, batch) -> list[float]:
    """Each example's mean loss over its scored tokens: per batch row (unpacked), per segment
    (packed)."""
    ce = np.array(token_cross_entropy(forward(model, batch), batch["labels"]))
    mask = np.array(batch["loss_mask"])
    if "segment_ids" not in batch:
        return [float((c * m).sum() / m.sum()) for c, m in zip(ce, mask)]
    seg = np.array(batch["segment_ids"])
    return [float((ce[r] * mask[r] * (seg[r] == s)).sum() / (mask[r] * (seg[r] == s)).sum())
            for r in range(len(seg)) for s in range(1, seg[r].max() + 1)]


def _summed_loss(model, batch):
    ce = token_cross_entropy(forward(model, batch), batch["labels"])
    return (ce * batch["loss_mask"]).sum()


def _module(tokenizer_json: Path, pack: bool, max_length: int,
            pack_length: int | None = -1) -> PromptCompletion:
    """The shipped chats; packed into max_length-position sequences unless `pack_length` says
    otherwise (None: the default, the longest row's)."""
    data = PromptCompletion(train_file=asset_path("tinystories/chats.jsonl"), val_fraction=0.1,
                            max_length=max_length, tokenizer={"path": str(tokenizer_json)},
                            pack=pack, pack_length=max_length if pack_length == -1 else
                            pack_length)
    data.setup()
    return data


def _packed_and_unpacked(data_packed, data_plain, n_seqs: int):
    """The `n_seqs` packed sequences holding the most rows and one unpacked batch of the same
    rows, in the packed order."""
    data_packed.num_train_batches(Batching(batch_size=n_seqs))  # packs the rows
    packs = sorted(data_packed._packs, key=len)[-n_seqs:]
    packed = data_packed._collate_packed(data_packed.train, packs, n_seqs)
    rows = np.concatenate(packs)
    plain = data_plain._collate(data_plain.train, rows, 16)
    return packed, plain


@pytest.fixture(scope="module")
def smollm2_tokenizer() -> Path:
    """The real SmolLM2-135M-Instruct's tokenizer.json (the packaged model's folder)."""
    from mlxlab.models.sources import model_folder
    from real_models import packaged_model

    return model_folder(str(packaged_model())) / "tokenizer.json"


@pytest.fixture(scope="module")
def smollm2():
    from mlxlab.models.decoders.mlx_lm_decoder import MLXLMDecoder
    from mlxlab.models.sources import model_folder
    from real_models import packaged_model

    gguf = packaged_model()
    model = MLXLMDecoder(vocab_size=49152, pretrained=str(gguf),
                         lora={"rank": 8, "alpha": 16, "targets": ["q_proj", "k_proj", "v_proj",
                                                                   "o_proj"]})
    # adapters away from their zero start, so the gradients reach through them
    rng = np.random.default_rng(0)
    model.update(tree_map_lora(model, rng))
    return model, model_folder(str(gguf)) / "tokenizer.json"


def tree_map_lora(model, rng):
    from mlx.utils import tree_unflatten

    return tree_unflatten([(k, mx.array(rng.normal(0, 0.02, v.shape).astype(np.float32)))
                           for k, v in tree_flatten(model.trainable_parameters())])


@pytest.mark.slow  # the default run's 10-minute budget; run with -m slow
def test_smollm2_packed_rows_equal_unpacked_losses_and_gradients(smollm2):
    """Real SmolLM2 chats (the shipped 200, rendered with its own template) packed into 160-token
    sequences: each row's loss and the LoRA gradients of the summed loss equal the unpacked
    batch's; the same sequences with the rows seeing each other differ by far more."""
    model, tokenizer = smollm2
    packed_data, plain_data = _module(tokenizer, True, 160), _module(tokenizer, False, 160)
    packed, plain = _packed_and_unpacked(packed_data, plain_data, 2)
    n_rows = int(np.array(packed["segment_ids"]).max(axis=1).sum())
    assert n_rows >= 6 and plain["input_ids"].shape[0] == n_rows
    ours, reference = _rows_losses(model, packed), _rows_losses(model, plain)
    np.testing.assert_allclose(ours, reference, rtol=2e-5, atol=2e-5)
    leaking = {k: v for k, v in packed.items() if k != "segment_ids"}
    leak = np.abs(np.array(_rows_losses_of_packed(model, leaking, packed)) - reference).max()
    assert leak > 1e-2, leak  # the check above can fail: rows that see each other differ

    grads = [dict(tree_flatten(nn.value_and_grad(model, _summed_loss)(model, b)[1]))
             for b in (packed, plain)]
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 4 * 30 * 2
    for name, g in grads[0].items():  # float32 sums in another order: 1e-4 of the scale
        g, reference_g = np.array(g), np.array(grads[1][name])
        assert np.abs(g - reference_g).max() <= 1e-4 * np.abs(reference_g).max(), name
    assert float(packed["loss_mask"].sum()) == float(plain["loss_mask"].sum())


def test_a_packed_step_holds_what_the_widest_unpacked_step_held(smollm2_tokenizer, caplog):
    """SmolLM2's chats (~60 tokens) at finetune_chat's data.max_length=1024, 4 a step: packed
    steps are no wider than the widest unpacked step (they were 4 x 1024 positions, ~17 times
    the unpacked ones), the epoch's rows all in them in fewer steps and fewer positions, and
    the log line says what a step holds against the unpacked steps."""
    import logging

    batching = Batching(batch_size=4)
    plain = list(_module(smollm2_tokenizer, False, 1024).train_batches(batching, 0))
    with caplog.at_level(logging.INFO, logger="mlxlab.data.completions"):
        data = _module(smollm2_tokenizer, True, 1024, pack_length=None)
        packed = list(data.train_batches(batching, 0))
    widest = max(b["input_ids"].size for b in plain)
    assert max(b["input_ids"].size for b in packed) <= widest
    assert sum(int(np.array(b["segment_ids"]).max(axis=1).sum()) for b in packed) == \
        sum(b["input_ids"].shape[0] for b in plain)  # every row, once
    assert len(packed) < len(plain)
    assert sum(b["input_ids"].size for b in packed) <= sum(b["input_ids"].size for b in plain)
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("data.pack")]
    width = packed[0]["input_ids"].shape[1]
    assert f"a step holds 4 x {width} = {4 * width} positions" in line
    assert f"{widest} at most" in line


def _rows_losses_of_packed(model, batch, packed) -> list[float]:
    """Per-segment losses of `batch` (packed sequences run without their segment ids)."""
    ce = np.array(token_cross_entropy(forward(model, batch), batch["labels"]))
    mask, seg = np.array(packed["loss_mask"]), np.array(packed["segment_ids"])
    return [float((ce[r] * mask[r] * (seg[r] == s)).sum() / (mask[r] * (seg[r] == s)).sum())
            for r in range(len(seg)) for s in range(1, seg[r].max() + 1)]


# A tiny random folder of each (scripts/tiny_hf_model.py): gemma3_text has a 16-token sliding
# window (rows longer than it), qwen3_moe routed experts, lfm2 convolution layers (each row's
# own: models/layers/packed_rows.py), deepseek_v3 latent attention (its mask a boolean:
# models/decoders/mlx_lm_fused.py LatentAttention); gemma2 (its own attention) cannot keep rows
# apart.
PACKS = ["llama", "gemma3_text", "qwen3_moe", "phi3", "lfm2", "deepseek_v3"]
REFUSED = ["gemma2"]


@pytest.mark.parametrize("kind", PACKS + REFUSED)
def test_tiny_decoders_pack_exactly_or_are_refused(kind, tmp_path):
    from hf_helpers import save_tiny_model
    from mlxlab.models.decoders.mlx_lm_decoder import MLXLMDecoder

    folder = save_tiny_model(kind, tmp_path / kind)
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    if kind in REFUSED:
        with pytest.raises(ConfigError, match=f"data.pack=true: {kind}.*data.pack=false"):
            MLXLMDecoder.check_packing({"pretrained": str(folder)})
        return
    MLXLMDecoder.check_packing({"pretrained": str(folder)})
    model = MLXLMDecoder(vocab_size=vocab, pretrained=str(folder))
    lengths = [7, 20, 13, 25]
    rows = [np.random.default_rng(n).integers(3, vocab, size=n) for n in lengths]
    plain = np.zeros((len(rows), max(lengths)), np.int32)
    for i, r in enumerate(rows):
        plain[i, :len(r)] = r
    reference = np.array(model(mx.array(plain)))
    seg = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)])[None]
    ids = mx.array(np.concatenate(rows)[None].astype(np.int32))
    packed = np.array(model(ids, segment_ids=mx.array(seg.astype(np.int32))))
    leaking = np.array(model(ids))
    starts = np.cumsum([0, *lengths])
    gap = max(np.abs(packed[0, a:a + n] - reference[i, :n]).max()
              for i, (a, n) in enumerate(zip(starts, lengths)))
    leak = max(np.abs(leaking[0, a:a + n] - reference[i, :n]).max()
               for i, (a, n) in enumerate(zip(starts, lengths)))
    assert gap < 1e-4 < leak, (gap, leak)



def test_bf16_decoder_packs(tmp_path):
    """A bf16 model (what a GPU trains in) packs: its attention takes the rows' mask in its own
    dtype (a float32 additive mask is refused by bf16 attention), and the packed logits equal the
    unpacked ones as closely as bf16 itself keeps them (its gap to the float32 logits), while
    rows that see each other differ far more."""
    from hf_helpers import save_tiny_model
    from mlxlab.models.decoders.mlx_lm_decoder import MLXLMDecoder

    folder = save_tiny_model("llama", tmp_path / "llama")
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    model = MLXLMDecoder(vocab_size=vocab, pretrained=str(folder))
    lengths = [9, 30, 17]
    rows = [np.random.default_rng(n).integers(3, vocab, size=n) for n in lengths]
    plain = np.zeros((len(rows), max(lengths)), np.int32)
    for i, r in enumerate(rows):
        plain[i, :len(r)] = r
    exact = np.array(model(mx.array(plain)))
    model.set_dtype(mx.bfloat16)
    reference = np.array(model(mx.array(plain)).astype(mx.float32))
    rounding = max(np.abs(reference[i, :n] - exact[i, :n]).max() for i, n in enumerate(lengths))
    seg = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)])[None]
    ids = mx.array(np.concatenate(rows)[None].astype(np.int32))
    packed = model(ids, segment_ids=mx.array(seg.astype(np.int32)))
    assert packed.dtype == mx.bfloat16
    packed, leaking = np.array(packed.astype(mx.float32)), np.array(model(ids).astype(mx.float32))
    starts = np.cumsum([0, *lengths])
    gap = max(np.abs(packed[0, a:a + n] - reference[i, :n]).max()
              for i, (a, n) in enumerate(zip(starts, lengths)))
    leak = max(np.abs(leaking[0, a:a + n] - reference[i, :n]).max()
               for i, (a, n) in enumerate(zip(starts, lengths)))
    assert gap <= 2 * rounding and leak > 10 * gap, (gap, rounding, leak)

def test_transformer_learned_positions_restart_per_row():
    """mlxlab's own decoder with learned absolute positions: a packed row starts at position 0."""
    from mlxlab.models.decoders.transformer import Transformer

    mx.random.seed(0)
    model = Transformer(vocab_size=64, dim=32, num_layers=2, num_heads=4, max_seq_len=64,
                        positions="learned")
    rows = [np.arange(3, 3 + n) % 60 for n in (5, 9)]
    packed = np.array(model(mx.array(np.concatenate(rows)[None].astype(np.int32)),
                            segment_ids=mx.array([[1] * 5 + [2] * 9])))
    for row, (a, n) in zip(rows, ((0, 5), (5, 9))):
        alone = np.array(model(mx.array(row[None].astype(np.int32))))
        np.testing.assert_allclose(packed[0, a:a + n], alone[0], atol=1e-5)


def _train(root: Path, *overrides: str):
    from hydra.core.global_hydra import GlobalHydra

    from conftest import compose_cfg
    from mlxlab.train import train

    cfg = compose_cfg(root, ["experiment=finetune_chat", "data.max_length=128",
                             "data.val_fraction=0.25", "trainer.max_steps=3",
                             "trainer.eval_every_steps=3", "trainer.batch_size=2",
                             "tracking=csv", "callbacks.progress.enabled=false", *overrides])
    try:
        return train(cfg), Path(cfg.paths.output_dir)
    finally:
        GlobalHydra.instance().clear()


def test_packed_run_trains_and_refusals(tmp_path):
    """A chat fine-tune with data.pack=true trains through the real entry (3 steps, each of
    2 packed sequences, one compiled shape); a Gemma 2 folder (its own attention) and the
    per-example-loss callback (one loss per batch row) refuse data.pack=true in one line before
    anything is created."""
    from conftest import compose_cfg
    from hf_helpers import save_tiny_model
    from mlxlab.config.checks import validate

    folder = save_tiny_model("llama", tmp_path / "llama", chat="llama3")
    metrics, run_dir = _train(tmp_path / "run", f"model.pretrained={folder}", "data.pack=true")
    assert np.isfinite(metrics["val/loss"])
    logged = read_metrics(run_dir / "tracking")
    assert [s for s, _ in logged["train/loss"]][-1] == 3
    tags = json.loads((run_dir / "tracking" / "tags.json").read_text())
    assert tags["mlxlab.compiles"] == "1"  # every packed batch: batch_size x max_length
    gemma2 = save_tiny_model("gemma2", tmp_path / "gemma2", chat="chatml")
    for overrides, line in (
            ([f"model.pretrained={gemma2}"], "gemma2's layers .* set data.pack=false"),
            ([f"model.pretrained={folder}", "callbacks=per_example_losses"],
             "per_example_losses records one loss per batch row")):
        cfg = compose_cfg(tmp_path / "cfg", ["experiment=finetune_chat", "data.pack=true",
                                             *overrides])
        with pytest.raises(ConfigError, match=line):
            validate(cfg)
