"""Tiny random Llama-family checkpoints written by transformers (scripts/tiny_hf_model.py) and
the torch side of the parity checks."""

from __future__ import annotations

import importlib.util

import numpy as np

from conftest import REPO

_spec = importlib.util.spec_from_file_location("tiny_hf_model", REPO / "scripts" / "tiny_hf_model.py")
tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tiny)
save_tiny_model = tiny.save_tiny_model


def torch_logits(model, ids: np.ndarray) -> np.ndarray:
    """Float32 logits of a transformers model for a (B, T) id array."""
    import torch

    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()


def mlx_logits(model, ids: np.ndarray) -> np.ndarray:
    import mlx.core as mx

    model.eval()
    return np.array(model(mx.array(ids, dtype=mx.int32)).astype(mx.float32))
