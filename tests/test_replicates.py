"""Replicates end to end: a real grid of tiny trainings on 3 seeds per config, the parent run's
group summary checked against scipy on the children's own values, `mlxlab runs list --sweep`,
and `mlxlab runs compare` (paired t, Wilcoxon, McNemar per seed, the verdict) against scipy."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import scipy.stats as st

from conftest import PYTHON
from test_sweeps import TINY, client_for, mlxlab_train, run, sweep_parents, training_runs

# a grid of 6 trainings (~20 s before the first test): the slow run; replicated sweeps and
# their verdicts stay in the default run through test_stats, test_verdict_edges,
# test_search_faults, test_sweep_faults and test_eval_tasks
pytestmark = pytest.mark.slow

GRID = [*TINY, "trainer.max_steps=12", "trainer.eval_every_steps=4", "tracking.background=false"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("replicates")
    mlxlab_train(root, "-m", *GRID, "replicates=3", "model.pooler=null,true")
    client = client_for(f"sqlite:///{root}/mlruns/mlflow.db")
    (parent,) = sweep_parents(client, "train")
    children = training_runs(client, "train")
    return root, client, client.get_run(parent.info.run_id), children


def values(children, pooler: str, key: str) -> dict[str, float]:
    return {r.data.params["seed"]: r.data.metrics[key] for r in children
            if r.data.params["model.pooler"] == pooler}


def test_replicates_share_validation_rows_and_form_groups(sweep):
    _, _, parent, children = sweep
    assert sorted(r.data.params["seed"] for r in children) == ["42", "42", "43", "43", "44", "44"]
    assert len({r.data.tags["mlxlab.val_fingerprint"] for r in children}) == 1  # split_seed
    assert parent.data.tags["group.g1"] == "model.pooler=None"
    assert parent.data.tags["group.g2"] == "model.pooler=True"


def test_the_parent_run_holds_each_groups_interval(sweep):
    _, client, parent, children = sweep
    m = parent.data.metrics
    for gid, pooler in (("g1", "None"), ("g2", "True")):
        for which, key in (("best", "best/val/loss"), ("last", "val/loss")):
            x = np.array(list(values(children, pooler, key).values()))
            low, high = st.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=st.sem(x))
            prefix = f"{gid}/{which}/val/loss"
            assert m[f"{prefix}/n"] == 3
            assert m[f"{prefix}/mean"] == pytest.approx(x.mean())
            assert m[f"{prefix}/std"] == pytest.approx(x.std(ddof=1))
            assert (m[f"{prefix}/ci_low"], m[f"{prefix}/ci_high"]) == (
                pytest.approx(low), pytest.approx(high))
    # per-step bands of the validation curve, as ordinary metrics MLflow charts draw
    band = client.get_metric_history(parent.info.run_id, "g1/val/loss/mean")
    assert [p.step for p in band] == [4, 8, 12]
    at8 = [client.get_metric_history(r.info.run_id, "val/loss") for r in children
           if r.data.params["model.pooler"] == "None"]
    assert band[1].value == pytest.approx(np.mean([[p.value for p in h if p.step == 8][0]
                                                    for h in at8]))
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "replicates")}
    assert artifacts == {"replicates/groups.csv", "replicates/groups.md"}
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {"plots/replicates_val_accuracy.png", "plots/bands_val_accuracy.png"} <= plots


def test_each_child_says_its_group_and_its_configs_seed_count(sweep):
    _, _, _, children = sweep
    for r in children:
        assert r.data.tags["mlxlab.group"] == {"None": "g1", "True": "g2"}[
            r.data.params["model.pooler"]]
        assert r.data.params["replicates"] == "3"  # the sweep's, not 1


def test_the_parent_run_holds_the_verdict_and_names_no_bare_winner(sweep):
    """The parent's description (MLflow's Overview), tags and comparison.json say
    what the paired test says, with scipy's numbers on the children's own values."""
    _, client, parent, children = sweep
    tags, params = parent.data.tags, parent.data.params
    assert "mlxlab.best_group" not in tags and not any(k.startswith("best.") for k in params)
    assert "best/val/accuracy" not in parent.data.metrics
    a, b = (values(children, p, "best/val/accuracy") for p in ("None", "True"))
    seeds = sorted(a)
    xa, xb = np.array([a[s] for s in seeds]), np.array([b[s] for s in seeds])
    leader, other = ("g1", xa), ("g2", xb)
    if xb.mean() > xa.mean():
        leader, other = ("g2", xb), ("g1", xa)
    differ = np.ptp(other[1] - leader[1]) > 0
    p = st.ttest_rel(other[1], leader[1]).pvalue if differ else None

    path = client.download_artifacts(parent.info.run_id, "comparison.json", str(
        Path(tempfile.mkdtemp())))
    result = json.loads(Path(path).read_text())
    tie = xa.mean() == pytest.approx(xb.mean(), rel=1e-9)  # a tie names no leader
    assert result["metric"] == "val/accuracy" and result["baseline"] == leader[0]
    assert result["leader"] == (None if tie else leader[0])
    (c,) = result["comparisons"]
    assert (c["a"], c["b"], c["n_pairs"]) == (leader[0], other[0], 3)
    assert c["diff"] == pytest.approx((other[1] - leader[1]).mean())
    if differ:
        assert c["t_p"] == pytest.approx(p)
    # 3 seed pairs: too few for the exact signed-rank test to reach 0.05, whatever t says
    assert tags["mlxlab.verdict"] == "too few replicates"
    assert c["verdict"].startswith("too few seeds to settle it: at 3 seed pairs")
    if tie:
        assert tags["mlxlab.leader"].startswith("none: g1 and g2 tie at val/accuracy")
    else:
        assert tags["mlxlab.leader"].startswith(f"{leader[0]} (not significant): val/accuracy")
        assert "n=3)" in tags["mlxlab.leader"]
    note = tags["mlflow.note.content"]  # the markdown MLflow shows on the run's Overview
    assert note.startswith(f"### Verdict on val/accuracy: {tags['mlxlab.verdict']}")
    for g in result["groups"]:
        assert f"| {g['group']}" in note and g["n"] == 3
    assert "paired t test: p = " in note and "Wilcoxon signed-rank (" in note
    assert "McNemar (exact binomial), seed 42" in note  # accuracy: the per-row tests too
    assert c["rows"]["rows"] == 178


def test_runs_list_prints_the_grouped_table(sweep, capsys, monkeypatch):
    """`mlxlab runs list --sweep latest` in the sweep's root, run in this process (the
    command's own entry point; a process would add only its start-up)."""
    from mlxlab.cli.main import main

    root, *_ = sweep
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLXLAB_ROOT", str(root))
    assert main(["runs", "list", "--sweep", "latest"]) == 0
    out = capsys.readouterr().out
    assert "configs (groups of seeds)" in out
    assert "g1     model.pooler=None" in out and "(95% CI, n=3)" in out


@pytest.mark.slow
def test_runs_compare_matches_scipy_and_tests_row_by_row(sweep):
    root, client, _, children = sweep
    out = run([PYTHON, "-m", "mlxlab.cli.main", "runs", "compare", "latest", "--metric",
               "val/loss", "--json"], root, {"MLXLAB_ROOT": str(root)})
    result = json.loads(out[out.index("{"):])
    a, b = values(children, "None", "best/val/loss"), values(children, "True", "best/val/loss")
    seeds = sorted(a)
    xa, xb = np.array([a[s] for s in seeds]), np.array([b[s] for s in seeds])
    (c,) = result["comparisons"]
    assert (c["a"], c["b"], c["paired"], c["n_pairs"]) == ("g1", "g2", True, 3)
    assert c["diff"] == pytest.approx((xb - xa).mean())
    assert c["t_p"] == pytest.approx(st.ttest_rel(xb, xa).pvalue)
    assert c["wilcoxon_p"] == pytest.approx(st.wilcoxon(xb, xa, method="exact").pvalue)
    assert c["seeds_needed"] is None or c["seeds_needed"] >= 6  # both tests can reach 0.05
    assert "no detectable difference" in c["verdict"] or "is ahead of" in c["verdict"]
    assert c["rows"] is None  # row-level tests answer for accuracy only

    out = run([PYTHON, "-m", "mlxlab.cli.main", "runs", "compare", "latest:model.pooler=null",
               "latest:g2", "--json"], root, {"MLXLAB_ROOT": str(root)})
    printed = json.loads(out[out.index("{"):])
    rows = printed["comparisons"][0]["rows"]
    recorded = printed["sweep_verdict"]  # runs compare wrote the sweep's verdict again
    parent = client.get_run(recorded.pop("parent_run_id"))
    stored = json.loads(Path(client.download_artifacts(
        parent.info.run_id, "comparison.json", tempfile.mkdtemp())).read_text())
    assert recorded["verdict"] == stored["verdict"] == parent.data.tags["mlxlab.verdict"]
    assert [g["mean"] for g in recorded["groups"]] == [g["mean"] for g in stored["groups"]]
    assert "Recorded by `mlxlab runs compare latest:model.pooler=null latest:g2`" in (
        parent.data.tags["mlflow.note.content"])
    assert rows["rows"] == 178  # Titanic's validation rows
    for m in rows["mcnemar"]:  # each seed's pair of runs, from their stored predictions
        ra, rb = (next(r for r in children if r.data.params["seed"] == m["seed"]
                       and r.data.params["model.pooler"] == p) for p in ("None", "True"))
        ca, cb = (_correct(r) for r in (ra, rb))
        only_a, only_b = int((ca & ~cb).sum()), int((~ca & cb).sum())
        assert (m["only_a"], m["only_b"]) == (only_a, only_b)
        expected = st.binomtest(min(only_a, only_b), only_a + only_b).pvalue if only_a + only_b else 1.0
        assert m["p"] == pytest.approx(min(1.0, expected))


def _correct(run) -> np.ndarray:
    from pathlib import Path

    data = np.genfromtxt(Path(run.data.tags["mlxlab.run_dir"]) / "predictions/val_best.csv",
                         delimiter=",", names=True)
    return data["label"] == data["prediction"]
