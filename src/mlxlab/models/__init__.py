"""Models: plain nn.Modules called as model(input_ids, attention_mask=None) -> logits."""

from mlxlab.models.bert import BertClassifier
from mlxlab.models.cnn_hybrid import CNNHybrid
from mlxlab.models.generation import generate_tokens
from mlxlab.models.parameters import num_parameters
from mlxlab.models.transformer import Transformer

__all__ = ["BertClassifier", "CNNHybrid", "Transformer", "generate_tokens", "num_parameters"]
