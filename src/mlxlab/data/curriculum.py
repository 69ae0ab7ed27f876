"""Curriculum batching and tracking of the token distribution trained on.

`data.curriculum={score: length|rarity|none, pacing: root|linear, start: 0.2, full_at: 0.5}`:
the training examples are ranked easy to hard by `score` (their token count, or `rarity`: their
mean unigram surprisal -log p(token) under the training corpus's token frequencies) and each
batch is drawn from the easiest fraction c(t) of them, the competence of Platanios et al. (2019):
c grows from `start` at the first batch to 1 at `full_at` of training, linearly or as a square
root (fast first, then slower); from then on batches are drawn from all the data. `score: none`
keeps the module's own order and only tracks.

Whatever the score, the tokens of every batch handed out are counted: KL(seen || corpus) of
the unigram distributions is logged as `data/kl_seen_corpus` (it falls towards 0 as training
covers the corpus evenly; a curriculum keeps it high early), and at the end a histogram of the
seen vs corpus token frequencies (PNG) and the outlier examples, those with the most rare-token
mass (tokens in the rarest `rare_mass` tail of the corpus), are artifacts. The counts are part
of the data module's state, so they resume with it.

Batches are drawn by a generator seeded from (seed, epoch, batch), so a resumed run draws the
same ones. The number of batches per epoch is the module's usual one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from mlxlab.config.records import check_number, record
from mlxlab.errors import ConfigError

SCORES = ("length", "rarity", "none")
PACINGS = ("root", "linear")


@dataclass(frozen=True)
class CurriculumSettings:
    """`data.curriculum`, each key checked once (one ConfigError line naming it)."""

    score: str = "length"      # length | rarity | none (only track the tokens trained on)
    pacing: str = "root"       # root | linear: how the competence grows
    start: float = 0.2         # the competence at the first batch
    full_at: float = 0.5       # the share of training at which every example is drawn
    rare_mass: float = 0.05    # the corpus's rarest tokens, by mass: the outliers' measure
    outliers: int = 20         # examples listed as outliers at the end

    def __post_init__(self) -> None:
        if self.score not in SCORES:
            raise ConfigError(f"data.curriculum.score={self.score!r}: use one of "
                              f"{', '.join(SCORES)}")
        if self.pacing not in PACINGS:
            raise ConfigError(f"data.curriculum.pacing={self.pacing!r}: use root or linear")
        for key in ("start", "full_at", "rare_mass"):
            check_number(f"data.curriculum.{key}", getattr(self, key), float)
        check_number("data.curriculum.outliers", self.outliers, int, 0)
        if not 0 < self.start <= 1 or not 0 < self.full_at <= 1:
            raise ConfigError(f"data.curriculum needs 0 < start <= 1 and 0 < full_at <= 1, got "
                              f"start={self.start}, full_at={self.full_at}")


class Curriculum:
    def __init__(self, score: str = "length", pacing: str = "root", start: float = 0.2,
                 full_at: float = 0.5, seed: int = 0, rare_mass: float = 0.05,
                 outliers: int = 20) -> None:
        CurriculumSettings(score, pacing, start, full_at, rare_mass, outliers)  # the checks
        self.score, self.pacing, self.start, self.full_at = score, pacing, start, full_at
        self.seed, self.rare_mass, self.num_outliers = int(seed), rare_mass, int(outliers)
        self.total_batches: int | None = None
        self.seen: np.ndarray | None = None

    @classmethod
    def from_config(cls, cfg: Mapping | None, seed: int) -> Curriculum | None:
        """The `data.curriculum` node's curriculum (None: off); a key it does not have is one
        ConfigError naming it (validation.record)."""
        if not cfg:
            return None
        return cls(seed=seed, **asdict(record(CurriculumSettings, cfg, "data.curriculum")))

    @property
    def active(self) -> bool:
        return self.score != "none"

    # ---------------------------------------------------------------- corpus
    def fit(self, examples: Sequence[np.ndarray], vocab_size: int) -> None:
        """Corpus token counts, each example's difficulty and rare-token mass."""
        self.corpus = np.zeros(vocab_size, np.int64)
        for ids in examples:
            self.corpus += np.bincount(ids, minlength=vocab_size)
        self.seen = np.zeros(vocab_size, np.int64)
        p = self.corpus / max(self.corpus.sum(), 1)
        surprisal = -np.log(np.where(p > 0, p, 1.0))
        # rare tokens: the least frequent ones that together make up rare_mass of the corpus
        order = np.argsort(-self.corpus, kind="stable")
        tail = np.cumsum(p[order]) > 1 - self.rare_mass
        self.rare = np.zeros(vocab_size, bool)
        self.rare[order[tail]] = True
        self.lengths = np.array([len(ids) for ids in examples])
        self.rarity = np.array([surprisal[ids].mean() if len(ids) else 0.0 for ids in examples])
        self.rare_share = np.array([self.rare[ids].mean() if len(ids) else 0.0 for ids in examples])
        difficulty = self.lengths if self.score == "length" else self.rarity
        self.order = np.lexsort((np.arange(len(examples)), difficulty))  # easy first, stable

    def set_total(self, total_batches: int) -> None:
        self.total_batches = max(1, int(total_batches))

    def competence(self, batch: int) -> float:
        """The fraction of the data (easiest first) batch number `batch` is drawn from."""
        t = min(1.0, batch / max(1.0, self.full_at * (self.total_batches or 1)))
        if self.pacing == "linear":
            return min(1.0, self.start + (1 - self.start) * t)
        return min(1.0, math.sqrt(self.start**2 + (1 - self.start**2) * t))

    def draw(self, batch: int, size: int, epoch: int, k: int) -> np.ndarray:
        """`size` example indices (distinct where the pool allows) for global batch `batch`."""
        n = len(self.order)
        pool = self.order[: min(n, max(size, math.ceil(self.competence(batch) * n)))]
        rng = np.random.default_rng([self.seed, epoch, k])
        return rng.choice(pool, size, replace=size > len(pool))

    def epoch_batches(self, batches: list[np.ndarray], epoch: int) -> list[np.ndarray]:
        """Indexed data: this epoch's batches (same sizes) drawn by the curriculum instead."""
        if not self.active:
            return batches
        n = len(batches)
        return [self.draw(epoch * n + k, len(b), epoch, k) for k, b in enumerate(batches)]

    def document_order(self, epoch: int, docs_per_batch: float) -> np.ndarray:
        """Streamed documents: one epoch of len(examples) draws, document j from the pool of the
        batch it is expected to land in (packing puts ~docs_per_batch documents in a batch)."""
        n = len(self.order)
        if not self.active:
            return np.random.default_rng([self.seed, epoch]).permutation(n)
        batch = (epoch * n + np.arange(n)) / max(docs_per_batch, 1e-9)
        pool = np.array([max(1, math.ceil(self.competence(int(b)) * n)) for b in batch])
        u = np.random.default_rng([self.seed, epoch]).random(n)
        return self.order[np.minimum((u * pool).astype(np.int64), pool - 1)]

    # -------------------------------------------------------------- tracking
    def observe(self, ids: np.ndarray, mask: np.ndarray) -> None:
        """Count the tokens a batch trains on (mask: the positions that count)."""
        if self.seen is not None:
            self.seen += np.bincount(ids[mask > 0].ravel(), minlength=len(self.seen))

    def kl_seen_corpus(self) -> float:
        if self.seen is None or not self.seen.any():
            return math.nan
        p, q = self.seen / self.seen.sum(), self.corpus / self.corpus.sum()
        nz = p > 0
        return float((p[nz] * np.log(p[nz] / np.maximum(q[nz], 1e-12))).sum())

    def outliers(self, texts: Sequence[str] | None = None) -> list[dict]:
        top = np.argsort(-self.rare_share, kind="stable")[: self.num_outliers]
        return [{"example": int(i), "rare_token_share": round(float(self.rare_share[i]), 4),
                 "tokens": int(self.lengths[i]), "rarity": round(float(self.rarity[i]), 3),
                 **({"text": texts[i][:300]} if texts is not None else {})} for i in top]

    def histogram_png(self, path: Path, names: Sequence[str] | None = None, top: int = 40) -> Path:
        """Seen vs corpus frequency of the `top` most common corpus tokens, and the whole rank
        -frequency curve of both (log scale)."""
        import matplotlib  # ~0.8 s to import: only when the histogram is drawn

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        p, q = self.seen / max(self.seen.sum(), 1), self.corpus / max(self.corpus.sum(), 1)
        order = np.argsort(-self.corpus, kind="stable")
        fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
        x = np.arange(min(top, len(order)))
        a.bar(x - 0.2, q[order[x]], 0.4, label="corpus")
        a.bar(x + 0.2, p[order[x]], 0.4, label="trained on so far")
        if names is not None:
            a.set_xticks(x, [names[i] for i in order[x]], rotation=90, fontsize=6)
        a.set_title(f"top {len(x)} tokens; KL(seen || corpus) = {self.kl_seen_corpus():.4f}")
        a.legend()
        order = order[q[order] > 0]  # tokens the corpus never uses have no rank
        ranks = np.arange(1, len(order) + 1)
        b.loglog(ranks, q[order], label="corpus")
        b.loglog(ranks, np.where(p[order] > 0, p[order], np.nan), ".", markersize=2,
                 label="trained on (unseen: not drawn)")
        b.set_xlabel("corpus frequency rank")
        b.set_ylabel("share of tokens")
        b.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {"seen": self.seen.tolist() if self.seen is not None else None}

    def load_state_dict(self, state: Mapping | None) -> None:
        if state and state.get("seen") is not None:
            self.seen = np.asarray(state["seen"], np.int64)
