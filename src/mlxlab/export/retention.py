"""How much of a fine-tune's gain an export keeps, measured where the export is made.

An export that changes the weights (a quantization, a narrower dtype, a GGUF quant) is read back
from the files it wrote (`read_folder`: mlx-lm's own loader, with `load_adapters` for an
adapters folder; `read_gguf`: the .gguf converted by mlxlab's GGUF reader, dequantized from what
was written) and scored on the run's own evaluation, example by example, beside the run itself
and the run's base:

- the run's validation rows: each row's next-token accuracy and loss over its scored tokens;
- the run's evaluation task files (eval.tasks), or the files `--tasks` names: each example's
  score (exact match, accuracy, ...), as `mlxlab eval` scores them.

The base is the run with its adapters switched off (a LoRA / DoRA run: models/adapters/lora.py
`adapters_off`, the same arrays), else the pretrained folder it started from. For each measure:

    kept = (export - base) / (run - base)

the share of the fine-tune's gain over the base that the export keeps, with a paired
percentile bootstrap interval over the examples; and the export against the run, paired
(McNemar's exact test on right/wrong scores, the paired randomization test on the others:
stats/paired.py). An export is refused when, on any measure, it is significantly worse than the
run (p < ALPHA) and keeps less than KEEP of the gain (a run with no base, or no gain on the
measure: when it is significantly worse). `--accept-loss` writes it anyway, the verdict
recorded. A text embedder's quantized GGUF is judged by the same pieces on its own measures
(embedder_retention.py: cosine to the source's vectors, a run's held-out queries).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlxlab.data.batching import Batch
from mlxlab.data.chat import chat_template
from mlxlab.evaluation.lm_eval.tasks import is_harness_entry
from mlxlab.evaluation.paired import is_binary
from mlxlab.evaluation.scoring import score_tasks
from mlxlab.evaluation.settings import TaskSettings
from mlxlab.evaluation.tasks import BINARY_SCORES, Task, read_tasks
from mlxlab.export.hf import ExportError
from mlxlab.models.adapters.lora import adapters_off, has_adapters
from mlxlab.models.base import Model
from mlxlab.objectives.losses import forward, token_cross_entropy
from mlxlab.stats import ALPHA, holm, mcnemar_exact, paired_bootstrap

log = logging.getLogger(__name__)

KEEP = 0.95           # the share of the gain below which a significant loss refuses the export
ROUNDS = 2000         # bootstrap resamples of the examples for kept's interval
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Column:
    """One measure's per-example scores, in the examples' order."""

    values: np.ndarray
    higher_is_better: bool = True
    binary: bool = False


Scores = dict[str, Column]


@dataclass(frozen=True)
class Scoring:
    """How a model is scored the way the run was: its validation batches, its task files and
    lm-eval tasks, and the tokenizer and chat template the tasks are prompted with."""

    batches: list[Batch]
    tasks: list[Task]
    settings: TaskSettings
    harness: list[str]        # lm-eval tasks (names or task YAMLs)
    tokenizer_folder: Path
    tokenizer: object
    template: object


@dataclass(frozen=True)
class Reference:
    """What an export is judged against: the run's and its base's scores on `scoring`, the
    run's logits on export/proof.py's probe (for a file read back later: a GGUF), and the run's
    checkpoint state (where the verdict is recorded)."""

    scoring: Scoring
    run: Scores
    base: Scores | None
    base_from: str            # "adapters off" | the pretrained folder | why there is none
    state: object
    probe: np.ndarray | None = None   # the run's logits on export/proof.py's probe ids
    ids: np.ndarray | None = None


@dataclass(frozen=True)
class Retention:
    """An export's request for retention: the task files to score beside the validation rows,
    and whether a significant loss is written anyway."""

    tasks: Sequence[str] = ()
    accept_loss: bool = False

    def check(self) -> None:
        """The tasks exist (files) and lm-eval knows them (names), before anything is loaded:
        one line naming the first that does not."""
        from mlxlab.evaluation.lm_eval.tasks import check_entries

        entries = [str(t) for t in self.tasks]
        read_tasks([e for e in entries if not is_harness_entry(e)])
        check_entries([e for e in entries if is_harness_entry(e)])


def validation_scores(model: Model, batches: Sequence[Batch]) -> Scores:
    """Each validation row's next-token accuracy and mean loss over its scored tokens (rows
    with none are left out: the same rows for every model scored on the same batches)."""
    model.eval()
    accuracy, loss = [], []
    for batch in batches:
        logits = forward(model, batch).astype(mx.float32)
        labels = batch["labels"]
        mask = batch.get("loss_mask")
        mask = mx.ones(labels.shape) if mask is None else mask.astype(mx.float32)
        hits = ((logits.argmax(-1) == labels).astype(mx.float32) * mask).sum(-1)
        nll = (token_cross_entropy(logits, labels) * mask).sum(-1)
        count = mask.sum(-1)
        mx.eval(hits, nll, count)
        keep = np.array(count) > 0
        accuracy.append(np.array(hits)[keep] / np.array(count)[keep])
        loss.append(np.array(nll)[keep] / np.array(count)[keep])
    return {"val/accuracy": Column(np.concatenate(accuracy)),
            "val/loss": Column(np.concatenate(loss), higher_is_better=False)}


# lm-eval's scores that are corpus aggregates, not means over documents (evaluation/lm_eval/corpus.py):
# not paired per example here
CORPUS_SCORES = ("word_perplexity", "byte_perplexity", "bits_per_byte", "bleu", "chrf", "ter")


def task_scores(model: Model, scoring: Scoring) -> Scores:
    """Each task's paired scores per example (`task/metric`), as `mlxlab eval` scores them
    (lm-eval's tasks through lm-eval, on mlxlab's lm-eval model)."""
    scored = score_tasks(model, scoring.tokenizer, scoring.tasks, scoring.settings,
                         scoring.template)
    if scoring.harness:
        from mlxlab.evaluation.lm_eval.model import MlxlabLM, hf_tokenizer
        from mlxlab.evaluation.lm_eval.scores import score_harness

        lm = MlxlabLM(model, hf_tokenizer(scoring.tokenizer_folder), scoring.settings.batch_size)
        scored += score_harness(lm, scoring.harness, scoring.settings.harness_options())[0]
    out: Scores = {}
    for scores in scored:
        for metric in scores.metrics:
            if metric in CORPUS_SCORES:
                continue
            column = np.array([float(row[metric]) for row in scores.rows if metric in row])
            if len(column) != len(scores.rows) or not len(column):
                continue
            out[f"{scores.task}/{metric}"] = Column(
                column, scores.higher_is_better.get(metric, True),
                binary=metric in BINARY_SCORES or is_binary(column))
    return out


def score(model: Model, scoring: Scoring) -> Scores:
    return {**validation_scores(model, scoring.batches), **task_scores(model, scoring)}


def build_reference(model: Model, state, tokenizer_path: Path, batches: list[Batch],
                    request: Retention, probe: bool = False) -> Reference:
    """The run's scores and its base's, before the export touches the model; with `probe`, the
    run's logits on the probe too (a file read back after this folder: its logits against
    these)."""
    from tokenizers import Tokenizer

    settings = _settings(state.config.get("eval") or {})
    entries = [str(t) for t in request.tasks] or list(settings.tasks)
    files = [e for e in entries if not is_harness_entry(e)]
    scoring = Scoring(batches, read_tasks(files) if files else [], settings,
                      [e for e in entries if is_harness_entry(e)], tokenizer_path.parent,
                      Tokenizer.from_file(str(tokenizer_path)),
                      chat_template(tokenizer_path.parent, settings.chat))
    run = score(model, scoring)
    ids = logits = None
    if probe:
        from mlxlab.export.proof import mlxlab_logits, probe_ids

        ids = probe_ids(_vocab_size(model))
        logits = mlxlab_logits(model, ids)
    base, base_from = _base(model, state, scoring, run)
    return Reference(scoring, run, base, base_from, state, logits, ids)


def _base(model: Model, state, scoring: Scoring, run: Scores) -> tuple[Scores | None, str]:
    """The base's scores and what it is: the run with its adapters off, the pretrained folder
    it started from, or (trained from scratch) a uniform guess."""
    pretrained = (state.config.get("model") or {}).get("pretrained")
    if has_adapters(model):
        with adapters_off(model):
            return score(model, scoring), "the run with its adapters off"
    if pretrained and (state.data or {}).get("vocab_map"):
        # the rows are on the small model's ids, which its pretrained base does not speak
        return None, ("none: a vocab-remapped run's pretrained base speaks the full "
                      "vocabulary's ids, not the small model's")
    if pretrained:
        return _pretrained_base(state, scoring)
    return _chance(run, _vocab_size(model)), (
        "trained from scratch: a uniform next-token guess (accuracy 1/V, loss ln V; "
        "right/wrong task scores 0)")


def _vocab_size(model: Model) -> int:
    return int(model.architecture["vocab_size"])


def _chance(run: Scores, vocab_size: int) -> Scores:
    """The scores of a model that has learnt nothing, the base of a run trained from scratch."""
    values = {"val/accuracy": 1.0 / vocab_size, "val/loss": float(np.log(vocab_size))}
    out: Scores = {}
    for name, column in run.items():
        value = values.get(name, 0.0 if column.binary else None)
        if value is not None:
            out[name] = Column(np.full_like(column.values, value), column.higher_is_better,
                               column.binary)
    return out


def _settings(saved: dict) -> TaskSettings:
    fields = TaskSettings.__dataclass_fields__
    return TaskSettings(**{k: tuple(v) if isinstance(v, list) else v
                           for k, v in saved.items() if k in fields})


def _pretrained_base(state, scoring: Scoring) -> tuple[Scores | None, str]:
    """A full fine-tune's base: the pretrained folder it started from, where it is at hand."""
    pretrained = state.config["model"]["pretrained"]
    try:
        from mlxlab.models.pretrained import pretrained_model
        from mlxlab.models.sources import model_folder

        folder = model_folder(str(pretrained))
        base = pretrained_model(folder)
    except Exception as err:  # noqa: BLE001 - no base is a reported gap, not a failed export
        return None, f"none: {pretrained} did not load ({type(err).__name__}: {err})"[:200]
    scores = score(base, scoring)
    del base
    return scores, str(folder)


def read_folder(folder: Path, adapters: Path | None = None) -> Model:
    """The written folder as mlx-lm loads it (its adapters folder through mlx-lm's own
    load_adapters, as `mlx_lm.generate --adapter-path` does)."""
    from mlxlab.models.decoders.mlx_lm_decoder import MLXLMDecoder

    model = MLXLMDecoder(vocab_size=1, pretrained=str(folder))
    if adapters is not None:
        from mlx_lm.tuner.utils import load_adapters

        model.lm = load_adapters(model.lm, str(adapters))
    model.eval()
    return model


def read_gguf(path: Path, work: Path) -> Model:
    """The written .gguf converted into `work` by mlxlab's GGUF reader (Q4_0 / Q4_1 / Q8_0 bit
    for bit, other types dequantized from the file) and loaded."""
    from mlxlab.models.sources.gguf import convert_into

    work.mkdir(parents=True, exist_ok=True)
    convert_into(path, work)
    return read_folder(work)


@dataclass(frozen=True)
class Kept:
    """One measure of the export beside the run and the base."""

    measure: str
    n: int
    run: float
    export: float
    base: float | None
    kept: float | None        # the share of the run's gain over the base the export keeps
    kept_low: float | None
    kept_high: float | None
    diff: float               # export - run
    p: float                  # export against the run, paired
    test: str
    lost: bool                # significantly worse than the run and below KEEP of the gain
    higher_is_better: bool = True
    p_holm: float | None = None  # p adjusted over every measure of the export (Holm)

    def significant(self) -> bool:
        """p below ALPHA, Holm-adjusted over the export's measures where they are judged
        together."""
        return (self.p if self.p_holm is None else self.p_holm) < ALPHA

    def line(self) -> str:
        """`val/accuracy: kept 38 % of the gain over the base [24 %, 52 %]; ...`"""
        test = f"{self.test} p={self.p:.3g}" + (
            f", Holm-adjusted {self.p_holm:.3g}" if self.p_holm is not None else "")
        worse = "significantly worse than the run" if self.significant() and self._worse() else (
            "no loss detected against the run")
        scores = f"run {self.run:.4f}, export {self.export:.4f}" + (
            f", base {self.base:.4f}" if self.base is not None else "")
        if self.kept is None:
            return f"{self.measure}: {scores}; {worse} ({test}, {self.n} examples)"
        return (f"{self.measure}: kept {100 * self.kept:.0f} % of the gain over the base "
                f"[{100 * self.kept_low:.0f} %, {100 * self.kept_high:.0f} %] ({scores}); "
                f"{worse} ({test}, {self.n} examples)")

    def _worse(self) -> bool:
        return self.diff < 0 if self.higher_is_better else self.diff > 0


def judge(reference: Reference, exported: Scores) -> list[Kept]:
    """Every measure of the export against the run and the base."""
    return judge_scores(reference.run, reference.base, exported)


def judge_scores(run: Scores, base: Scores | None, exported: Scores) -> list[Kept]:
    """Every measure the run and the export both have, the export against the run and `base`
    (any model's per-example scores: a decoder's here, an embedder's retrieval queries in
    embedder_retention.py). Every measure is a test at ALPHA of the same export, so the p-values
    are Holm-adjusted over them (stats.holm) before a loss is called."""
    out = []
    for name, column in run.items():
        if name in exported:
            out.append(_kept(name, column, exported[name], base.get(name) if base else None))
    adjusted = holm([k.p for k in out])
    return [_lost_after(replace(k, p_holm=float(p))) for k, p in zip(out, adjusted, strict=True)]


def _lost_after(kept: Kept) -> Kept:
    """The measure's verdict on its adjusted p: significantly worse than the run and below
    KEEP of the gain (or no gain to share)."""
    lost = kept.significant() and kept._worse() and (kept.kept is None or kept.kept < KEEP)
    return replace(kept, lost=bool(lost))


def _kept(name: str, run: Column, export: Column, base: Column | None) -> Kept:
    r, e = run.values, export.values
    sign = 1.0 if run.higher_is_better else -1.0
    if run.binary:
        only_run, only_export, p = mcnemar_exact(r > 0.5, e > 0.5)
        test = f"McNemar exact ({only_run} only the run right, {only_export} only the export)"
    else:
        _, _, _, p = paired_bootstrap(r, e)
        test = "paired randomization"
    diff = float(e.mean() - r.mean())
    worse = sign * diff < 0 and p < ALPHA
    kept = low = high = None
    b = base.values if base is not None else None
    if b is not None and sign * (r.mean() - b.mean()) > 0:
        kept = float((e.mean() - b.mean()) / (r.mean() - b.mean()))
        low, high = _kept_interval(r, e, b, sign)
    lost = worse and (kept is None or kept < KEEP)
    return Kept(name, len(r), float(r.mean()), float(e.mean()),
                None if b is None else float(b.mean()), kept, low, high, diff, float(p), test,
                bool(lost), run.higher_is_better)


def _kept_interval(r: np.ndarray, e: np.ndarray, b: np.ndarray, sign: float = 1.0,
                   seed: int = 0) -> tuple[float, float]:
    """The paired percentile bootstrap interval of kept over the examples. Resamples where the
    run shows no gain over the base (none, or the run worse than the base: `sign` is +1 where
    higher is better, -1 where lower is) are left out: there kept has no meaning, and a negative
    gain would flip the ratio's sign."""
    picks = np.random.default_rng(seed).integers(0, len(r), size=(ROUNDS, len(r)))
    gain = r[picks].mean(1) - b[picks].mean(1)
    ok = sign * gain > 1e-12
    ratio = (e[picks].mean(1) - b[picks].mean(1))[ok] / gain[ok]
    if not len(ratio):
        return float("nan"), float("nan")
    low, high = np.quantile(ratio, [(1 - CONFIDENCE) / 2, (1 + CONFIDENCE) / 2])
    return float(low), float(high)


def report(reference: Reference, kept: list[Kept], written: str, accepted: bool) -> dict:
    """export_report.json's "retention" entry."""
    return entry_of([measure(k) for k in kept], written, accepted, reference.base_from,
                    [str(t.path) for t in reference.scoring.tasks] + reference.scoring.harness)


def measure(kept: Kept) -> dict:
    """One measure as the entry lists it: its fields and its line."""
    return asdict(kept) | {"line": kept.line()}


def entry_of(measures: list[dict], written: str, accepted: bool, base_from: str,
             tasks: list[str]) -> dict:
    """The "retention" entry of `measures` (each with its "measure", "line" and whether it
    "lost"): the export is lost when any measure is."""
    lost = [m["measure"] for m in measures if m["lost"]]
    return {"read_back": written, "base": base_from, "keep": KEEP, "alpha": ALPHA,
            "measures": measures, "lost": lost, "verdict": "lost" if lost else "kept",
            "accepted_loss": bool(lost and accepted), "tasks": tasks}


def judge_export(reference: Reference, accept_loss: bool, exported: Model, written: str,
                 instead: str) -> dict:
    """The written model (read back) scored and judged against `reference`: the report entry,
    or an ExportError naming the loss and `instead` (what keeps the gain) unless
    `accept_loss`."""
    kept = judge(reference, score(exported, reference.scoring))
    return gate(report(reference, kept, written, accept_loss), accept_loss, instead)


def gate(entry: dict, accept_loss: bool, instead: str, what: str = "the fine-tune's gain"
         ) -> dict:
    """The entry, its lines logged; an ExportError (refusal) where it lost `what` and the loss
    is not accepted."""
    for m in entry["measures"]:
        log.info("retention: %s", m["line"])
    if entry["lost"] and not accept_loss:
        raise ExportError(refusal(entry, instead, what))
    return entry


def refusal(entry: dict, instead: str, what: str = "the fine-tune's gain") -> str:
    """The one line that refuses an export that lost `what`."""
    first = next(m for m in entry["measures"] if m["lost"])
    return (f"refused: the written file loses {what}: {first['line']}; "
            f"{instead}; --accept-loss writes it anyway")


def record(state, label: str, entry: dict) -> str | None:
    """The retention on the run's MLflow run: metrics export/<label>/<measure>/kept (and the
    export's score) at the checkpoint's step, and the entry as exports/<label>/retention.json.
    Returns why it was not recorded, or None."""
    run_id = state.run_id
    uri = (state.config.get("tracking") or {}).get("uri")
    if not run_id or not uri:
        return "the run has no MLflow run (tracking=none or csv)"
    try:
        from mlflow import MlflowClient

        from mlxlab.tracking.mlflow import resolve_uri

        client = MlflowClient(tracking_uri=resolve_uri(uri))
        key = "".join(c if c.isalnum() or c in "_-./ " else "_" for c in label)
        for m in entry["measures"]:
            if m["kept"] is not None:
                client.log_metric(run_id, f"export/{key}/{m['measure']}/kept", m["kept"],
                                  step=int(state.step))
            client.log_metric(run_id, f"export/{key}/{m['measure']}", m["export"],
                              step=int(state.step))
        client.log_text(run_id, json.dumps(entry, indent=2) + "\n",
                        f"exports/{key}/retention.json")
    except Exception as err:  # noqa: BLE001 - the export stands; the note says why
        return f"not recorded in MLflow ({type(err).__name__}: {str(err)[:120]})"
    return None
