"""Raw text streamed with Hugging Face `datasets`, tokenized just in time and packed (task="lm").

A module per job; `StreamingText` (module.py) is the data module that wires them:

- source: where documents come from (`TextSource`: hub dataset or local files, text column);
- splits: which documents validate and which train, and their streams (`Splits`);
- tokenizing: the corpus's tokenizer, trained on a sample and cached, or the one given;
- packing: documents into windows of seq_len + 1 tokens with a resumable position (`Packing`);
- prefetch: the background thread that tokenizes and packs ahead of the trainer;
- policies: the curriculum and the vocabulary remap (data/vocab_remap.py `VocabRemap`), fitted
  on the documents;
- lanes: a lane of the stream per data-parallel rank (`data.shard_by_rank`);
- settings: each group from its config node, and the flat layout of older runs' configs.

conf/data/streaming.yaml targets `mlxlab.data.streaming.StreamingText`, named here.
"""

from mlxlab.data.streaming.module import StreamingText, token_throughput
from mlxlab.data.streaming.packing import Packing, fresh_state
from mlxlab.data.streaming.settings import regroup_flat_config
from mlxlab.data.streaming.source import BUILDERS, DOC_ID, TextSource
from mlxlab.data.streaming.splits import VAL_TEXT_FRACTION, Splits
from mlxlab.data.vocab_remap import VocabRemap

__all__ = [
    "BUILDERS", "DOC_ID", "VAL_TEXT_FRACTION", "Packing", "Splits", "StreamingText", "TextSource",
    "VocabRemap", "fresh_state", "regroup_flat_config", "token_throughput",
]
