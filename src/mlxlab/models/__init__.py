"""Models: plain nn.Modules called as model(input_ids, attention_mask=None) -> logits (decoding
them token by token is decoding/), a folder per kind, each importing only those after it:
vision/, embedders/, encoders/ and decoders/ (the models a `conf/model/*.yaml` names), sources/
(where a named model's files come from), adapters/ (LoRA / DoRA), quantized/ (packed weights),
layers/ (the building blocks); at the top what they all share: base.py (the Model contract),
parameters.py, hf.py (a folder's config.json and weights), mlx_lm_classes.py (mlx-lm's
architectures) and pretrained.py (a folder as the verbs load it)."""

from mlxlab.models.decoders.transformer import Transformer
from mlxlab.models.encoders.bert import BertClassifier
from mlxlab.models.encoders.cnn_hybrid import CNNHybrid
from mlxlab.models.parameters import num_parameters

__all__ = ["BertClassifier", "CNNHybrid", "Transformer", "num_parameters"]
