"""The exported folder's README.md: the run's evaluation-task scores as a Hugging Face model card.

Written when the run scored tasks (eval.tasks): the best evaluation's metrics with their 95 %
intervals over the examples, in the card's YAML `model-index` (what the hub shows as the
evaluation results) and in a table. Where the MLflow store holds an `mlxlab eval` run of the
base model (model.pretrained) that scored the same task the same way (its kind, its prompts:
plain or through the chat template, and the same example ids), the newest such run's scores sit
beside them with the difference (this model - base, 95 % interval, p) over those examples; a
task no such run scored shows no base score, and a line under the table says why. The
difference is the shown score minus the shown base score: for accuracies the mean of the
per-example differences (McNemar's exact test), for a perplexity task's token-weighted loss the
difference of the two token-weighted losses (evaluation/paired.py pair_weighted_loss).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from mlxlab.evaluation.paired import pair_task, pair_weighted_loss
from mlxlab.evaluation.results import SavedTask, intervals
from mlxlab.evaluation.run_scores import folder_scores, run_scores
from mlxlab.evaluation.tasks import PERPLEXITY, TRANSCRIPTION
from mlxlab.tracking import tags as T

log = logging.getLogger(__name__)


# The newest base-model evaluations looked through for one that scored a task like this run
BASE_RUNS = 20


def base_evaluations(config: dict, store_uri: str | None) -> list[tuple[str, dict[str, SavedTask]]]:
    """The finished `mlxlab eval` runs of the run's base model (model.pretrained) in the store,
    newest first: (run id, scores); [] when there is none or no store."""
    pretrained = (config.get("model") or {}).get("pretrained")
    if not pretrained:
        return []
    try:
        from mlflow import MlflowClient  # ~2 s: only for a run that scored tasks

        from mlxlab.tracking.mlflow.store import resolve_uri, sqlite_path

        uri = resolve_uri(store_uri)
        db = sqlite_path(uri)
        if db is not None and not db.exists():
            return []
        client = MlflowClient(tracking_uri=uri)
        path = str(Path(pretrained).expanduser().resolve()).replace("'", "\\'")
        runs = client.search_runs(
            [e.experiment_id for e in client.search_experiments()],
            f"tags.`{T.EVAL_MODEL}` = '{path}' and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"], max_results=BASE_RUNS)
        return [(r.info.run_id, run_scores(client, r)) for r in runs]
    except Exception as err:  # noqa: BLE001 - the card is written without the base's scores
        log.warning("model card: the store was not read for the base model's scores (%s)", err)
        return []


def like_base(task: SavedTask, evaluations: list[tuple[str, dict[str, SavedTask]]]
              ) -> tuple[SavedTask | None, str | None, str | None]:
    """The newest base evaluation that scored `task` like this run did (same kind, prompts and
    example ids): (its scores, its run id, None), else (None, None, why none is shown)."""
    scored = [(run, found[task.task]) for run, found in evaluations if task.task in found]
    ids = set(task.by_id())
    for run, base in scored:
        if base.kind == task.kind and base.prompts == task.prompts and set(base.by_id()) == ids:
            return base, run, None
    if not scored:
        return None, None, None  # no evaluation of the base on this task: nothing to explain
    return None, None, (f"{task.task}: no evaluation of the base model scored the same examples "
                        f"with {task.prompts} prompts (its {len(scored)} evaluation(s) of "
                        f"{task.task}: " + ", ".join(f"{b.prompts} prompts, {len(b.rows)} "
                                                     f"examples" for _, b in scored[:3])
                        + f"); score it like this model: mlxlab eval <base> {task.task}.jsonl "
                        f"--chat {'template' if task.prompts != 'plain' else 'plain'}")


def model_card(run_dir: Path, name: str, config: dict, run_id: str | None,
               step: int | None) -> str | None:
    """README.md for the export of the run in `run_dir`, None when it scored no task."""
    scores = folder_scores(run_dir, "best")
    if not scores:
        return None
    tracking = config.get("tracking") or {}
    evaluations = base_evaluations(config, tracking.get("uri") if isinstance(tracking, dict)
                                   else None)
    paired = {name: like_base(task, evaluations) for name, task in scores.items()}
    base = {name: b for name, (b, _, _) in paired.items() if b is not None}
    base_runs = sorted({run for _, run, _ in paired.values() if run})
    unpaired = [why for _, _, why in paired.values() if why]
    pretrained = (config.get("model") or {}).get("pretrained")
    lines = ["---", "library_name: transformers", "tags: [mlxlab, mlx]"]
    if pretrained:
        lines.append(f"base_model: {Path(pretrained).name}")
    lines += ["model-index:", f"- name: {name}", "  results:"]
    for task in scores.values():
        kind = "automatic-speech-recognition" if task.kind == TRANSCRIPTION else "text-generation"
        lines += [f"  - task: {{type: {kind}}}",
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
        lines += ["", f"Base model: {pretrained}, scored by `mlxlab eval` (MLflow run "
                  f"{', '.join(base_runs)}) on the same examples with the same prompts; the "
                  "difference is this model's score minus the base's (paired bootstrap "
                  "interval over the examples; McNemar's exact test for right/wrong scores, a "
                  "randomization test for a token-weighted loss or an error rate)."]
    if unpaired:
        lines += ["", "No base score is shown for " + "; ".join(unpaired) + "."]
    return "\n".join(lines) + "\n"


def _rows(task: SavedTask, base: SavedTask | None, with_base: bool) -> list[str]:
    bounds = intervals(task)
    paired: dict[str, Any] = {}
    if base is not None:  # like_base: same kind, prompts and example ids
        paired = {p.metric: p for p in pair_task(base, task)}
        if task.kind == PERPLEXITY:  # the shown loss is token-weighted: so is its difference
            paired["loss"] = pair_weighted_loss(base, task)
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


def bare_card(name: str, library: str = "transformers") -> str:
    """A card with the front matter and the title alone (a run that scored no task)."""
    return f"---\nlibrary_name: {library}\ntags: [mlxlab, mlx]\n---\n\n# {name}\n"


def unfinished_card(card: str | None, name: str, note: str) -> str:
    """The card with a warning under its title that the run had not finished (a card of that
    line alone when the run scored no task)."""
    warning = f"> **Unfinished run.** {note[0].upper()}{note[1:]}."
    if card is None:
        return f"{bare_card(name)}\n{warning}\n"
    head, title, rest = card.partition(f"\n# {name}\n")
    return f"{head}{title}\n{warning}\n{rest}"


def check_section(check: dict, dtype: str) -> str:
    """The card's "Export check" section: the check's record (export/proof.py) in words."""
    lines = ["", "## Export check", ""]
    if check["status"] != "checked":
        return "\n".join([*lines, f"Unchecked: {check['why']}.", ""])
    rows, tokens = len(check["probe"]), len(check["probe"][0])
    lines += [f"{check['checker']} loaded this export ({check['compute']}); its logits differ "
              "from mlxlab's forward of the fine-tune by at most (max |logit gap|) "
              f"{check['max_abs_logit_gap']:.3g} (allowed: {check['allowed_gap']:.3g}, "
              f"{check['tolerance']:g} of the logits' largest magnitude, "
              f"{check['logit_scale']:.3g}), on a {rows}x{tokens}-token probe, the weights as "
              f"written ({dtype}) computed in float32 on both sides.", "", "Probe token ids:",
              "", "```"]
    lines += [str(row) for row in check["probe"]]
    return "\n".join([*lines, "```", ""])
