"""lm-evaluation-harness's tasks scored on an mlxlab model, kept as mlxlab keeps its own tasks.

An entry of `eval.tasks` / `mlxlab eval --tasks` that is not a jsonl file is lm-eval's: a task,
group or tag name (`arc_easy`, `mmlu`), or a task YAML file (its `dataset_path: json` with local
`data_files` included). lm-eval runs them (`simple_evaluate`, its own prompts, few-shot
examples, filters and metrics) on `MlxlabLM`; what comes back becomes one `TaskScores` per task
that has examples:

- metrics under lm-eval's names, `<metric>` for the unfiltered ones and `<metric>.<filter>`
  (`exact_match.strict-match`) for a filter's (an MLflow key holds no comma), logged as
  `eval/<task>/<metric>`; a group's aggregate the same way under the group's name;
- one row per example (lm-eval's samples): `id` (the doc id), `target`, `resps` (the model's
  raw responses: each choice's (log-likelihood, is greedy), a generation's text, a text's
  log-likelihood), `response` (the filtered response; `response.<filter>` for each other
  filter), each metric's score for that example.
  A score lm-eval keeps as a pair until it aggregates (a perplexity's (log-likelihood, words))
  becomes the example's own value of that aggregate (its perplexity, its bits per byte).

The kind is `lm_eval:<output_type>` and the summary keeps each metric's direction (lm-eval's
`higher_is_better`), which is what `mlxlab runs compare` pairs: McNemar's exact test where every
example's score is 0 or 1, a paired bootstrap otherwise.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mlxlab.errors import MissingFileError
from mlxlab.evaluation.lm_eval.corpus import CORPUS_AGGREGATIONS, aggregation
from mlxlab.evaluation.lm_eval.tasks import (
    KIND_PREFIX,
    HarnessOptions,
    is_yaml,
    lm_eval_module,
    task_manager,
)
from mlxlab.evaluation.scoring import TaskScores

log = logging.getLogger(__name__)

def score_harness(lm: Any, entries: Sequence[str], options: HarnessOptions
                  ) -> tuple[list[TaskScores], dict[str, float]]:
    """lm-eval's `entries` scored on `lm` (an MlxlabLM): one TaskScores per task with examples,
    and the groups' aggregate metrics as `eval/<group>/<metric>` keys."""
    lm_eval = lm_eval_module()
    manager = task_manager(not all(map(is_yaml, entries)))
    paths = [str(Path(e).expanduser().resolve()) if is_yaml(e) else str(e) for e in entries]
    try:
        out = lm_eval.simple_evaluate(
            model=lm, tasks=paths, num_fewshot=options.num_fewshot, limit=options.limit,
            task_manager=manager, log_samples=True, bootstrap_iters=0,
            apply_chat_template=options.apply_chat_template,
            system_instruction=options.system_instruction,
            fewshot_as_multiturn=options.fewshot_as_multiturn,
            # the global RNGs stay the caller's (a training run's); few-shot picks keep lm-eval's seed
            random_seed=None, numpy_random_seed=None, torch_random_seed=None)
    except Exception as e:  # noqa: BLE001 - a dataset that cannot be read is the user's
        missing = _missing_dataset(e)
        if missing is None:
            raise
        raise MissingFileError(missing) from None
    return _scores(out, options.prompts)


def _missing_dataset(error: BaseException) -> str | None:
    """One line for a task whose dataset `datasets` could not load (offline and not in the
    Hugging Face cache, or a data file missing), naming the task and the dataset; None for any
    other error. The task is the one whose `download` was loading it (the traceback's frames)."""
    from datasets.exceptions import DatasetNotFoundError

    wanted = (DatasetNotFoundError, ConnectionError, FileNotFoundError)
    if not isinstance(error, wanted) and not any(
            isinstance(e, wanted) for e in (error.__cause__, error.__context__)):
        return None
    from lm_eval.api.task import ConfigurableTask

    tb, task = error.__traceback__, None
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if isinstance(owner, ConfigurableTask) and owner.DATASET_PATH:
            task = owner
        tb = tb.tb_next
    if task is None:
        return f"an lm-eval task's dataset cannot be loaded ({type(error).__name__}: {error})"
    name = task.config.task
    dataset = task.DATASET_PATH + (f" ({task.DATASET_NAME})" if task.DATASET_NAME else "")
    return (f"lm-eval task {name}: its dataset {dataset} is not in the Hugging Face cache and "
            "cannot be downloaded (offline); load it once with network, or give a task YAML with "
            "local data files (dataset_path: json, dataset_kwargs: {data_files: ...})")


def _metric_name(key: str) -> tuple[str, str] | None:
    """(mlxlab's name, lm-eval's metric) of a results key `metric,filter`; None for stderr."""
    metric, _, filt = key.partition(",")
    if not filt or metric.endswith("_stderr"):
        return None
    return (metric if filt == "none" else f"{metric}.{filt}"), metric


def _per_example(value: Any, metric: str, config: dict) -> float:
    """One example's score: a number as it is; a piece kept for aggregation (a perplexity's
    (log-likelihood, weight), BLEU's (reference, answer)) as the aggregation of that one
    example."""
    if isinstance(value, (int, float)):
        return float(value)
    return float(aggregation(metric, config)[1]([value]))


def _plain(value: Any) -> Any:
    """JSON's types for what lm-eval hands back (tuples, numpy numbers)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    return value if isinstance(value, (str, int, float, bool)) or value is None else str(value)


def _scores(out: dict, prompts: str) -> tuple[list[TaskScores], dict[str, float]]:
    scores, groups = [], {}
    for task, results in out["results"].items():
        metrics = {}
        for key, value in results.items():
            named = _metric_name(key)
            if named and isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and math.isfinite(value):
                metrics[named[0]] = float(value)
        if task not in out.get("samples", {}):
            groups.update({f"eval/{task}/{k}": v for k, v in metrics.items()})
            continue
        config = out["configs"][task]
        directions = out["higher_is_better"].get(task, {})
        rows: dict[int, dict] = {}
        aggregations: dict[str, str] = {}
        for sample in out["samples"][task]:
            row = rows.setdefault(sample["doc_id"], {"id": str(sample["doc_id"]),
                                                     "target": _plain(sample["target"]),
                                                     "resps": _plain(sample["resps"])})
            filt = sample["filter"]
            row["response" if filt == "none" or "response" not in row else
                f"response.{filt}"] = _plain(sample["filtered_resps"])
            for metric in sample["metrics"]:
                name = metric if filt == "none" else f"{metric}.{filt}"
                row[name] = _per_example(sample[metric], metric, config)
                corpus = aggregation(metric, config)[0]
                if corpus in CORPUS_AGGREGATIONS and not isinstance(sample[metric], int | float):
                    # the task's score aggregates these over its documents (evaluation/lm_eval/corpus.py)
                    row.setdefault("pieces", {})[name] = _plain(sample[metric])
                    aggregations[name] = corpus
        paired = {name: bool(directions.get(metric, True)) for name, metric in
                  (_metric_name(k) or (None, None) for k in results) if name in metrics}
        scores.append(TaskScores(task, KIND_PREFIX + str(config["output_type"]), metrics,
                                 [rows[k] for k in sorted(rows)], prompts,
                                 higher_is_better=paired, corpus=aggregations))
    return scores, groups
