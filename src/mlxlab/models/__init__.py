"""Models: plain nn.Modules called as model(input_ids, attention_mask=None) -> logits (decoding
them token by token is decoding/)."""

from mlxlab.models.bert import BertClassifier
from mlxlab.models.cnn_hybrid import CNNHybrid
from mlxlab.models.parameters import num_parameters
from mlxlab.models.transformer import Transformer

__all__ = ["BertClassifier", "CNNHybrid", "Transformer", "num_parameters"]
