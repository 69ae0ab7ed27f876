"""Models: plain nn.Modules called as model(input_ids, attention_mask=None) -> logits (decoding
them token by token is decoding/)."""

from mlxlab.models.decoders.transformer import Transformer
from mlxlab.models.encoders.bert import BertClassifier
from mlxlab.models.encoders.cnn_hybrid import CNNHybrid
from mlxlab.models.parameters import num_parameters

__all__ = ["BertClassifier", "CNNHybrid", "Transformer", "num_parameters"]
