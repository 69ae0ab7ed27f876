"""Verdicts right at the edges. Intervals of task accuracies inside [0, 1] (scipy's Wilson
interval), a metric's direction from its definition (never its name), `runs compare --metric`
leaving the sweep's recorded verdict alone, a verdict at n = 2 that says first that the tests cannot
reach the level, ties that stay ties, and a model card that pairs like with like. The sweeps here
are real MLflow stores written with MLflow's client (a parent run and its children as the sweep
callback tags them); the trainings behind such numbers are tested in test_replicates.py."""

from __future__ import annotations

import json
import math

import pytest
import scipy.stats as st

from mlxlab.evaluation.results import SavedTask, intervals


def mc_task(right: int, n: int, name: str = "mc", prompts: str = "plain",
            first_id: int = 0) -> SavedTask:
    rows = [{"id": str(first_id + i), "acc": float(i < right), "acc_norm": float(i < right)}
            for i in range(n)]
    return SavedTask(name, "multiple_choice", {"acc": right / n, "acc_norm": right / n}, rows,
                     prompts)


@pytest.mark.parametrize(("right", "n"), [(0, 10), (3, 40), (40, 40)])
def test_a_task_accuracys_interval_is_scipys_wilson_interval(right, n):
    """`mlxlab eval` and the model card print intervals(task): 3/40 gave [-0.010, 0.160] and 0/10
    gave [0, 0] (a normal approximation); now scipy's Wilson interval."""
    value, low, high = intervals(mc_task(right, n))["acc"]
    ci = st.binomtest(right, n).proportion_ci(0.95, method="wilson")
    assert value == right / n
    assert (low, high) == (pytest.approx(ci.low, abs=1e-12), pytest.approx(ci.high, abs=1e-12))
    assert 0 <= low < high <= 1


# --- sweeps in a real MLflow store ------------------------------------------------------------


@pytest.fixture(scope="module")
def uri(tmp_path_factory) -> str:
    """One sqlite store for the module (building its tables takes seconds); a sweep each."""
    return f"sqlite:///{tmp_path_factory.mktemp('store')}/mlflow.db"


def write_sweep(uri: str, key: str, values: dict[str, dict[int, dict[str, float]]],
                optimized: str, mode: str) -> str:
    """A sweep's parent run and one FINISHED child per (value of `key`, seed) with the given
    best/<metric> values, tagged as the sweep callback tags them; the parent's run id."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    from mlxlab.tracking import tags as T

    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment(f"sweep-{len(client.search_experiments())}")
    parent = client.create_run(exp, tags={T.ROLE: "sweep", T.OPTIMIZED_METRIC: optimized,
                                          T.OPTIMIZED_MODE: mode,
                                          T.SWEEP_PARAMS: json.dumps([key])}).info.run_id
    for value, seeds in values.items():
        for seed, metrics in seeds.items():
            run = client.create_run(exp, tags={T.PARENT_RUN: parent}).info.run_id
            client.log_batch(run, metrics=[Metric(f"best/{k}", v, 0, 1) for k, v in metrics.items()]
                             + [Metric(k, v, 0, 1) for k, v in metrics.items()],
                             params=[Param("seed", str(seed)), Param(key, value)],
                             tags=[RunTag(T.ROLE, "train")])
            client.set_terminated(run, "FINISHED")
    client.set_terminated(parent, "FINISHED")
    return parent


def compare(capsys, uri: str, sweep: str, *args: str) -> tuple[int, str, str]:
    """`mlxlab runs compare SWEEP ARGS`: exit code, stdout, stderr's last line."""
    from mlxlab.cli.runs_compare import main

    code = main([sweep, "--uri", uri, *args])
    out = capsys.readouterr()
    return code, out.out, (out.err.strip().splitlines() or [""])[-1]


@pytest.fixture
def dpo_sweep(uri):
    """Two betas x 6 seeds of a DPO sweep: val/rewards/accuracy (its optimized metric) about
    equal, val/logps/rejected clearly lower (better: the rejected replies lost probability)
    under beta=0.5."""
    rejected = {"0.1": [-40.0, -41.0, -42.5, -40.5, -41.5, -39.0],
                "0.5": [-50.0, -51.5, -52.0, -49.0, -50.5, -48.5]}
    accuracy = {"0.1": [0.80, 0.85, 0.90, 0.85, 0.80, 0.90],
                "0.5": [0.85, 0.80, 0.90, 0.80, 0.85, 0.85]}
    parent = write_sweep(uri, "objective.beta", {
        beta: {42 + i: {"val/rewards/accuracy": accuracy[beta][i],
                        "val/logps/rejected": rejected[beta][i]} for i in range(6)}
        for beta in ("0.1", "0.5")}, "val/rewards/accuracy", "max")
    return parent


def test_a_lower_is_better_metric_gets_the_right_verdict_and_leaves_the_recorded_one(
        uri, dpo_sweep, capsys):
    """`--metric val/logps/rejected` is lower-is-better though its name has no "loss" (its
    definition says so), and the comparison leaves the sweep's recorded verdict on its own metric
    as it was (--record replaces it)."""
    from mlflow import MlflowClient

    parent = dpo_sweep
    client = MlflowClient(tracking_uri=uri)
    code, out, _ = compare(capsys, uri, parent)  # the sweep's own metric: recorded on the parent
    assert code == 0 and "recorded on parent run" in out
    recorded = client.get_run(parent).data.tags
    assert recorded["mlxlab.verdict.metric"] == "val/rewards/accuracy (best)"

    code, out, _ = compare(capsys, uri, parent, "--metric", "val/logps/rejected")
    assert code == 0 and "lower is better" in out, out
    assert "g2 (objective.beta=0.5) beats g1" in out, out
    assert "left as it is: --record replaces it" in out
    assert client.get_run(parent).data.tags == recorded  # the sweep's verdict untouched

    code, out, _ = compare(capsys, uri, parent, "--metric", "val/logps/rejected", "--mode", "max")
    assert "higher is better" in out and "g1 (objective.beta=0.1) beats g2" in out

    code, out, _ = compare(capsys, uri, parent, "--metric", "val/logps/rejected", "--record")
    now = client.get_run(parent).data.tags
    assert now["mlxlab.verdict.metric"] == "val/logps/rejected (best)"
    assert now["mlxlab.verdict"] == "g2 better than g1"


def test_a_metric_mlxlab_does_not_define_needs_its_mode(uri, capsys):
    parent = write_sweep(uri, "lr", {v: {s: {"val/accuracy": 0.5 + s / 1000, "val/custom_error": s / 100}
                                for s in (1, 2)} for v in ("1", "2")}, "val/accuracy", "max")
    code, _, err = compare(capsys, uri, parent, "--metric", "val/custom_error")
    assert code == 2 and err.startswith("mlxlab runs compare: error: ")
    assert "which way val/custom_error improves is not known" in err and "--mode min|max" in err
    code, out, _ = compare(capsys, uri, parent, "--metric", "val/custom_error", "--mode", "min")
    assert code == 0 and "lower is better" in out


def test_a_verdict_at_two_seeds_says_first_that_the_tests_cannot_reach_the_level(uri, capsys):
    """3 configs x 2 seeds: the paired t test (one degree of freedom) gives p < 0.05 after Holm,
    but the signed-rank test's smallest p at n = 2 is 0.5. The verdict says that first, calls
    no config better, and the seeds needed are those at which both tests can (6 and up),
    never the 2 already run."""
    from mlflow import MlflowClient

    from mlxlab import stats

    acc = {"a": [0.800, 0.810], "b": [0.960, 0.9705], "c": [0.801, 0.812]}
    parent = write_sweep(uri, "model.pooler", {
        v: {42 + i: {"val/accuracy": acc[v][i]} for i in range(2)} for v in acc},
        "val/accuracy", "max")
    code, out, _ = compare(capsys, uri, parent, "--json")
    result = json.loads(out)
    assert min(c["t_p_holm"] for c in result["comparisons"]) < 0.05  # t alone would call it
    for c in result["comparisons"]:
        assert c["verdict"].startswith("too few seeds to settle it: at 2 seed pairs the "
                                       "Wilcoxon signed-rank test's smallest p is 0.5"), c
        assert "beats" not in c["verdict"]
        assert c["seeds_needed"] is None or c["seeds_needed"] >= 6
    assert stats.smallest_signed_rank_p(6) < 0.05 <= stats.smallest_signed_rank_p(5)
    # b's Student-t bound over 2 seeds would be 1.032: cut to 1 and said, never printed
    (b,) = [g for g in result["groups"] if g["config"] == "model.pooler=b"]
    assert b["ci_high"] == 1.0 and b["ci_cut"] is True
    tags = MlflowClient(tracking_uri=uri).get_run(parent).data.tags
    assert tags["mlxlab.verdict"] == "too few replicates"
    note = tags["mlflow.note.content"]
    assert "1.0000] (95% Student-t CI cut to [0, 1], n=2)" in note and "1.03" not in note
    assert note.split("\n")[2].startswith("too few seeds to settle it"), note
    assert "seeds needed: 2 " not in note


def test_two_configs_with_equal_means_tie_and_none_is_the_leader(uri, capsys):
    """Equal means (0.8052 and 0.8052) made one of them "(leader)" by the order of a sort."""
    from mlflow import MlflowClient

    acc = {"a": [0.8000, 0.8104, 0.8052], "b": [0.8104, 0.8000, 0.8052]}
    parent = write_sweep(uri, "model.pooler", {
        v: {42 + i: {"val/accuracy": acc[v][i]} for i in range(3)} for v in acc},
        "val/accuracy", "max")
    code, out, _ = compare(capsys, uri, parent)
    assert code == 0 and "leader g1" not in out and "leader g2" not in out, out
    tags = MlflowClient(tracking_uri=uri).get_run(parent).data.tags
    assert "(leader)" not in tags["mlflow.note.content"]
    assert tags["mlxlab.leader"].startswith("none: g1 and g2 tie at val/accuracy 0.8052"), tags
    assert "g1 (tied)" in tags["mlflow.note.content"] or "| g1 (tied)" in tags[
        "mlflow.note.content"]


# --- the model card: like with like -----------------------------------------------------------


def log_base_eval(uri: str, model: str, task: SavedTask) -> str:
    """An `mlxlab eval` run of the base model as runs/named_model.py logs it: tags and the
    eval_tasks/ folder; its run id."""
    import tempfile
    from pathlib import Path

    from mlflow import MlflowClient

    from mlxlab.evaluation.results import write_scores
    from mlxlab.evaluation.scoring import TaskScores
    from mlxlab.tracking import tags as T

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("evals") or client.create_experiment("evals")
    exp = exp if isinstance(exp, str) else exp.experiment_id
    run = client.create_run(exp, tags={T.ROLE: "eval", T.EVAL_MODEL: model}).info.run_id
    with tempfile.TemporaryDirectory() as tmp:
        write_scores([TaskScores(task.task, task.kind, task.metrics, task.rows, task.prompts)],
                     Path(tmp))
        client.log_artifacts(run, tmp, "eval_tasks")
    client.set_terminated(run, "FINISHED")
    return run


def card_row(card: str, task: str, metric: str) -> list[str]:
    row = next(line for line in card.splitlines() if line.startswith(f"| {task} | {metric} |"))
    return [c.strip() for c in row.strip("|").split("|")]


def test_the_model_card_pairs_evaluations_of_the_same_prompts_and_examples(uri, tmp_path):
    """The card sets beside the fine-tune the base evaluation that scored the same task, prompts
    and example ids, not the newest whatever its prompt mode (a plain 0.575 beside the
    fine-tune's 0.65 scored through the template, where the template's base is 0.300)."""
    from mlxlab.evaluation.results import write_scores
    from mlxlab.evaluation.scoring import TaskScores
    from mlxlab.export.model_card import model_card

    base = tmp_path / "base-model"
    base.mkdir()
    like = log_base_eval(uri, str(base.resolve()), mc_task(12, 40, prompts="chat template"))
    unlike = log_base_eval(uri, str(base.resolve()), mc_task(23, 40, prompts="plain"))
    run_dir = tmp_path / "run"
    mine = mc_task(26, 40, prompts="chat template")
    write_scores([TaskScores(mine.task, mine.kind, mine.metrics, mine.rows, mine.prompts)],
                 run_dir / "eval_tasks" / "best")
    config = {"model": {"pretrained": str(base)}, "tracking": {"uri": uri}}
    card = model_card(run_dir, "tuned", config, "r1", 600)
    cells = card_row(card, "mc", "acc")
    assert (float(cells[3]), float(cells[5])) == (0.65, 0.3), card
    assert float(cells[6].split()[0]) == pytest.approx(0.65 - 0.3)  # score - base as shown
    assert like in card and unlike not in card

    other = mc_task(26, 40, prompts="chat template", first_id=100)  # other example ids
    write_scores([TaskScores(other.task, other.kind, other.metrics, other.rows, other.prompts)],
                 run_dir / "eval_tasks" / "best")
    card = model_card(run_dir, "tuned", config, "r1", 600)
    assert "0.3000" not in card and "0.5750" not in card
    assert "mc: no evaluation of the base model scored the same examples with chat template " \
           "prompts" in card, card


def test_the_cards_loss_difference_is_the_difference_of_the_token_weighted_losses(uri, tmp_path):
    """A perplexity task's loss is token-weighted; the card's difference was the mean of the
    per-text differences (+0.1233 beside scores that differ by +0.1240)."""
    from mlxlab.evaluation.results import write_scores
    from mlxlab.evaluation.scoring import TaskScores
    from mlxlab.export.model_card import model_card

    def ppl(nlls: list[float], tokens: list[int]) -> TaskScores:
        rows = [{"id": str(i), "nll": n, "tokens": t, "bytes": 4 * t, "loss": n / t}
                for i, (n, t) in enumerate(zip(nlls, tokens))]
        loss = sum(nlls) / sum(tokens)
        return TaskScores("text", "perplexity", {"loss": loss, "perplexity": math.exp(loss),
                                                 "bits_per_byte": loss / 4 / math.log(2)},
                          rows, "plain")

    tokens = [5, 40, 12, 3, 30, 8]
    base_scores = ppl([15.0, 100.0, 30.0, 12.0, 66.0, 20.0], tokens)
    mine = ppl([16.0, 104.0, 33.0, 9.0, 70.0, 22.0], tokens)
    base = tmp_path / "base-model"
    base.mkdir()
    log_base_eval(uri, str(base.resolve()), SavedTask(
        "text", "perplexity", base_scores.metrics, base_scores.rows, "plain"))
    write_scores([mine], tmp_path / "run" / "eval_tasks" / "best")
    card = model_card(tmp_path / "run", "tuned", {"model": {"pretrained": str(base)},
                                                  "tracking": {"uri": uri}}, "r1", 10)
    cells = card_row(card, "text", "loss")
    shown = float(cells[6].split()[0])
    assert shown == pytest.approx(mine.metrics["loss"] - base_scores.metrics["loss"], abs=1e-4)
    low, high = (float(x) for x in cells[6].split("[")[1].rstrip("]").split(","))
    assert low <= shown <= high


# --- a metric's definition: the objectives' own ------------------------------------------------


def test_a_logged_metrics_definition_is_the_objective_that_computes_it():
    """The direction and range come from the objectives' metric definitions (and the evaluation
    tasks'), never from the name: no table of their own in config.py."""
    from mlxlab.objectives.catalog import metric_definition
    from mlxlab.objectives.preference.preference import Preference

    rejected = metric_definition("best/val/logps/rejected")
    assert (rejected.mode, rejected.high) == ("min", 0.0)
    assert metric_definition("val/rewards/accuracy").bounds == (0.0, 1.0)
    assert metric_definition("val_q4/loss").mode == "min"
    assert metric_definition("eval/mc/acc").bounds == (0.0, 1.0)
    assert metric_definition("eval/text/perplexity").low == 1.0
    assert metric_definition("val/reward").mode == "max"  # GRPO's
    assert metric_definition("val/custom_error") is None
    # one class, two losses: ORPO's own metrics are reported by ORPO only
    from omegaconf import OmegaConf

    from mlxlab.errors import ConfigError

    def monitoring(loss: str):
        return OmegaConf.create({"optimized_metric": "val/nll_loss", "objective": {"loss": loss}})

    Preference.check_config(monitoring("orpo"), "preference")
    with pytest.raises(ConfigError, match=r"by objective Preference\(loss=sigmoid\)"):
        Preference.check_config(monitoring("sigmoid"), "preference")
    assert Preference.metrics("preference").tie() == ("val/loss", "min")


def test_a_tie_on_the_monitor_goes_to_the_better_tie_break_or_else_the_later_step():
    from mlxlab.checkpoint import choose_best

    best = {"val/rewards/accuracy": 1.0, "val/loss": 0.27, "best_step": 50.0}
    loss = ("val/loss", "min")
    lower = choose_best({"val/rewards/accuracy": 1.0, "val/loss": 0.14}, best,
                        "val/rewards/accuracy", "max", 600, loss)
    assert lower.better and "the lower val/loss (0.14 vs 0.27)" in lower.tie
    higher = choose_best({"val/rewards/accuracy": 1.0, "val/loss": 0.30}, best,
                         "val/rewards/accuracy", "max", 600, loss)
    assert not higher.better and "stays at step 50" in higher.tie
    # no tie-break metric (GRPO reports no loss): the later evaluation
    later = choose_best({"val/rewards/accuracy": 1.0}, best, "val/rewards/accuracy", "max", 600)
    assert later.better and "the later is kept" in later.tie
    assert not choose_best({"val/rewards/accuracy": 0.9, "val/loss": 0.1}, best,
                           "val/rewards/accuracy", "max", 600, loss).better
