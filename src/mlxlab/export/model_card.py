"""The exported folder's README.md: the run's evaluation-task scores as a Hugging Face model card.

Written when the run scored tasks (eval.tasks): the best evaluation's metrics with their 95 %
intervals over the examples, in the card's YAML `model-index` (what the hub shows as the
evaluation results) and in a table. Where the MLflow store holds an `mlxlab eval` run of the
base model (model.pretrained) on the same task, its scores sit beside them with the paired
difference (B - base, 95 % interval, McNemar's p) over the examples both scored.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from mlxlab.evaluation.paired import pair_task
from mlxlab.evaluation.results import SavedTask, intervals
from mlxlab.runs.task_scores import folder_scores, run_scores
from mlxlab.tracking import tags as T

log = logging.getLogger(__name__)


def base_scores(config: dict, store_uri: str | None) -> tuple[dict[str, SavedTask], str | None]:
    """The newest finished `mlxlab eval` run of the run's base model (model.pretrained) in the
    store: its scores and run id; ({}, None) when there is none or no store."""
    pretrained = (config.get("model") or {}).get("pretrained")
    if not pretrained:
        return {}, None
    try:
        from mlflow import MlflowClient  # ~2 s: only for a run that scored tasks

        from mlxlab.tracking.mlflow.store import resolve_uri, sqlite_path

        uri = resolve_uri(store_uri)
        db = sqlite_path(uri)
        if db is not None and not db.exists():
            return {}, None
        client = MlflowClient(tracking_uri=uri)
        path = str(Path(pretrained).expanduser().resolve()).replace("'", "\\'")
        runs = client.search_runs(
            [e.experiment_id for e in client.search_experiments()],
            f"tags.`{T.EVAL_MODEL}` = '{path}' and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"], max_results=1)
    except Exception as err:  # noqa: BLE001 - the card is written without the base's scores
        log.warning("model card: the store was not read for the base model's scores (%s)", err)
        return {}, None
    if not runs:
        return {}, None
    return run_scores(client, runs[0]), runs[0].info.run_id


def model_card(run_dir: Path, name: str, config: dict, run_id: str | None,
               step: int | None) -> str | None:
    """README.md for the export of the run in `run_dir`, None when it scored no task."""
    scores = folder_scores(run_dir, "best")
    if not scores:
        return None
    tracking = config.get("tracking") or {}
    base, base_run = base_scores(config, tracking.get("uri") if isinstance(tracking, dict) else None)
    pretrained = (config.get("model") or {}).get("pretrained")
    lines = ["---", "library_name: transformers", "tags: [mlxlab, mlx]"]
    if pretrained:
        lines.append(f"base_model: {Path(pretrained).name}")
    lines += ["model-index:", f"- name: {name}", "  results:"]
    for task in scores.values():
        lines += ["  - task: {type: text-generation}",
                  f"    dataset: {{name: {task.task}, type: {task.task}}}", "    metrics:"]
        lines += [f"    - {{type: {k}, value: {v:.6g}, name: {k}}}" for k, v in task.metrics.items()]
    lines += ["---", "", f"# {name}", "",
              f"Trained with mlxlab{f' from {pretrained}' if pretrained else ''} "
              f"(run {run_id or run_dir}); scores of its best evaluation"
              f"{f' (step {step})' if step is not None else ''} on the evaluation tasks, with 95 % "
              "intervals over the examples.", "", "## Evaluation", ""]
    header = "| task | metric | n | score | 95 % CI |"
    rule = "|---|---|---|---|---|"
    if base:
        header += " base model | difference [95 % CI] | p |"
        rule += "---|---|---|"
    lines += [header, rule]
    for task in scores.values():
        lines += _rows(task, base.get(task.task), bool(base))
    if base:
        lines += ["", f"Base model: {pretrained}, scored by `mlxlab eval` (MLflow run {base_run}); "
                  "the difference is this model's minus the base's over the examples both scored "
                  "(paired bootstrap interval; McNemar's exact test for right/wrong scores)."]
    return "\n".join(lines) + "\n"


def _rows(task: SavedTask, base: SavedTask | None, with_base: bool) -> list[str]:
    bounds = intervals(task)
    paired: dict[str, Any] = {}
    if base is not None and base.kind == task.kind:
        try:
            paired = {p.metric: p for p in pair_task(base, task)}
        except ValueError:  # no shared ids: the base's scores are shown unpaired
            paired = {}
    rows = []
    for metric, value in task.metrics.items():
        _, low, high = bounds.get(metric, (value, None, None))
        ci = f"[{low:.4f}, {high:.4f}]" if low is not None else "-"
        row = f"| {task.task} | {metric} | {len(task.rows)} | {value:.4f} | {ci} |"
        if base is not None:
            theirs = base.metrics.get(metric)
            p = paired.get(metric)
            diff = f"{p.diff:+.4f} [{p.low:+.4f}, {p.high:+.4f}]" if p else "-"
            row += (f" {theirs:.4f} |" if theirs is not None else " - |") + f" {diff} |" \
                + (f" {p.p:.3g} |" if p else " - |")
        elif with_base:
            row += " - | - | - |"
        rows.append(row)
    return rows
