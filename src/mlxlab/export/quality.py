"""What quantizing costs: validation loss, perplexity and next-token accuracy of a language
model before and after, on the run's own validation data."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from mlxlab.checkpoint import CheckpointState
from mlxlab.config import instantiate
from mlxlab.data.batching import Batch, Batching
from mlxlab.data.streaming import regroup_flat_config


def validation_batches(state: CheckpointState, tokenizer_path: Path, batch_size: int = 8) -> list[Batch]:
    """The run's validation batches, rebuilt from its data config with its tokenizer.json."""
    data_cfg = OmegaConf.create(regroup_flat_config(state.config["data"]))  # older runs' too
    if "tokenizer" in data_cfg:
        data_cfg.tokenizer.path = str(tokenizer_path)
    if "vocab_remap" in data_cfg:  # the export's tokenizer is on the small model's ids already
        data_cfg.vocab_remap = None
    data = instantiate(data_cfg)
    try:
        data.setup(None)
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(
            f"cannot rebuild the run's validation data to measure quantization: {e}"
        ) from e
    batches = list(data.val_batches(Batching(batch_size=batch_size)))
    if not batches:
        raise ValueError("the run has no validation data (val_examples=0) to measure quantization on")
    return batches
