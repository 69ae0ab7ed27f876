"""Data room: tokenizers, CSV rows as text (classification), streamed packed text (lm), batching.

Data modules follow the protocol in docs/architecture.md: setup(run_dir), train_batches(batching,
epoch), val_batches(batching), num_train_batches(batching), state_dict()/load_state_dict().
"""

from mlxlab.data.batching import Batching, bucket_length
from mlxlab.data.streaming import StreamingText, token_throughput
from mlxlab.data.tabular import TabularText, stratified_split
from mlxlab.data.tokenizer import build_tokenizer, tokenizer_hash

__all__ = [
    "Batching",
    "StreamingText",
    "TabularText",
    "bucket_length",
    "build_tokenizer",
    "stratified_split",
    "token_throughput",
    "tokenizer_hash",
]
