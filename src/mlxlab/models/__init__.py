"""Models: plain nn.Modules called as model(input_ids, attention_mask=None) -> logits."""

import mlx.nn as nn
from mlx.utils import tree_flatten

from mlxlab.models.bert import BertClassifier
from mlxlab.models.cnn_hybrid import CNNHybrid
from mlxlab.models.transformer import Transformer, generate_step

__all__ = ["BertClassifier", "CNNHybrid", "Transformer", "generate_step", "num_parameters"]


def num_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Parameter count from shapes alone (no mx.eval, so no allocation)."""
    params = model.trainable_parameters() if trainable_only else model.parameters()
    return sum(v.size for _, v in tree_flatten(params))
