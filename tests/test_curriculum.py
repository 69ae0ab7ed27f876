"""Curriculum batching (data/curriculum.py): easy examples first, the pool widening to all the
data, the token distribution trained on tracked, logged and resumed with the data's state."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from mlxlab.config import instantiate
from mlxlab.data.batching import Batching
from mlxlab.data.curriculum import Curriculum
from mlxlab.train import train

TINY_BERT = ["model.hidden_size=32", "model.num_layers=1", "model.num_heads=2",
             "callbacks.progress.enabled=false", "callbacks.early_stopping.patience=0"]


def synthetic(n: int = 200) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    # example i has i // 2 + 1 tokens; the long ones use the rare ids 50..99
    return [np.concatenate([rng.integers(0, 10, i // 2 + 1), np.arange(50, 50 + i // 20)])
            for i in range(n)]


def test_pacing_starts_with_the_easiest_and_widens_to_all():
    c = Curriculum(score="length", pacing="root", start=0.2, full_at=0.5)
    examples = synthetic()
    c.fit(examples, vocab_size=100)
    c.set_total(100)
    assert c.competence(0) == pytest.approx(0.2) and c.competence(50) == 1.0
    linear = Curriculum(pacing="linear", start=0.2, full_at=0.5)
    linear.set_total(100)
    assert c.competence(10) > linear.competence(10)  # root pacing widens faster at first
    lengths = np.array([len(e) for e in examples])
    easiest = set(np.argsort(lengths, kind="stable")[:40].tolist())
    first = c.draw(0, 16, epoch=0, k=0)
    assert set(first.tolist()) <= easiest and len(set(first.tolist())) == 16
    late = np.concatenate([c.draw(b, 16, epoch=0, k=b) for b in range(60, 100)])
    assert lengths[late].mean() > 2 * lengths[first].mean()  # the whole range by then
    assert not (set(late.tolist()) <= easiest)
    assert np.array_equal(c.draw(7, 16, 0, 7), c.draw(7, 16, 0, 7))  # reproducible per batch
    order = c.document_order(epoch=0, docs_per_batch=2.0)  # 100 batches over 200 documents
    assert lengths[order[:20]].mean() < lengths[order[-20:]].mean() / 2


def test_rarity_and_token_tracking_on_titanic(make_cfg, tmp_path):
    def module(curriculum):
        cfg = make_cfg(f"data.curriculum={curriculum}")
        data = instantiate(cfg.data)
        data.setup(tmp_path / "run")
        data.curriculum.set_total(40)
        return data

    paced, plain = module("{score: rarity, full_at: 1.0}"), module("{score: none}")
    batching = Batching(batch_size=32)
    it_paced, it_plain = paced.train_batches(batching, 0), plain.train_batches(batching, 0)
    first = next(it_paced)
    rarity = paced.curriculum.rarity
    assert rarity[np.array(first["index"])].mean() < rarity.mean()  # common tokens first
    for _ in range(4):
        next(it_paced), next(it_plain)
    next(it_plain)
    # five batches each: the curriculum's tokens are further from the corpus distribution
    assert paced.curriculum.kl_seen_corpus() > 2 * plain.curriculum.kl_seen_corpus() > 0
    # the data state (position and counts) resumes the same batches and the same counts
    state = paced.state_dict()
    again = module("{score: rarity, full_at: 1.0}")
    again.load_state_dict(state)
    assert np.array_equal(again.curriculum.seen, paced.curriculum.seen)
    rest_a = [np.array(b["index"]) for b in paced.train_batches(batching, 0)]
    rest_b = [np.array(b["index"]) for b in again.train_batches(batching, 0)]
    assert len(rest_a) == len(rest_b) > 0
    assert all(np.array_equal(a, b) for a, b in zip(rest_a, rest_b))


def test_curriculum_run_logs_kl_and_artifacts(make_cfg, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = make_cfg(*TINY_BERT, "trainer.max_epochs=2", "trainer.log_every_steps=5",
                   "data.curriculum={score: length, pacing: linear}", f"tracking.uri={uri}")
    train(cfg)
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("train").experiment_id])
    kl = [m.value for m in client.get_metric_history(run.info.run_id, "data/kl_seen_corpus")]
    competence = [m.value for m in client.get_metric_history(run.info.run_id, "data/competence")]
    assert len(kl) >= 5 and kl[-1] < kl[0]  # covering the corpus: the gap closes
    assert competence[0] < 1.0 == competence[-1]
    names = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "curriculum")}
    assert {"token_histogram.png", "outliers.json", "summary.json"} <= names


def test_curriculum_with_dynamic_batches_is_one_clear_error(make_cfg):
    """The key the error names exists in the config, and it is a user error (one line), not a
    traceback."""
    from mlxlab.errors import ConfigError
    from mlxlab.train import train

    cfg = make_cfg("tracking=none", "callbacks.progress.enabled=false", "trainer.max_steps=2",
                   "data.curriculum={score: length, pacing: linear}",
                   "trainer.batching.dynamic=true")
    with pytest.raises(ConfigError, match=r"set trainer.batching.dynamic=false or "
                                          r"data.curriculum=null"):
        train(cfg)


@pytest.mark.parametrize(("node", "message"), [
    ({"score": "lenght"}, r"data\.curriculum\.score='lenght': use one of length, rarity, none"),
    ({"pacing": "fast"}, r"data\.curriculum\.pacing='fast': use root or linear"),
    ({"start": 0}, r"data\.curriculum needs 0 < start <= 1"),
    ({"start": "early"}, r"data\.curriculum\.start must be a number, got 'early'"),
    ({"strat": 0.1}, r"data\.curriculum\.strat is not a setting of data\.curriculum: it takes "
                     r"\['score', 'pacing', 'start'"),
])
def test_a_bad_curriculum_is_one_config_error(node, message):
    """A typo in data.curriculum is the user's to fix: a ConfigError (train.py prints one line),
    never a ValueError's or TypeError's traceback."""
    from mlxlab.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        Curriculum.from_config(node, seed=0)


def test_a_bad_curriculum_fails_validation_before_anything_is_built(tmp_path):
    from conftest import compose_cfg
    from mlxlab.config import validate
    from mlxlab.errors import ConfigError

    cfg = compose_cfg(tmp_path, ["data.curriculum={score: lenght}"])
    with pytest.raises(ConfigError, match="data.curriculum.score='lenght'"):
        validate(cfg)
