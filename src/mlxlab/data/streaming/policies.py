"""The policies that read the training documents once at setup: the curriculum
(data/curriculum.py: document order, token counts) and the vocabulary remap
(data/vocab_remap.py: the model's shrunken vocabulary). Their state rides beside the stream's
position in every checkpoint."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from itertools import islice
from typing import Any

import numpy as np

from mlxlab.data.curriculum import Curriculum
from mlxlab.data.streaming.packing import SpecialIds
from mlxlab.data.streaming.tokenizing import encode_documents
from mlxlab.data.vocab_remap import VocabMap, VocabRemap

log = logging.getLogger(__name__)


class DocumentPolicies:
    """The curriculum and the vocabulary map of one data module."""

    def __init__(self, curriculum: Mapping | None, seed: int, vocab_remap: VocabRemap) -> None:
        self.curriculum = Curriculum.from_config(curriculum, seed)
        self.vocab_remap = vocab_remap
        self.vocab_map: VocabMap | None = None
        self.docs: list[str] = []  # the curriculum's documents, kept in memory
        self.docs_per_batch = 1.0

    @property
    def reads_documents(self) -> bool:
        return self.curriculum is not None or bool(self.vocab_remap.mode)

    def fit(self, documents: Iterable[str], max_examples: int | None, tokenizer: Any,
            ids: SpecialIds, vocab_size: int) -> int:
        """Read the training documents once: the curriculum keeps them, the map counts them.
        Returns the model's vocabulary size (the map's, with a remap)."""
        self.docs = list(islice(documents, max_examples) if max_examples else documents)
        encoded = encode_documents(tokenizer, ids, self.docs)
        if self.curriculum is not None:
            self.curriculum.fit(encoded, vocab_size)
        else:
            self.docs = []
        if not self.vocab_remap.mode:
            return vocab_size
        counts = np.bincount(np.concatenate(encoded), minlength=vocab_size)
        self.vocab_map = VocabMap.build(self.vocab_remap, counts, [ids.eot, ids.pad, *ids.bos])
        log.info("vocab_remap=%s: %d of %d tokens kept (+1 UNK): the model's vocabulary is %d",
                 self.vocab_remap.mode, self.vocab_map.size - 1, vocab_size, self.vocab_map.size)
        return self.vocab_map.size

    def document_order(self, epoch: int) -> np.ndarray:
        return self.curriculum.document_order(epoch, self.docs_per_batch)

    def pace(self, rows_per_batch: int, stride: int) -> None:
        """How many documents a batch holds, for the curriculum's pacing."""
        per_doc = self.curriculum.lengths.mean() if len(self.docs) else 1.0
        self.docs_per_batch = rows_per_batch * stride / per_doc

    def state_dict(self) -> dict:
        """The curriculum's token counts and the vocabulary map (a checkpoint's generation maps
        back with it), beside the position."""
        state = {}
        if self.curriculum is not None:
            state["curriculum"] = self.curriculum.state_dict()
        if self.vocab_map is not None:
            state["vocab_map"] = self.vocab_map.state_dict()
        return state

    def load_state_dict(self, state: dict) -> dict:
        """Restore what state_dict saved; returns the position part of `state`."""
        state = dict(state)
        if self.curriculum is not None:
            self.curriculum.load_state_dict(state.get("curriculum"))
        saved = state.pop("vocab_map", None)
        mine = self.vocab_map.state_dict() if self.vocab_map is not None else None
        if saved != mine:
            raise ValueError("resume: the checkpoint's data.vocab_remap map differs from this "
                             "data's (other documents or settings): resume with the same data")
        state.pop("curriculum", None)
        return state
