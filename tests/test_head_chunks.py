"""objective.head_chunk: a language model's output head and cross-entropy a chunk of tokens at a
time (objectives/head_chunks.py) give the whole head's loss and every gradient (the head's and
the embeddings' included, tied or not, a hybrid's too) to float32 rounding, hold a fraction of
the whole logits' memory, and a model whose logits are not its head over its hidden states (a
scaled head, a classifier) is one line."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from conftest import TINY_LLAMA_CONFIG
from mlxlab.errors import ConfigError
from mlxlab.models.decoders.mlx_lm_decoder import MLXLMDecoder
from mlxlab.objectives import losses
from mlxlab.objectives.supervised.supervised import Supervised, check_head_split

HYBRID = {"model_type": "qwen3_5", "text_config": {
    "model_type": "qwen3_5_text", "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "vocab_size": 300, "rms_norm_eps": 1e-6, "max_position_embeddings": 512,
    "tie_word_embeddings": True, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
    "linear_key_head_dim": 16, "linear_value_head_dim": 16, "linear_conv_kernel_dim": 4,
    "full_attention_interval": 4}}
CONFIGS = {"llama": TINY_LLAMA_CONFIG,
           "llama, tied": {**TINY_LLAMA_CONFIG, "tie_word_embeddings": True},
           "qwen3_5 hybrid, tied": HYBRID}


def decoder(config: dict) -> MLXLMDecoder:
    mx.random.seed(0)
    model = MLXLMDecoder(vocab_size=0, hf_config=config)
    model.train()
    mx.eval(model.parameters())
    return model


def loss_and_grads(model: MLXLMDecoder, batch: dict, head_chunk: int) -> tuple:
    loss_fn = losses.task_loss("lm", label_smoothing=0.1, head_chunk=head_chunk)
    value_grad = nn.value_and_grad(model, lambda m: loss_fn(m, batch)[0])
    loss, grads = value_grad(model)
    mx.eval(loss, grads)
    return loss.item(), dict(tree_flatten(grads))


@pytest.mark.parametrize("name", CONFIGS)
def test_the_loss_and_every_gradient_are_the_whole_heads(name):
    """Chunks of 7 tokens over 2 rows of 19 (chunks across rows, a short last chunk), label
    smoothing on, every weight trained: the head's (or the tied embeddings') gradient gathers
    every chunk's."""
    model = decoder(CONFIGS[name])
    check_head_split(model, "lm", 7)
    rng = np.random.default_rng(1)
    ids = mx.array(rng.integers(0, model.vocab_size, (2, 19)))
    batch = {"input_ids": ids, "labels": mx.array(rng.integers(0, model.vocab_size, (2, 19))),
             "loss_mask": mx.array((rng.random((2, 19)) > 0.2).astype(np.float32))}
    whole, whole_grads = loss_and_grads(model, batch, 0)
    chunked, chunked_grads = loss_and_grads(model, batch, 7)
    assert chunked == pytest.approx(whole, rel=1e-6)
    assert whole_grads.keys() == chunked_grads.keys()
    for key, want in whole_grads.items():
        np.testing.assert_allclose(np.array(chunked_grads[key]), np.array(want), rtol=1e-4,
                                   atol=1e-6, err_msg=key)


def test_the_chunked_head_holds_a_fraction_of_the_whole_logits():
    """2,048 tokens over a 16,384-token vocabulary: the whole float32 logits are 128 MB (and
    the loss keeps their gradient and more); chunks of 256 tokens hold 16 MB each. MLX's CPU
    allocates an op's output when it queues the op, and waits for queued ops only past its
    memory limit: under a limit, the chunks (each after the one before) stay within it, where
    the whole logits cannot."""
    model = decoder({**TINY_LLAMA_CONFIG, "vocab_size": 16384, "num_hidden_layers": 1})
    ids = mx.array(np.random.default_rng(2).integers(0, 16384, (1, 2048)))
    batch = {"input_ids": ids, "labels": ids}
    peaks, limit = {}, mx.get_memory_limit()
    try:
        for chunk in (0, 256):
            mx.synchronize()
            mx.clear_cache()
            mx.set_memory_limit(mx.get_active_memory() + 64 * 2**20)
            mx.reset_peak_memory()
            loss_and_grads(model, batch, chunk)
            peaks[chunk] = mx.get_peak_memory() / 2**20
    finally:
        mx.set_memory_limit(limit)
    assert peaks[256] < peaks[0] / 2, peaks


def test_a_head_that_is_not_its_hidden_states_projection_is_one_line():
    """Granite divides its logits by logits_scaling after the head: splitting them would train
    another model's loss. A classifier has no language-model head."""
    granite = decoder({**TINY_LLAMA_CONFIG, "model_type": "granite", "logits_scaling": 8.0,
                       "embedding_multiplier": 12.0, "attention_multiplier": 0.0625,
                       "residual_multiplier": 0.22, "attention_bias": False, "mlp_bias": False})
    with pytest.raises(ConfigError, match="not its output head over its hidden states"):
        check_head_split(granite, "lm", 64)
    with pytest.raises(ConfigError, match="does not split its logits"):
        check_head_split(decoder(TINY_LLAMA_CONFIG), "classification", 64)
    with pytest.raises(ConfigError, match="objective.head_chunk must be >= 0"):
        Supervised(head_chunk=-1)


def test_a_finetune_run_with_head_chunks_trains_as_the_whole_head(tmp_path):
    """`experiment=finetune_completions` on a tiny Llama, 4 compiled steps, as one run and with
    objective.head_chunk=16: the same training and validation losses to float32 rounding."""
    from hydra.core.global_hydra import GlobalHydra

    from hf_helpers import save_tiny_model
    from mlxlab.config import asset_path, compose_config
    from mlxlab.train import train

    base = save_tiny_model("llama", tmp_path / "tiny-llama")
    pairs = tmp_path / "pairs.jsonl"
    rows = Path(asset_path("tinystories/pairs.jsonl")).read_text().splitlines()[:16]
    pairs.write_text("\n".join(rows) + "\n")
    results = []
    for extra in ([], ["objective.head_chunk=16"]):
        cfg = compose_config(tmp_path, [
            "experiment=finetune_completions", f"model.pretrained={base}",
            f"data.train_file={pairs}", "data.max_length=64", "tracking=none",
            "callbacks.progress.enabled=false", "trainer.max_steps=4", "trainer.batch_size=4",
            "trainer.eval_every_steps=4", *extra], output_dir=tmp_path / f"run{len(results)}")
        results.append(train(cfg))
        GlobalHydra.instance().clear()
    whole, chunked = results
    assert whole.keys() == chunked.keys() and whole
    for key, value in whole.items():
        assert chunked[key] == pytest.approx(value, rel=1e-4), key


def test_head_chunks_on_a_model_that_cannot_split_them_is_refused_before_a_run_folder(tmp_path):
    """mlxlab's own nano decoder has no head_split: one line from the config checks, nothing
    under outputs/."""
    from conftest import config_refusal

    line = config_refusal(tmp_path, ["experiment=tinystories_nano", "objective.head_chunk=64"])
    assert line and "does not split its logits from its hidden states" in line, line
    assert not (tmp_path / "outputs").exists()
