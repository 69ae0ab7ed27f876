"""MTEB's retrieval tasks scored on a text embedder by mteb itself (`mteb.evaluate`: its data
loading, its search, pytrec_eval's metrics), its results kept as mlxlab keeps its own tasks:
one `TaskScores` per task, split and subset, under mteb's metric names (ndcg_at_10, map_at_100,
recall_at_k, mrr_at_k, ...; `main_score` is the task's own, nDCG@10 for most), logged as
`eval/<task>/<metric>`. mteb reports a task's means only, so the scores carry no per-query rows
(`mlxlab runs compare` reads their values, not a paired test). Nothing is written to mteb's own
results cache.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from mlxlab.evaluation.mteb.encoder import MlxlabEncoder
from mlxlab.evaluation.mteb.tasks import PREFIX, mteb_module
from mlxlab.evaluation.scoring import TaskScores

KIND = f"{PREFIX}retrieval"


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value)


def task_scores(result: Any) -> list[TaskScores]:
    """One mteb TaskResult as TaskScores: `<task>` for a task's one split and subset, else
    `<task>.<subset>.<split>` for each."""
    parts = [(split, entry) for split, entries in result.scores.items() for entry in entries]
    out = []
    for split, entry in parts:
        name = result.task_name if len(parts) == 1 \
            else f"{result.task_name}.{entry.get('hf_subset', 'default')}.{split}"
        metrics = {key: float(value) for key, value in entry.items() if _number(value)}
        out.append(TaskScores(name, KIND, metrics,
                              higher_is_better={key: True for key in metrics}))
    return out


def score_mteb(encoder: MlxlabEncoder, tasks: Sequence[Any],
               batch_size: int = 32) -> list[TaskScores]:
    """mteb's `tasks` (retrieval task objects, tasks.py check_mteb_entries) on `encoder`."""
    mteb = mteb_module()
    results = mteb.evaluate(encoder, list(tasks), cache=None, overwrite_strategy="always",
                            encode_kwargs={"batch_size": batch_size, "show_progress_bar": False},
                            show_progress_bar=False, co2_tracker=False, raise_error=True)
    return [scores for result in results.task_results for scores in task_scores(result)]
