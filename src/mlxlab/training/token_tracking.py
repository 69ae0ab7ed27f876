"""The callback that reports a data module's curriculum (data/curriculum.py): its pacing, the
KL of the tokens trained on so far against the corpus, and at the end a histogram PNG and the
outlier examples (most rare-token mass) as artifacts."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from mlxlab.training.callbacks import Callback

log = logging.getLogger("mlxlab.training")


class TokenDistributionLog(Callback):
    def __init__(self, data, tracker, run_dir: Path, total_batches: int, grad_accum: int = 1):
        self.data, self.curriculum, self.tracker = data, data.curriculum, tracker
        self.run_dir, self.total_batches, self.grad_accum = Path(run_dir), total_batches, grad_accum

    def on_train_start(self, total_steps: int | None, start_step: int) -> None:
        self.curriculum.set_total(self.total_batches)
        c = self.curriculum
        log.info("curriculum: score=%s pacing=%s, from %.0f%% of the examples to all by %.0f%% "
                 "of training", c.score, c.pacing, 100 * c.competence(0) if c.active else 100,
                 100 * c.full_at)

    def on_step(self, step: int, logs: dict[str, float]) -> None:
        if logs:  # a logged step
            logs["data/kl_seen_corpus"] = self.curriculum.kl_seen_corpus()
            if self.curriculum.active:
                logs["data/competence"] = self.curriculum.competence(step * self.grad_accum)

    def on_train_end(self) -> None:
        if self.curriculum.seen is None or not self.curriculum.seen.any():
            return
        folder = self.run_dir / "curriculum"
        folder.mkdir(parents=True, exist_ok=True)
        tok, data = self.data.tokenizer, self.data
        names = [tok.id_to_token(i) or str(i) for i in range(len(self.curriculum.seen))] if tok else None
        texts = data.curriculum_documents or None
        if texts is None and data.train_idx is not None:
            texts = [data.examples[i] for i in data.train_idx]
        png = self.curriculum.histogram_png(folder / "token_histogram.png", names)
        out = folder / "outliers.json"
        out.write_text(json.dumps(self.curriculum.outliers(texts), indent=1))
        summary = folder / "summary.json"
        c = self.curriculum
        summary.write_text(json.dumps({"kl_seen_corpus": c.kl_seen_corpus(), "score": c.score,
                                       "tokens_seen": int(c.seen.sum())}))
        for path in (png, out, summary):
            self.tracker.log_artifact(path, "curriculum")
