"""StreamingText, the data module (data/base.py) the trainer sees for streamed text: it wires
the source, the splits, the tokenizer, packing, the prefetch thread, the document policies and
the lanes, and keeps the stream's position (`state_dict`) so a resume never replays it."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from itertools import islice
from pathlib import Path
from typing import Any

import mlx.core as mx

from mlxlab.data.base import DataModule
from mlxlab.data.batching import Batch, Batching
from mlxlab.data.curriculum import Curriculum
from mlxlab.data.streaming.lanes import Lanes
from mlxlab.data.streaming.packing import Packer, Packing, SpecialIds, fresh_state
from mlxlab.data.streaming.policies import DocumentPolicies
from mlxlab.data.streaming.prefetch import threaded
from mlxlab.data.streaming.settings import settings
from mlxlab.data.streaming.source import DOC_ID, TextSource
from mlxlab.data.streaming.splits import Splits, SplitStreams
from mlxlab.data.streaming.tokenizing import DEFAULTS, reuses_tokenizer, special_ids, tokenizer_for
from mlxlab.data.tokenizer import tokenizer_hash
from mlxlab.data.vocab_remap import VocabMap, VocabRemap
from mlxlab.errors import ConfigError

log = logging.getLogger(__name__)


class StreamingText(DataModule):
    """Packed language-modelling batches from a hub dataset or local txt/jsonl/parquet files.

    Documents are tokenized a few at a time in a background thread, each followed by the
    end-of-text token, and the running token stream is cut into windows of seq_len + 1 tokens.
    Only a bounded queue of ready batches, the shuffle buffer and less than one batch of
    leftover tokens are ever held, so memory does not grow with the corpus.

    The settings come in groups, each a dataclass or its dict (conf/data/streaming.yaml):
    `source` (TextSource: hub dataset or files, text column, txt documents, encoding), `splits`
    (Splits: validation split or held-out examples, training cap), `packing` (Packing: seq_len,
    stride, documents per tokenizer call), `vocab_remap` (VocabRemap). `tokenizer` is the
    tokenizer's settings (data/tokenizer.py), trained on `tokenizer_sample` documents and cached
    in `cache_dir`; `shuffle_buffer` examples shuffle the training split (seed + epoch);
    `prefetch` ready batches are queued; `curriculum` orders documents (data/curriculum.py);
    `shard_by_rank` gives each data-parallel rank a lane of its own (lanes.py).
    """

    task = "lm"
    num_labels = None

    def __init__(
        self,
        source: TextSource | Mapping | None = None,
        splits: Splits | Mapping | None = None,
        packing: Packing | Mapping | None = None,
        tokenizer: Mapping | None = None,
        tokenizer_sample: int = 5000,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        prefetch: int = 4,
        cache_dir: str | None = None,
        curriculum: Mapping | None = None,
        vocab_remap: VocabRemap | Mapping | None = None,
        shard_by_rank: bool = False,
    ) -> None:
        self.source = settings(TextSource, source, "source")
        self.splits = settings(Splits, splits, "splits")
        self.packing = settings(Packing, packing, "packing")
        self.streams = SplitStreams(self.source, self.splits, shuffle_buffer, seed)
        self.tokenizer_cfg = {**DEFAULTS, **dict(tokenizer or {})}
        self.tokenizer_sample = int(tokenizer_sample)
        self.prefetch = int(prefetch)
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.policies = DocumentPolicies(curriculum, seed,
                                         settings(VocabRemap, vocab_remap, "vocab_remap"))
        self.lanes = Lanes(shard_by_rank)
        self.tokenizer: Any = None
        self.tokenizer_hash: str | None = None
        self.vocab_size: int | None = None
        self.full_vocab_size: int | None = None  # the tokenizer's (vocab_size: the model's)
        self.special_ids: SpecialIds | None = None
        self._state = fresh_state(0)
        self._val_cache: dict[int, list[dict]] = {}
        self._epoch_batches: dict[int, int] = {}  # rows per batch -> batches in an epoch

    # ------------------------------------------------------------------ what it holds
    @property
    def seq_len(self) -> int:
        return self.packing.seq_len

    @property
    def curriculum(self) -> Curriculum | None:
        return self.policies.curriculum

    @property
    def curriculum_documents(self) -> list[str]:
        """The training documents the curriculum keeps (its outlier examples name them)."""
        return self.policies.docs

    @property
    def vocab_map(self) -> VocabMap | None:
        return self.policies.vocab_map

    @property
    def eot_id(self) -> int:
        """The end-of-text id that ends every document (after setup)."""
        return self.special_ids.eot

    @property
    def has_validation(self) -> bool:
        return self.splits.has_validation

    no_validation_reason = "data.splits.val_examples=0 and no data.splits.val_split"

    def source_name(self) -> str:
        return self.source.name()

    # ---------------------------------------------------------------------- setup
    def setup(self, run_dir: str | Path | None = None) -> None:
        save_to = Path(run_dir) / "tokenizer.json" if run_dir is not None else None
        self.streams.hold_out_text_if_few_documents()
        # The tokenizer sample; with a tokenizer given, one document just to check the source.
        wanted = 1 if reuses_tokenizer(self.tokenizer_cfg, save_to) else self.tokenizer_sample
        sample = list(islice(self.source.documents(self.streams.unshuffled_train()), wanted))
        if not sample:
            held = ("" if self.splits.val_split
                    else f" after holding out val_examples={self.splits.val_examples}")
            raise ConfigError(
                f"no text in {self.source_name()}{held}: the source is empty "
                "(check data.source.data_files= / data.source.dataset_id=)"
            )
        self.tokenizer = tokenizer_for(self.tokenizer_cfg, sample, save_to, self.cache_dir)
        self.vocab_size = self.full_vocab_size = self.tokenizer.get_vocab_size()
        self.tokenizer_hash = tokenizer_hash(self.tokenizer)  # recorded in checkpoints
        self.special_ids = special_ids(self.tokenizer, self.tokenizer_cfg)
        log.info("%s: vocab %d, seq_len %d", self.source_name(), self.vocab_size, self.seq_len)
        if self.policies.reads_documents:
            documents = self.source.documents(self.streams.unshuffled_train())
            self.vocab_size = self.policies.fit(documents, self.splits.max_examples,
                                                self.tokenizer, self.special_ids, self.vocab_size)

    # -------------------------------------------------------------------- batches
    def rows_per_batch(self, batching: Batching) -> int:
        """batch_size windows; with dynamic=True as many as fit max_tokens (all are seq_len)."""
        if batching.dynamic and batching.max_tokens:
            return max(1, batching.max_tokens // self.seq_len)
        return batching.batch_size

    def _to_mx(self, batch: dict) -> Batch:
        if self.vocab_map is not None:  # the model's ids (data/vocab_remap.py)
            batch = self.vocab_map.remap(batch)
        return {k: mx.array(v) for k, v in batch.items()}

    def _train_stream(self, epoch: int, skip: int = 0) -> Any:
        if self.curriculum is not None:  # the documents in the curriculum's order
            docs, column = self.policies.docs, self.source.text_column
            order = self.policies.document_order(epoch)
            return ({column: docs[i], DOC_ID: i} for i in order[skip:])
        return self.streams.train(epoch, skip)

    def _pack(self, stream: Any, batch_size: int, state: dict) -> Iterator[tuple[dict, dict]]:
        # self.tokenizer read now: a wrapper set after setup (benchmarks count calls) is used
        packer = Packer(self.packing, self.tokenizer, self.special_ids, self.source.text)
        return packer.pack(self.source.read(stream), batch_size, state)

    def train_batches(self, batching: Batching, epoch: int) -> Iterator[Batch]:
        """One epoch of packed (batch_size, seq_len) batches; resumes at the loaded state."""
        state = self._state if self._state["epoch"] == epoch else fresh_state(epoch)
        rows = self.rows_per_batch(batching)
        if self.curriculum is not None:
            self.policies.pace(rows, self.packing.stride)
        base = state.get("base", 0)
        stream = self._train_stream(epoch, skip=base + state["examples_consumed"] * self.lanes.count)
        packed = threaded(self._pack(self.lanes.take(stream), rows, state), self.prefetch)
        for batch, after in packed:
            if not self.lanes.all_have_a_batch():
                break
            self._state = {**after, "base": base}  # counted when handed out, like TabularText
            if self.curriculum is not None:
                self.curriculum.observe(batch["labels"], batch["loss_mask"])
            yield self._to_mx(batch)
        else:  # this lane ran dry: the others learn it from its vote
            self.lanes.all_have_a_batch(False)
        packed.close()  # stops the producer of a lane that still had batches
        self._state = fresh_state(epoch + 1)

    def val_batches(self, batching: Batching) -> Iterator[Batch]:
        """Held-out batches, never shuffled; packed once and kept (bounded by val_examples)."""
        rows = self.rows_per_batch(batching)
        if rows not in self._val_cache:
            stream = self.streams.val()
            self._val_cache[rows] = (
                [] if stream is None else [b for b, _ in self._pack(stream, rows, fresh_state(0))]
            )
        for batch in self._val_cache[rows]:
            yield self._to_mx(batch)

    def num_train_batches(self, batching: Batching) -> None:
        return None  # unknown for a stream until counted (count_train_batches)

    def count_train_batches(self, batching: Batching, limit: int | None = None) -> int:
        """Batches in one pass over (this lane of) the training split: tokenized and packed once,
        as an epoch is, for a run bounded by trainer.max_epochs (its schedule and bar). With
        `limit` (what max_steps leaves an epoch), the pass stops at limit + 1 batches."""
        rows = self.rows_per_batch(batching)
        if rows in self._epoch_batches:
            return self._epoch_batches[rows]
        start = time.perf_counter()
        log.info("data: counting an epoch of %s (trainer.max_epochs)", self.source_name())
        batches = self._pack(self.lanes.take(self._train_stream(0)), rows, fresh_state(0))
        count = sum(1 for _ in islice(batches, None if limit is None else limit + 1))
        if limit is not None and count > limit:
            log.info("data: an epoch is more than %d batches of %d rows: trainer.max_steps ends "
                     "the run first", limit, rows)
            return count
        self._epoch_batches[rows] = count
        log.info("data: an epoch is %d batches of %d rows (counted in %.1f s)", count, rows,
                 time.perf_counter() - start)
        return count

    # ------------------------------------------------------------------- position
    def use_world(self, world: Any) -> bool:
        """Data parallel with `shard_by_rank` (lanes.py): rank r reads and packs lane r into
        batches of its own batch_size (the trainer then neither scales the batch nor splits it:
        the global batch is the N lanes' batches side by side). True when this data now yields
        per-rank batches."""
        if not self.lanes.use(world):
            return False
        self._state = fresh_state(self._state["epoch"])
        return True

    def state_dict(self) -> dict:
        """This rank's position (its lane's, with shard_by_rank); `gathered_state` for a
        checkpoint."""
        return {**self._state, "lane": self.lanes.lane, "lanes": self.lanes.count,
                **self.policies.state_dict()}

    def gathered_state(self) -> dict:
        """The position of every lane (called by every rank; rank 0 writes it)."""
        if self.lanes.world is None:
            return self.state_dict()
        return {**self.lanes.gather(self._state), **self.policies.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Resume at a saved position, of this lane count or another (Lanes.restore)."""
        self._state = self.lanes.restore(self.policies.load_state_dict(state), fresh_state)


def token_throughput(
    data: StreamingText, batching: Batching, max_batches: int = 50, epoch: int = 0
) -> dict:
    """Tokenizer + packing speed: scored tokens per second over up to `max_batches` batches."""
    saved = data.state_dict()
    tokens, batches = 0.0, 0
    start = time.perf_counter()
    stream = data.train_batches(batching, epoch)
    for batch in stream:
        tokens += float(batch["loss_mask"].sum().item())
        batches += 1
        if batches >= max_batches:
            break
    stream.close()  # stops the producer thread now, not at garbage collection
    seconds = time.perf_counter() - start
    data.load_state_dict(saved)
    return {
        "tokens": tokens,
        "batches": batches,
        "seconds": seconds,
        "tokens_per_s": tokens / max(seconds, 1e-9),
    }
