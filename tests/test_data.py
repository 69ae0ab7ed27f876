"""Data room: tokenizers, CSV-as-text classification data, streamed and packed LM data, batching."""

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mlxlab.data.batching import Batching, bucket_length, dynamic_batches, make_batches
from mlxlab.data.streaming import StreamingText, fresh_state, regroup_flat_config, token_throughput
from mlxlab.data.tabular import TabularText, row_texts, stratified_split
from mlxlab.data.tokenizer import auto_vocab_size, build_tokenizer, tokenizer_hash

TITANIC_TEMPLATE = "class {Pclass}. sex {Sex}. age {Age}. fare {Fare}. embarked {Embarked}."
DOCS = [
    "Once upon a time there was a cat named Tom.\nTom liked milk.",
    "The dog ran to the park. It was a sunny day!",
    "Lily had a red ball. She threw the ball to Tom, and Tom caught it.",
    "",  # blank documents are skipped
    '"Wow," said Ben. "Look at the big tree." They climbed it together.',
] + [
    f"Story {i}: the little bird sang {i % 7} songs and flew {'far ' * (i % 5)}away."
    for i in range(60)
]
REAL_DOCS = [d.strip() for d in DOCS if d.strip()]


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def titanic_csv():
    from mlxlab.config import asset_path

    return asset_path("titanic/train.csv")


def tabular(path, tmp_path, **kw) -> TabularText:
    args = dict(
        path=path,
        label_column="Survived",
        id_column="PassengerId",
        template=TITANIC_TEMPLATE,
        bins={"Age": [0, 12, 18, 30, 45, 60, 100]},
        seed=0,
        max_length=32,
        cache_dir=str(tmp_path / "cache"),
    )
    return TabularText(**{**args, **kw})


def write_txt(path, docs):
    path.write_text("\n\n".join(docs) + "\n")
    return path


def streaming(files, tmp_path, **kw) -> StreamingText:
    args = dict(
        data_files=str(files),
        seq_len=16,
        val_examples=0,
        shuffle_buffer=0,
        tokenize_batch=4,
        prefetch=2,
        cache_dir=str(tmp_path / "cache"),
    )
    return StreamingText(**regroup_flat_config({**args, **kw}))  # flat keys, grouped


def token_stream(batches) -> list[int]:
    """Undo packing: the first input token, then every scored label in order."""
    stream = []
    for batch in batches:
        ids, labels, mask = (np.array(batch[k]) for k in ("input_ids", "labels", "loss_mask"))
        for row in range(len(ids)):
            if not stream and mask[row].any():
                stream.append(int(ids[row, 0]))
            stream += labels[row][mask[row] > 0].tolist()
    return stream


def as_numpy(batches):
    return [{k: np.array(v) for k, v in b.items()} for b in batches]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


# --------------------------------------------------------------- tokenizers
def test_auto_vocab_rule_counts_repeated_words_rounds_and_clamps():
    texts = ["a b c a b", "a d"]  # repeated words (min_frequency 2): a, b; chars a b c d
    # wordpiece: 5 specials + 2 * 4 chars + 2 words = 15 -> 64
    assert auto_vocab_size(texts, "wordpiece", 2, 5, min_vocab=1, max_vocab=10_000) == 64
    assert auto_vocab_size(texts, "wordpiece", 2, 5, min_vocab=128, max_vocab=10_000) == 128
    # byte-level: 2 specials + 256 bytes + 2 words = 260 -> 320
    assert auto_vocab_size(texts, "bytelevel_bpe", 2, 2, min_vocab=1, max_vocab=10_000) == 320
    many = [" ".join(f"w{i}" for i in range(500))] * 2
    assert (
        auto_vocab_size(many, "bytelevel_bpe", 2, 2, min_vocab=1, max_vocab=10_000) == 768
    )  # 758 -> 768
    assert auto_vocab_size(many, "bytelevel_bpe", 2, 2, min_vocab=1, max_vocab=512) == 512
    assert (
        auto_vocab_size(many, "bytelevel_bpe", 3, 2, min_vocab=1, max_vocab=10_000) == 320
    )  # none repeat 3x


def test_wordpiece_is_bert_style_and_reused_from_save_to(tmp_path):
    texts = ["Class 3. Sex male. Age 22.", "class 1. sex female. age 38."] * 5
    save = tmp_path / "tokenizer.json"
    tok = build_tokenizer(texts, vocab_size="auto", kind="wordpiece", save_to=save)
    assert save.is_file()
    assert [tok.token_to_id(t) for t in ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]] == [
        0,
        1,
        2,
        3,
        4,
    ]
    enc = tok.encode("CLASS 3. sex Male!")
    # Lowercased, split on whitespace and punctuation, wrapped in [CLS] ... [SEP]; "!" is unseen.
    assert enc.tokens == ["[CLS]", "class", "3", ".", "sex", "male", "[UNK]", "[SEP]"]
    # Reused (not retrained) even when given other texts; retrain=True trains anew.
    again = build_tokenizer(["zzz qqq"] * 9, kind="wordpiece", save_to=save)
    assert tokenizer_hash(again) == tokenizer_hash(tok)
    fresh = build_tokenizer(["zzz qqq"] * 9, kind="wordpiece", save_to=save, retrain=True)
    assert tokenizer_hash(fresh) != tokenizer_hash(tok)
    # A given tokenizer.json wins and is copied to save_to.
    given = build_tokenizer(
        None, path=str(tmp_path / "tokenizer.json"), save_to=tmp_path / "run" / "t.json"
    )
    assert (
        tokenizer_hash(given) == tokenizer_hash(fresh) and (tmp_path / "run" / "t.json").is_file()
    )


def test_trained_tokenizers_are_identical_across_processes():
    # Rust hash maps are seeded per process; count ties must not decide the vocabulary.
    code = (
        "from mlxlab.data.tokenizer import build_tokenizer, tokenizer_hash\n"
        "texts = [f'class {i % 3}. sex {s}. embarked {e}. fare {i % 7}-{i % 5}.' "
        "for i in range(300) for s, e in [('male', 'S'), ('female', 'C')]]\n"
        "print(tokenizer_hash(build_tokenizer(texts, kind='wordpiece')),"
        " tokenizer_hash(build_tokenizer(texts, kind='bytelevel_bpe', min_vocab=1)))"
    )
    runs = {
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout
        for _ in range(3)
    }
    assert len(runs) == 1


def test_tokenizer_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="kind"):
        build_tokenizer(["a"], kind="sentencepiece")
    with pytest.raises(FileNotFoundError, match="tokenizer.path"):
        build_tokenizer(None, path=str(tmp_path / "nope.json"))
    with pytest.raises(ValueError, match="zero texts"):
        build_tokenizer([])


# ------------------------------------------------------------------ batching
def test_bucket_length():
    assert [bucket_length(n, 16) for n in (1, 16, 17, 33)] == [16, 16, 32, 48]
    assert bucket_length(70, 16, max_len=64) == 64


def test_dynamic_batching_gives_short_sequences_bigger_batches_and_few_shapes():
    rng = np.random.default_rng(0)
    lengths = np.concatenate([rng.integers(3, 16, 300), rng.integers(50, 64, 100)])
    batching = Batching(batch_size=8, dynamic=True, bucket_multiple=16)
    batches = dynamic_batches(lengths, batching, max_len=64, rng=np.random.default_rng(1))
    assert sorted(np.concatenate(batches).tolist()) == list(range(400))  # each example exactly once
    sizes = {}
    for b in batches:
        sizes.setdefault(bucket_length(lengths[b].max(), 16, 64), []).append(len(b))
    # Budget = 8 * 64 tokens: 32 short (bucket 16) sequences per batch, 8 long (bucket 64) ones.
    assert max(sizes[16]) == 32 and max(sizes[64]) == 8
    shapes = {(len(b), bucket_length(lengths[b].max(), 16, 64)) for b in batches}
    assert len(shapes) <= 4  # one full and at most one partial batch per bucket
    again = dynamic_batches(lengths, batching, max_len=64, rng=np.random.default_rng(1))
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))
    capped = dynamic_batches(lengths, Batching(batch_size=8, dynamic=True, max_batch_size=12), 64)
    assert max(len(b) for b in capped) == 12
    assert len(make_batches(lengths, Batching(batch_size=8), 64)) == 50


# ------------------------------------------------------------------- tabular
def test_stratified_split_is_seeded_and_keeps_class_balance():
    labels = np.array([0] * 600 + [1] * 300)
    train, val = stratified_split(labels, 0.2, seed=7)
    again_train, again_val = stratified_split(labels, 0.2, seed=7)
    assert np.array_equal(val, again_val) and np.array_equal(train, again_train)
    assert not np.array_equal(val, stratified_split(labels, 0.2, seed=8)[1])
    assert len(val) == 180 and (labels[val] == 1).sum() == 60  # 20 % of each class
    assert set(train) | set(val) == set(range(900)) and not set(train) & set(val)


def test_template_missing_values_and_bins():
    df = pd.DataFrame(
        {
            "Age": [4.0, np.nan, 70.0, 200.0],
            "Sex": ["male", "female", " ", None],
            "SibSp": [1, 0, 2, 3],
        }
    )
    texts = row_texts(df, [], "age {Age}, {Sex}, {SibSp}", "unknown", {"Age": [0, 12, 60, 100]})
    assert texts == [
        "age 0-12, male, 1",
        "age unknown, female, 0",
        "age 60-100, unknown, 2",
        "age 60-100, unknown, 3",
    ]  # out of range -> last bin
    plain = row_texts(df.iloc[:1], ["Age", "SibSp"], None, "?", None)
    assert plain == ["Age: 4. SibSp: 1"]  # integral floats lose ".0"


def test_titanic_setup_batches_and_cache_hit(titanic_csv, tmp_path, caplog):
    data = tabular(titanic_csv, tmp_path)
    data.setup(tmp_path / "run1")
    assert data.num_labels == 2 and data.label_names == ["0", "1"] and not data.cache_hit
    assert (tmp_path / "run1" / "tokenizer.json").is_file()
    assert data.examples[0] == "class 3. sex male. age 18-30. fare q2. embarked S."  # Fare: learnt bins (16)
    assert "age unknown" in data.examples[5]  # row 6 has no Age
    assert len(data.val_idx) == 178  # round(0.2 * 549) + round(0.2 * 342)
    batching = Batching(batch_size=32)
    batches = list(data.train_batches(batching, 0))
    assert len(batches) == data.num_train_batches(batching) == 23
    b = batches[0]
    assert b["input_ids"].shape == (32, 32) and b["labels"].shape == (32,)
    assert str(b["input_ids"].dtype) == "mlx.core.int32"
    ids, mask = np.array(b["input_ids"]), np.array(b["attention_mask"])
    assert (ids[mask == 0] == 0).all() and (ids[:, 0] == data.tokenizer.token_to_id("[CLS]")).all()
    assert sum(len(np.array(v["labels"])) for v in data.val_batches(batching)) == 178
    # Same file, tokenizer and settings -> the cached arrays are reused.
    with caplog.at_level(logging.INFO, logger="mlxlab.data.tabular"):
        second = tabular(titanic_csv, tmp_path)
        second.setup(tmp_path / "run1")
    assert second.cache_hit and "cache hit" in caplog.text
    assert np.array_equal(second.train[0], data.train[0])
    # A different template is a different cache entry.
    third = tabular(titanic_csv, tmp_path, template="{Sex} {Pclass}")
    third.setup(tmp_path / "run3")
    assert not third.cache_hit


def test_tabular_resume_mid_epoch_yields_exactly_the_rest(titanic_csv, tmp_path):
    batching = Batching(batch_size=16, dynamic=True, max_tokens=640)
    data = tabular(titanic_csv, tmp_path)
    data.setup(tmp_path / "run")
    full = as_numpy(data.train_batches(batching, 2))
    other_epoch = as_numpy(data.train_batches(batching, 3))
    assert not np.array_equal(full[0]["labels"], other_epoch[0]["labels"])  # reshuffled per epoch
    stream = data.train_batches(batching, 2)
    first = as_numpy(next(stream) for _ in range(5))
    state = json.loads(json.dumps(data.state_dict()))
    assert state == {"epoch": 2, "batches_done": 5}
    resumed = tabular(titanic_csv, tmp_path)
    resumed.setup(tmp_path / "run")
    resumed.load_state_dict(state)
    rest = as_numpy(resumed.train_batches(batching, 2))
    assert_same_batches(first + rest, full)
    assert resumed.state_dict() == {"epoch": 3, "batches_done": 0}


def test_tabular_clear_errors(titanic_csv, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.csv.*data\.path="):
        tabular(str(tmp_path / "nope.csv"), tmp_path).setup(tmp_path / "run")
    with pytest.raises(
        ValueError, match=r"label column \['Survivd'\].*available columns: \['PassengerId'"
    ):
        tabular(titanic_csv, tmp_path, label_column="Survivd").setup(tmp_path / "run")
    with pytest.raises(ValueError, match=r"template columns \['Agee'\].*'Age'"):
        tabular(titanic_csv, tmp_path, template="{Agee}").setup(tmp_path / "run")
    with pytest.raises(ValueError, match=r"feature columns"):
        tabular(titanic_csv, tmp_path, template=None, feature_columns=["Nope"]).setup(
            tmp_path / "run"
        )
    with pytest.raises(ValueError, match=r"label column 'Survived'.*data.template"):
        tabular(titanic_csv, tmp_path, template="{Sex} {Survived}").setup(tmp_path / "run")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty.csv"):
        tabular(str(empty), tmp_path).setup(tmp_path / "run")


def test_any_csv_without_template_and_predict_frame(tmp_path):
    rng = np.random.default_rng(0)
    n = 200
    df = pd.DataFrame(
        {
            "id": np.arange(n),
            "color": rng.choice(["red", "blue"], n),
            "size": rng.integers(1, 5, n),
            "label": rng.choice(["cat", "dog", "eel"], n),
        }
    )
    df.to_csv(tmp_path / "any.csv", index=False)
    data = TabularText(
        path=str(tmp_path / "any.csv"),
        label_column="label",
        id_column="id",
        max_length=16,
        cache_dir=None,
    )
    data.setup(None)
    assert data.num_labels == 3 and data.label_names == ["cat", "dog", "eel"]
    assert data.examples[0].startswith("color: ") and "size: " in data.examples[0]
    test = df.drop(columns=["label"]).head(10)
    batches = list(data.encode_frame(test, batch_size=4))
    assert [len(b["input_ids"]) for b in batches] == [4, 4, 2] and "labels" not in batches[0]
    sub = data.submission(test, [0, 2, 1, 0, 0, 0, 0, 0, 0, 1])
    assert list(sub.columns) == ["id", "label"] and sub["label"].tolist()[:3] == [
        "cat",
        "eel",
        "dog",
    ]


# ----------------------------------------------------------------- streaming
def test_packing_equals_tokenizing_the_whole_text_with_eot_joins(tmp_path):
    data = streaming(write_txt(tmp_path / "docs.txt", DOCS), tmp_path)
    data.setup(tmp_path / "run")
    assert (tmp_path / "run" / "tokenizer.json").is_file()
    batches = as_numpy(data.train_batches(Batching(batch_size=4), 0))
    whole = data.tokenizer.encode("<|endoftext|>".join(REAL_DOCS) + "<|endoftext|>").ids
    assert token_stream(batches) == whole
    ids = np.concatenate([b["input_ids"] for b in batches])
    assert all(b["input_ids"].shape == (4, 16) for b in batches)  # one shape, tail rows padded
    # Every document boundary is an end-of-text token: decoding between EOTs gives the docs back.
    eot = data.tokenizer.token_to_id("<|endoftext|>")
    pieces, current = [], []
    for t in whole:
        if t == eot:
            pieces.append(data.tokenizer.decode(current))
            current = []
        else:
            current.append(t)
    assert pieces == REAL_DOCS and not current
    assert ids.max() < data.vocab_size


def test_overlapping_stride_scores_every_token_once(tmp_path):
    data = streaming(write_txt(tmp_path / "docs.txt", DOCS), tmp_path, stride=10)
    data.setup(tmp_path / "run")
    batches = as_numpy(data.train_batches(Batching(batch_size=3), 0))
    whole = data.tokenizer.encode("<|endoftext|>".join(REAL_DOCS) + "<|endoftext|>").ids
    assert token_stream(batches) == whole
    assert (batches[1]["loss_mask"][:, :6] == 0).all()  # 16 - 10 positions already scored


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_streaming_jsonl_and_parquet_match_txt(tmp_path, fmt):
    txt = streaming(write_txt(tmp_path / "docs.txt", DOCS), tmp_path)
    txt.setup(tmp_path / "run_txt")
    frame = pd.DataFrame({"id": range(len(DOCS)), "body": DOCS})
    path = tmp_path / f"docs.{fmt}"
    if fmt == "jsonl":
        frame.to_json(path, orient="records", lines=True)
    else:
        frame.to_parquet(path)
    other = streaming(
        path,
        tmp_path,
        text_column="body",
        tokenizer={"path": str(tmp_path / "run_txt" / "tokenizer.json")},
    )
    other.setup(tmp_path / f"run_{fmt}")
    batching = Batching(batch_size=4)
    assert token_stream(as_numpy(other.train_batches(batching, 0))) == token_stream(
        as_numpy(txt.train_batches(batching, 0))
    )


def test_streaming_val_split_is_held_out_and_stable(tmp_path):
    data = streaming(write_txt(tmp_path / "docs.txt", DOCS), tmp_path, val_examples=10)
    data.setup(tmp_path / "run")
    batching = Batching(batch_size=2)
    val = token_stream(as_numpy(data.val_batches(batching)))
    eot = "<|endoftext|>"
    # The txt reader drops the blank paragraph itself, so examples are REAL_DOCS.
    assert val == data.tokenizer.encode(eot.join(REAL_DOCS[:10]) + eot).ids
    assert token_stream(as_numpy(data.val_batches(batching))) == val
    train = token_stream(as_numpy(data.train_batches(batching, 0)))
    assert train == data.tokenizer.encode(eot.join(REAL_DOCS[10:]) + eot).ids


# A training process (mlxlab-train's job) sets up a shuffled, held-out stream and prints what it
# reads, and whether PyTorch got imported.
TORCHLESS = """
import json, sys
import numpy as np
from mlxlab.data.batching import Batching
from mlxlab.data.streaming import StreamingText, regroup_flat_config, source
source.leave_out_torch()
data = StreamingText(**regroup_flat_config(json.loads(sys.argv[1])))
data.setup(sys.argv[2])
batches = data.train_batches(Batching(batch_size=2), 1)
print(json.dumps({"torch": "torch" in sys.modules,
                  "ids": [np.asarray(b["input_ids"]).tolist() for b in batches]}))
"""


def test_a_training_process_streams_the_same_batches_without_importing_torch(tmp_path):
    """datasets imports PyTorch for every stream it opens where PyTorch is installed (2-4 s of a
    run's start); mlxlab-train's jobs leave its torch hooks out (source.leave_out_torch) and
    read the same batches as this process, which keeps them."""
    pytest.importorskip("torch")
    args = dict(data_files=str(write_txt(tmp_path / "docs.txt", DOCS)), seq_len=16,
                val_examples=10, shuffle_buffer=16, seed=3, tokenize_batch=4, prefetch=2,
                cache_dir=str(tmp_path / "cache"))
    done = subprocess.run([sys.executable, "-c", TORCHLESS, json.dumps(args),
                           str(tmp_path / "torchless")], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.splitlines()[-1])
    assert got["torch"] is False
    here = StreamingText(**regroup_flat_config(args))
    here.setup(tmp_path / "here")
    expected = [b["input_ids"].tolist() for b in as_numpy(here.train_batches(Batching(batch_size=2), 1))]
    assert got["ids"] == expected and len(expected) > 5


def test_streaming_resume_mid_epoch_with_shuffle(tmp_path):
    files = write_txt(tmp_path / "docs.txt", DOCS)
    batching = Batching(batch_size=2)
    data = streaming(files, tmp_path, shuffle_buffer=16, seed=3)
    data.setup(tmp_path / "run")
    full = as_numpy(data.train_batches(batching, 1))
    assert token_stream(full) != token_stream(
        as_numpy(data.train_batches(batching, 0))
    )  # per-epoch shuffle
    stream = data.train_batches(batching, 1)
    first = as_numpy(next(stream) for _ in range(7))
    stream.close()
    state = json.loads(json.dumps(data.state_dict()))
    assert (
        state["epoch"] == 1
        and state["batches_done"] == 7
        and 0 < state["examples_consumed"] < len(DOCS)
    )
    assert len(state["carry"]) < 2 * 16 + 1 + 4 * 40  # bounded: one batch + one tokenize chunk
    resumed = streaming(files, tmp_path, shuffle_buffer=16, seed=3)
    resumed.setup(tmp_path / "run")
    resumed.load_state_dict(state)
    rest = as_numpy(resumed.train_batches(batching, 1))
    assert_same_batches(first + rest, full)
    assert resumed.state_dict()["epoch"] == 2


def test_lane_positions_resume_at_another_lane_count_from_the_first_unread_document(tmp_path):
    """A checkpoint of 2 lanes (data.shard_by_rank under 2 ranks; lane r read documents r, r+2,
    ...) resumed by 1 process: it continues at the first document neither lane had read, which
    is what a whole-stream position at that document gives. The state names its lane count."""
    files = write_txt(tmp_path / "docs.txt", DOCS)
    batching = Batching(batch_size=2)
    lane = {"carry": [1, 2, 3], "windows_done": 4, "batches_done": 2}
    saved = {"epoch": 1, "base": 0, "lanes": 2, "lane_states": [
        {**lane, "examples_consumed": 5}, {**lane, "examples_consumed": 3}]}  # next: 10 and 7
    batches = []
    for state in (saved, {"epoch": 1, "examples_consumed": 7, "carry": []}):
        data = streaming(files, tmp_path, shuffle_buffer=16, seed=3, shard_by_rank=True)
        data.setup(tmp_path / "run")
        data.load_state_dict(state)
        batches.append(as_numpy(data.train_batches(batching, 1)))
    assert batches[0] and len(batches[0][0]["input_ids"]) == 2
    assert_same_batches(*batches)
    assert data.state_dict() == {**fresh_state(2), "lane": 0, "lanes": 1}


def test_streaming_clear_errors(tmp_path):
    (tmp_path / "docs.jsonl").write_text(json.dumps({"body": "hello there"}) + "\n")
    with pytest.raises(
        ValueError, match=r"text column 'text'.*available columns: \['body'\].*data.source.text_column="
    ):
        streaming(tmp_path / "docs.jsonl", tmp_path).setup(tmp_path / "run")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match=r"no text in .*empty.txt"):
        streaming(tmp_path / "empty.txt", tmp_path).setup(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match=r"missing.txt.*data.source.data_files="):
        streaming(tmp_path / "missing.txt", tmp_path)
    with pytest.raises(ValueError, match="stride"):
        streaming(tmp_path / "empty.txt", tmp_path, stride=17)


def test_streaming_without_validation(tmp_path):
    data = streaming(write_txt(tmp_path / "docs.txt", DOCS), tmp_path, val_examples=0)
    data.setup(tmp_path / "run")
    assert not data.has_validation and list(data.val_batches(Batching(batch_size=2))) == []
    eot = "<|endoftext|>"
    train = token_stream(as_numpy(data.train_batches(Batching(batch_size=2), 0)))
    assert train == data.tokenizer.encode(eot.join(REAL_DOCS) + eot).ids  # nothing held out


DIALOGUE = "\n\n".join(
    f"{who}: {line}" for who, line in [
        ("ROMEO", "But soft, what light through yonder window breaks?"),
        ("JULIET", "Ay me. O Romeo, Romeo, wherefore art thou Romeo?"),
        ("ROMEO", "Shall I hear more, or shall I speak at this?"),
        ("JULIET", "Tis but thy name that is my enemy; thou art thyself."),
    ] * 6
) + "\n"


def test_streaming_one_document_holds_out_its_last_tokens(tmp_path, caplog):
    """A corpus that is one document (sample_by=document) keeps 90% of its text for training and
    validates on the rest, instead of holding out the only document and training on nothing."""
    (tmp_path / "play.txt").write_text(DIALOGUE)
    data = streaming(tmp_path / "play.txt", tmp_path, sample_by="document", val_examples=200)
    with caplog.at_level(logging.WARNING, logger="mlxlab.data.streaming"):
        data.setup(tmp_path / "run")
    assert "1 document(s), not more than data.splits.val_examples=200" in caplog.text
    batching = Batching(batch_size=2)
    train = data.tokenizer.decode(token_stream(as_numpy(data.train_batches(batching, 0))),
                                  skip_special_tokens=False)
    val = data.tokenizer.decode(token_stream(as_numpy(data.val_batches(batching))),
                                skip_special_tokens=False)
    eot = "<|endoftext|>"
    text = DIALOGUE.strip()
    assert train.endswith(eot) and val.endswith(eot)
    train, val = train[: -len(eot)], val[: -len(eot)]
    assert eot not in train  # one document: training runs across the speeches
    assert text.startswith(train) and text.endswith(val) and len(train) + len(val) < len(text)
    assert 0.05 < len(val) / len(text) < 0.15
    # paragraph documents, the default, end every speech with end-of-text
    paragraphs = streaming(tmp_path / "play.txt", tmp_path, val_examples=0)
    paragraphs.setup(tmp_path / "run2")
    ids = token_stream(as_numpy(paragraphs.train_batches(batching, 0)))
    assert ids.count(paragraphs.eot_id) == 24


def test_streaming_empty_and_undecodable_files_are_named(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"no records in .*empty.jsonl: the file is empty"):
        streaming(tmp_path / "empty.jsonl", tmp_path).setup(tmp_path / "run")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("Caf\u00e9 au lait.\n\nLa cr\u00e8me br\u00fbl\u00e9e.\n".encode("latin-1"))
    (tmp_path / "fine.txt").write_text("plain text\n")
    files = [str(tmp_path / "fine.txt"), str(latin)]
    with pytest.raises(ValueError, match=r"latin.txt is not utf-8 text .*data.source.encoding=latin-1"):
        streaming(latin, tmp_path, data_files=files).setup(tmp_path / "run")
    data = streaming(latin, tmp_path, encoding="latin-1")
    data.setup(tmp_path / "run3")
    assert "\u00e9" in data.tokenizer.decode(token_stream(as_numpy(
        data.train_batches(Batching(batch_size=2), 0))))


def test_shipped_tinystories_sample_auto_vocab_and_throughput(tmp_path):
    from mlxlab.config import asset_path

    data = StreamingText(
        source={"data_files": asset_path("tinystories/sample.txt")},
        packing={"seq_len": 128},
        tokenizer_sample=2000,
        cache_dir=str(tmp_path / "cache"),
    )
    data.setup(tmp_path / "run")
    assert 512 <= data.vocab_size <= 8192
    stats = token_throughput(data, Batching(batch_size=8), max_batches=10)
    assert stats["batches"] == 10 and stats["tokens"] == 10 * 8 * 128
    assert data.state_dict()["batches_done"] == 0  # measuring does not move the training position
    # The trained tokenizer is cached: a second run directory reuses it.
    again = StreamingText(
        source={"data_files": asset_path("tinystories/sample.txt")},
        packing={"seq_len": 128},
        tokenizer_sample=2000,
        cache_dir=str(tmp_path / "cache"),
    )
    again.setup(tmp_path / "run2")
    assert tokenizer_hash(again.tokenizer) == tokenizer_hash(data.tokenizer)


@pytest.mark.parametrize("max_steps", ["null", "1000", "3"])
def test_epochs_bound_a_streamed_run(make_cfg, caplog, capsys, max_steps):
    """trainer.max_epochs=2 on streamed text, alone or beside the preset's max_steps: one pass
    counts an epoch (the batches an epoch then yields), the run trains exactly two, evaluates at
    each epoch's end and its log lines and bar name the epoch. A max_steps reached first ends the
    run there (the count stops once an epoch is longer than max_steps / max_epochs)."""
    from conftest import LM_RUN
    from mlxlab.checkpoint import CheckpointState
    from mlxlab.config import instantiate
    from mlxlab.data.batching import Batching
    from mlxlab.train import train

    args = [*LM_RUN, f"trainer.max_steps={max_steps}", "trainer.max_epochs=2",
            "trainer.log_every_steps=5", "trainer.eval_every_steps=null",
            "data.splits.max_examples=40", "callbacks.progress.enabled=true"]
    cfg = make_cfg(*args)
    data = instantiate(cfg.data)
    data.setup(None)
    per_epoch = sum(1 for _ in data.train_batches(Batching(cfg.trainer.batch_size), 0))
    with caplog.at_level(logging.INFO, logger="mlxlab"):
        train(make_cfg(*args))
    log, bar = "\n".join(r.getMessage() for r in caplog.records), capsys.readouterr().err
    run_dir = Path(cfg.paths.output_dir)
    last = CheckpointState.read(sorted((run_dir / "checkpoints").glob("step_*"))[-1])
    if max_steps == "3":
        assert per_epoch > 3 and last.step == 3
        assert "trainer.max_steps ends the run first" in log
        return
    assert f"an epoch is {per_epoch} batches of 8 rows" in log
    assert last.step == 2 * per_epoch  # exactly two epochs
    assert [s for s, _ in last.history["val/loss"]] == [per_epoch, 2 * per_epoch]
    assert "epoch 2/2" in log, log[-2000:]
    assert f"{2 * per_epoch}/{2 * per_epoch}" in bar and "epoch=2/2" in bar, bar[-1000:]
