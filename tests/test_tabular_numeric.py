"""Numeric CSV columns (`data.numeric`): which columns count as numbers, quantile bin edges from
the training rows only, missing values, the `text` and `data.bins` escapes, the settings record,
and a finished run encoding new rows exactly as it trained."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
from hydra.core.global_hydra import GlobalHydra

from conftest import FAST
from mlxlab.config import instantiate
from mlxlab.data.numeric import fit_bins, is_row_number, numeric_values, quantile_edges
from mlxlab.data.tabular import TabularText, stratified_split
from mlxlab.data.tabular_settings import TabularSettings
from mlxlab.errors import ConfigError


def write(tmp_path, frame: pd.DataFrame, name: str = "table.csv") -> str:
    path = tmp_path / name
    frame.to_csv(path, index=False)
    return str(path)


def mixed_table(n: int = 80, seed: int = 0) -> pd.DataFrame:
    """Every kind of column: a shuffled running id, a count, a float with blanks, numbers stored
    as text with blanks, a text code, and the label."""
    rng = np.random.default_rng(seed)
    height = rng.normal(170, 10, n).round(1)
    height[[3, 7]] = np.nan
    as_text = [f" {x:.2f} " for x in rng.uniform(0, 5, n)]
    as_text[5] = ""
    return pd.DataFrame({
        "row": rng.permutation(np.arange(1, n + 1)),
        "count": rng.integers(0, 4, n),
        "height": height,
        "score": pd.Series(as_text, dtype=object),
        "code": rng.choice(["A", "B", "C"], n),
        "label": rng.choice(["no", "yes"], n),
    })


def module(path: str, **keys) -> TabularText:
    data = TabularText(path=path, label_column="label", cache_dir=None, **keys)
    data.setup(None)
    return data


def test_what_counts_as_a_number():
    nan = np.nan
    np.testing.assert_array_equal(numeric_values(pd.Series([1, 2, 3])), [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(numeric_values(pd.Series([1.5, None])), [1.5, nan])
    np.testing.assert_array_equal(numeric_values(pd.Series([" 2.5", "", None, "3"])),
                                  [2.5, nan, nan, 3.0])  # numeric strings, blanks missing
    assert numeric_values(pd.Series(["1", "two", "3"])) is None  # one word: a text column
    assert numeric_values(pd.Series([True, False])) is None  # booleans are categories
    assert numeric_values(pd.Series(["", " ", None])) is None  # nothing to bin
    assert numeric_values(pd.Series(["1", "inf"])) is None  # no finite edges for infinity

    running = np.random.default_rng(0).permutation(np.arange(1, 41)).astype(float)
    assert is_row_number(running) and is_row_number(running - 1)  # 1..n or 0..n-1
    assert not is_row_number(np.append(running[:-1], 99.0))  # a gap: a measured integer
    assert not is_row_number(running + 0.5) and not is_row_number(np.arange(1.0, 9.0))  # few rows
    # Ten or fewer distinct values (a count, a code) are written as they are, not binned.
    frame = pd.DataFrame({"few": np.arange(40) % 10, "many": np.arange(40) % 11 * 1.5})
    assert list(fit_bins(frame, np.arange(40), ["few", "many"], 8, "q").edges) == ["many"]


def test_setup_bins_measurements_keeps_codes_and_drops_running_ids(tmp_path):
    path = write(tmp_path, mixed_table())
    data = module(path)
    assert data.columns == ["count", "height", "score", "code"]  # "row" left out
    assert list(data.numeric.edges) == ["height", "score"]
    first = data.examples[0]
    assert first.startswith("count: ") and "code: " in first
    height_word = first.split("height: ")[1].split(".")[0]
    assert height_word in {f"q{i}" for i in range(1, data.settings.numeric_bins + 1)}  # a bin word, not "170.3"
    assert data.max_length == int(data.train[1].max())  # null: the longest row, no padding
    # Named by the user, the running id is a feature again (and a number, so binned).
    kept = module(path, feature_columns=["row", "height"])
    assert kept.columns == ["row", "height"] and "row" in kept.numeric.edges


def test_bin_edges_come_from_training_rows_only(tmp_path):
    frame = mixed_table(n=100)
    labels = np.unique(frame["label"], return_inverse=True)[1]
    train_idx, val_idx = stratified_split(labels, 0.2, seed=0)
    frame.loc[val_idx, "height"] = 1000.0 + np.arange(len(val_idx))  # would move the top edges
    data = module(write(tmp_path, frame), seed=0)
    assert np.array_equal(data.val_idx, val_idx)
    train_heights = frame["height"].to_numpy(float)[train_idx]
    assert data.numeric.edges["height"] == pytest.approx(quantile_edges(train_heights, data.settings.numeric_bins))
    assert max(data.numeric.edges["height"]) < 1000.0
    # Other validation values: the same edges and the same training texts.
    frame.loc[val_idx, "height"] = -5.0
    again = module(write(tmp_path, frame, "other.csv"), seed=0)
    assert again.numeric.edges == data.numeric.edges
    assert [again.examples[i] for i in train_idx] == [data.examples[i] for i in train_idx]
    assert all("height: q1" in again.examples[i] for i in val_idx if i not in (3, 7))


def test_missing_values_stay_their_own_token(tmp_path):
    frame = mixed_table()
    data = module(write(tmp_path, frame), missing_value="n/a")
    assert "height: n/a" in data.examples[3] and "height: n/a" in data.examples[7]
    assert "score: n/a" in data.examples[5]  # a blank numeric string
    assert sum("n/a" in text for text in data.examples) == 3
    # A row to predict whose numeric cells are all blank is written the same way.
    rows = frame.head(2).drop(columns="label").assign(height=np.nan, score="")
    assert all("height: n/a" in t and "score: n/a" in t for t in data.texts(rows))


def test_numeric_text_writes_numbers_as_before(tmp_path):
    frame = pd.DataFrame({"height": [39.1, 170.0, np.nan] * 10, "count": [1, 2, 3] * 10,
                          "row": range(1, 31), "label": ["a", "b", "a"] * 10})
    data = module(write(tmp_path, frame), numeric="text", max_length=64)
    assert data.numeric is None and data.columns == ["height", "count", "row"]
    assert data.examples[:3] == ["height: 39.1. count: 1. row: 1", "height: 170. count: 2. row: 2",
                                 "height: unknown. count: 3. row: 3"]


def test_hand_made_bins_override_a_column(tmp_path):
    frame = mixed_table()
    data = module(write(tmp_path, frame), bins={"height": [0, 165, 175, 300]})
    assert list(data.numeric.edges) == ["score"]  # height has its own edges
    expected = {"0-165", "165-175", "175-300", "unknown"}
    assert {t.split("height: ")[1].split(".")[0] for t in data.examples} == expected


def test_settings_are_one_checked_record():
    settings = TabularSettings.from_keys({"_target_": "x", "path": "a.csv", "label_column": "y",
                                          "bins": {"age": [0, 10]}, "feature_columns": ["age"]})
    assert settings.bins == {"age": (0.0, 10.0)} and settings.feature_columns == ("age",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.numeric = "text"
    assert TabularText(settings).settings is settings
    with pytest.raises(ConfigError, match=r"data\.nmeric is not a setting of data=csv.*'numeric'"):
        TabularText(path="a.csv", label_column="y", nmeric="text")
    for keys, message in [({"numeric": "words"}, r"data\.numeric='words'.*\['bins', 'text'\]"),
                          ({"numeric_bins": 1}, r"numeric_bins must be an integer >= 2"),
                          ({"numeric_words": "x"}, r"numeric_words='x'"),
                          ({"bins": {"age": [3, 1]}}, r"data\.bins\.age must be >= 2 increasing"),
                          ({"max_length": 2}, r"max_length must be an integer >= 3"),
                          ({"label_column": None}, r"needs data\.label_column")]:
        with pytest.raises(ConfigError, match=message):
            TabularSettings.from_keys({"path": "a.csv", "label_column": "y", **keys})


def test_a_run_without_saved_bins_keeps_its_numbers_as_text(tmp_path):
    """A checkpoint saved before `data.numeric` existed has no "numeric" in its encoding state: its
    rows are written as it trained them, whatever today's default."""
    path = write(tmp_path, mixed_table())
    trained = module(path, numeric="text")
    frame = pd.read_csv(path)
    state = {k: v for k, v in trained.encoding_state().items() if k not in ("numeric",)}
    old = TabularText.from_encoding_state({"path": "gone.csv", "label_column": "label"},
                                          trained.tokenizer, state)
    assert old.texts(frame) == trained.examples


def test_predict_encodes_new_rows_as_training_did(make_cfg, tmp_path):
    """A finished run writes and tokenizes rows exactly as its training did, from the run
    folder alone (the training CSV is gone), and `mlxlab predict` sees the same tokens."""
    from mlxlab.runs.inference import load_run
    from mlxlab.train import train

    frame = mixed_table(n=120)
    path = tmp_path / "train.csv"
    frame.to_csv(path, index=False)
    cfg = make_cfg(*FAST, "data=csv", f"data.path={path}", "data.label_column=label",
                   "tracking=none")
    train(cfg)
    trained = instantiate(cfg.data)
    trained.setup(None)  # the run's own split, edges and tokens
    GlobalHydra.instance().clear()
    path.unlink()

    run = load_run(cfg.paths.output_dir)
    encoding = run.encoding
    assert encoding.numeric.edges == trained.numeric.edges and encoding.numeric.edges
    assert encoding.max_length == trained.max_length
    rows = frame.iloc[trained.val_idx].drop(columns="label")
    assert encoding.texts(rows) == [trained.examples[i] for i in trained.val_idx]
    batch = next(encoding.encode_frame(rows, batch_size=len(rows), bucket_multiple=1))
    width = batch["input_ids"].shape[1]
    np.testing.assert_array_equal(np.array(batch["input_ids"]), trained.val[0][:, :width])


def test_the_titanic_preset_reads_as_before(make_cfg):
    """data=titanic's template columns are hand-binned (Age, Fare) or codes (Pclass, SibSp,
    Parch): numeric bins leave its text, hence the default experiment, as it was."""
    texts = {}
    for numeric in ("bins", "text"):
        data = instantiate(make_cfg(f"data.numeric={numeric}", "data.cache_dir=null").data)
        data.setup(None)
        texts[numeric] = data.examples
        assert data.numeric is None or not data.numeric.edges
    assert texts["bins"] == texts["text"]
    assert texts["bins"][0].startswith("class 3. sex male. age 18-25. siblings or spouses 1.")
