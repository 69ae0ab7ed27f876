"""Generation tasks decode batched (decoding/batched_greedy.py): the answers equal one-at-a-time
greedy decoding (scoring.greedy_ids) token for token, on a tiny random Llama (mlx-lm's caches:
prompts of every length in one left-padded batch), on a chat model through its own chat
template (a task scored at eval.batch_size=4), and on mlxlab's own Transformer (its own
cache: equal-length prompts batch together)."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

from hf_helpers import save_tiny_model
from mlxlab.decoding.batched_greedy import greedy_batch, merges
from mlxlab.evaluation.scoring import Prompts, _cut, greedy_ids, score_task
from mlxlab.evaluation.settings import TaskSettings
from mlxlab.evaluation.tasks import read_task
from mlxlab.models.decoders.transformer import Transformer
from mlxlab.runs.named_model import load_eval_model


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return load_eval_model(save_tiny_model("llama", tmp_path_factory.mktemp("bg") / "llama"),
                           chat="plain")


def random_prompts(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, size=n).tolist() for n in lengths]


def one_at_a_time(model, prompts, max_new, stops, done=lambda ids: False):
    return [greedy_ids(model, p, max_new, stops, done) for p in prompts]


def test_batched_equals_one_at_a_time_on_a_random_llama(llama):
    """Prompts of 1 to 23 tokens in batches of 5 (left padding up to 22 positions): every
    answer equals the prompt's alone, with no stop, with a stop token some answers meet, and
    with a `done` predicate that ends a few rows early (rows leave the batch mid-way)."""
    model = llama.model
    assert merges(model.make_cache())
    prompts = random_prompts(model.vocab_size, [1, 7, 23, 2, 12, 5, 18, 3, 9, 16, 4, 11])
    alone = one_at_a_time(model, prompts, 12, {-1})
    assert {len(a) for a in alone} == {12}
    assert greedy_batch(model, prompts, 12, {-1}, batch_size=5) == alone
    # a token half the answers produce: those rows end before it, at different steps
    counts = np.bincount([t for a in alone for t in a[1:]])
    stop = int(counts.argmax())
    stopped = one_at_a_time(model, prompts, 12, {stop})
    assert 0 < sum(len(a) < 12 for a in stopped) < len(prompts)
    assert greedy_batch(model, prompts, 12, {stop}, batch_size=5) == stopped

    def done(ids: list[int]) -> bool:
        return len(ids) >= 3 and ids[-1] % 3 == 0

    assert greedy_batch(model, prompts, 12, {-1}, done, batch_size=4) == one_at_a_time(
        model, prompts, 12, {-1}, done)
    assert greedy_batch(model, prompts, 12, {-1}, batch_size=len(prompts)) == alone


def test_the_context_limit_and_empty_cases_match(llama):
    model = llama.model
    limit = model.max_seq_len
    long = random_prompts(model.vocab_size, [limit + 5, limit - 3, 4], seed=1)
    assert greedy_batch(model, long, 6, {-1}, batch_size=3) == one_at_a_time(model, long, 6, {-1})
    assert greedy_batch(model, long, 0, {-1}) == [[], [], []]
    with pytest.raises(ValueError, match="no tokens"):
        greedy_batch(model, [[]], 4, {-1})


def test_a_chat_models_task_scores_the_same_batched(tmp_path):
    """A Qwen2.5-style chat folder (its real template with its default system turn, <|im_end|>
    and <|endoftext|> stops): the task's outputs at eval.batch_size=4 equal each prompt
    decoded alone through the same template, stop tokens and stop strings."""
    folder = save_tiny_model("qwen2", tmp_path / "qwen", chat="qwen2.5")
    source = load_eval_model(folder, chat="template")
    assert source.template is not None
    rows = [{"id": f"q{i}", "prompt": "Tim " * (i % 5) + f"has {i} dogs and", "answer": "x"}
            for i in range(10)]
    task_file = tmp_path / "gen.jsonl"
    task_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = read_task(task_file)
    stop = ("a",)
    settings = TaskSettings(batch_size=4, max_new_tokens=10, stop=stop)
    scores = score_task(source.model, source.tokenizer, task, settings, source.template)
    prompts = Prompts(source.tokenizer, source.template)
    assert len(prompts.stops) == 2

    def stopped(ids):
        return _cut(source.tokenizer.decode(ids), stop)[1]

    alone = [_cut(source.tokenizer.decode(greedy_ids(
        source.model, prompts.encode(prompts.text(ex.prompt)), 10, prompts.stops, stopped)),
        stop)[0] for ex in task.examples]
    assert [r["output"] for r in scores.rows] == alone
    assert len(set(alone)) > 5 and sum(len(a) for a in alone) > 20  # real, varied answers
    assert len({len(prompts.encode(prompts.text(ex.prompt))) for ex in task.examples}) == 5


def test_mlxlabs_own_transformer_batches_equal_lengths():
    """mlxlab's Transformer keeps its own cache (no merge): prompts of one length decode as one
    unpadded batch, each answer its own alone."""
    mx.random.seed(0)
    model = Transformer(vocab_size=61, dim=32, num_layers=2, num_heads=4, max_seq_len=64,
                        positions="learned")
    model.eval()
    assert not merges(model.make_cache())
    prompts = random_prompts(61, [5, 5, 3, 5, 3, 8, 5], seed=2)
    alone = one_at_a_time(model, prompts, 9, {7})
    assert greedy_batch(model, prompts, 9, {7}, batch_size=3) == alone



def test_mlxlab_eval_decodes_a_generation_task_at_its_batch_size(llama, tmp_path, capsys):
    """`mlxlab eval <model folder> gen.jsonl --batch-size N`: the same outputs at 1 and 8,
    each the prompt's one-at-a-time greedy answer."""
    from mlxlab.cli.main import main
    from mlxlab.evaluation.results import read_scores

    rows = [{"id": f"q{i}", "prompt": "Once upon a time " * (i % 4) + f"a dog {i}",
             "answer": "x"} for i in range(8)]
    task = tmp_path / "gen.jsonl"
    task.write_text("".join(json.dumps(r) + "\n" for r in rows))
    outputs = {}
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    for size in (1, 8):
        out = tmp_path / f"scores{size}"
        track = ["--uri", uri, "--json"] if size == 8 else ["--no-track"]
        assert main(["eval", str(llama.path), str(task), *track, "--batch-size", str(size),
                     "--max-new-tokens", "6", "--stop", "", "--out", str(out)]) == 0
        outputs[size] = [r["output"] for r in read_scores(out)["gen"].rows]
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # the base model's evaluation is a run of the store: where its weights came from, recorded
    from mlflow.tracking import MlflowClient

    params = MlflowClient(uri).get_run(report["run_id"]).data.params
    assert params["model_kind"] == "pretrained" and params["eval.batch_size"] == "8"
    assert params["model_source.path"] == str(llama.path)
    prompts = Prompts(llama.tokenizer)
    alone = [llama.tokenizer.decode(greedy_ids(llama.model, prompts.encode(r["prompt"]), 6,
                                               prompts.stops)) for r in rows]
    assert outputs[1] == outputs[8] == alone
    assert len(set(alone)) == len(alone)
