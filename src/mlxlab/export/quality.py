"""The run's own rows for an export: its validation batches (what quantizing costs, before
and after) and the start of its training rows (an importance matrix)."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
from omegaconf import OmegaConf

from mlxlab.checkpoint import CheckpointState
from mlxlab.config import instantiate
from mlxlab.data.batching import Batch, Batching
from mlxlab.data.streaming import regroup_flat_config


def _run_data(state: CheckpointState, tokenizer_path: Path, purpose: str):
    """The run's data module, rebuilt from its data config with its tokenizer.json."""
    data_cfg = OmegaConf.create(regroup_flat_config(state.config["data"]))  # older runs' too
    if "tokenizer" in data_cfg:
        data_cfg.tokenizer.path = str(tokenizer_path)
    if "vocab_remap" in data_cfg:  # the export's tokenizer is on the small model's ids already
        data_cfg.vocab_remap = None
    data = instantiate(data_cfg)
    try:
        data.setup(None)
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"cannot rebuild the run's data to {purpose}: {e}") from e
    return data


def validation_batches(state: CheckpointState, tokenizer_path: Path, batch_size: int = 8) -> list[Batch]:
    """The run's validation batches, rebuilt from its data config with its tokenizer.json."""
    data = _run_data(state, tokenizer_path, "measure quantization")
    batches = list(data.val_batches(Batching(batch_size=batch_size)))
    if not batches:
        raise ValueError("the run has no validation data (val_examples=0) to measure quantization on")
    return batches


def training_batches(state: CheckpointState, tokenizer_path: Path, rows: int,
                     batch_size: int = 8) -> list[Batch]:
    """The first `rows` rows (whole batches) of the run's first training epoch: what an
    importance matrix is computed on."""
    data = _run_data(state, tokenizer_path, "compute an importance matrix")
    batches: list[Batch] = []
    for batch in data.train_batches(Batching(batch_size=batch_size), 0):
        batches.append(batch)
        if len(batches) * batch_size >= rows:
            break
    if not batches:
        raise ValueError("the run has no training rows to compute an importance matrix on")
    return batches


def calibration_tokens(state: CheckpointState, tokenizer_path: Path, samples: int = 128,
                       length: int = 256) -> mx.array:
    """(samples, length) token rows cut from the run's training rows laid end to end (their
    padding left out): the calibration data of mlx_lm.quant's GPTQ and AWQ, which read rows of
    equal length (their own default downloads a text; this is the run's)."""
    ids: list[int] = []
    for batch in training_batches(state, tokenizer_path, samples * 4):
        tokens, mask = np.array(batch["input_ids"]), batch.get("loss_mask")
        for r, row in enumerate(tokens):
            end = len(row)
            if mask is not None:
                scored = np.flatnonzero(np.array(mask)[r])
                end = int(scored[-1]) + 2 if len(scored) else 0  # through its last label
            ids.extend(int(t) for t in row[:end])
        if len(ids) >= samples * length:
            break
    rows = len(ids) // length
    if rows == 0:
        raise ValueError(f"the run's training rows hold {len(ids)} tokens: too few to calibrate "
                         f"on rows of {length}")
    return mx.array(np.array(ids[:rows * length]).reshape(rows, length)[:samples])
