"""KTO: data=unpaired rows (prompt, completion, a boolean label), the KTO loss equal to
TRL's (trl 1.16 KTOTrainer._compute_loss, run here on torch CPU) with its gradient and metrics,
the mismatched pairs of TRL's KL estimate, the reference = the adapters off, and
experiment=kto_chat through the one loop (and its refusals through mlxlab-train) on a tiny random
Llama with a ChatML template."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest

from hf_helpers import save_tiny_model
from mlxlab.data.batching import Batching
from mlxlab.data.unpaired import UnpairedRows
from mlxlab.errors import ConfigError
from mlxlab.objectives.preference.kto import kto_loss
from test_preference import tree_map_params, write_jsonl

WORDS = ["cat", "dog", "sun", "tree", "ball", "milk", "red", "big", "hat", "cup"]


def rated_rows(n: int, seed: int = 0) -> list[dict]:
    """`n` rows a model can learn to tell apart: a desirable completion repeats "yes", an
    undesirable one is random words; every fourth row is conversational (TRL's form)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        prompt = " ".join(rng.choice(WORDS, 4))
        good = bool(i % 2)
        completion = (" ".join(["yes"] * int(rng.integers(2, 5))) if good
                      else " ".join(rng.choice(WORDS, int(rng.integers(2, 5)))))
        if i % 4 == 3:
            rows.append({"prompt": [{"role": "user", "content": prompt}],
                         "completion": [{"role": "assistant", "content": completion}],
                         "label": good})
        else:
            rows.append({"prompt": prompt, "completion": completion, "label": good})
    return rows


@pytest.fixture(scope="module")
def kto_model(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("kto")
    folder = save_tiny_model("llama", root / "tiny-chatml", chat="chatml")
    return {"folder": folder, "root": root,
            "train": write_jsonl(root / "train.jsonl", rated_rows(160)),
            "val": write_jsonl(root / "val.jsonl", rated_rows(32, seed=1))}


def rows_data(folder: Path, train: Path, **kwargs) -> UnpairedRows:
    data = UnpairedRows(str(train), tokenizer={"path": str(folder / "tokenizer.json")}, **kwargs)
    data.setup(None)
    return data


# --- the loss against TRL's own lines ---------------------------------------------------------

torch = pytest.importorskip("torch")
trl_kto = pytest.importorskip("trl.trainer.kto_trainer")


class _Accelerator:
    device = "cpu"

    def gather_for_metrics(self, x):
        return x


def trl_loss(per_token, kl_logps, ref_logps, ref_kl_logps, mask, labels, beta, dw, uw):
    """TRL's KTOTrainer._compute_loss, unbound, on these numbers (the reference log-probs
    precomputed, as precompute_ref_log_probs=True hands them in): (loss, metrics, d loss /
    d per-token policy log-probs). Its model call hands back `per_token` as the fused LM head's
    log-probs, its `_compute_kl_logps` the policy's mismatched-pair log-probs."""
    policy = torch.tensor(per_token, dtype=torch.float32, requires_grad=True)
    b, t = mask.shape
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=_Accelerator(),
        _compute_kl_logps=lambda model, batch: torch.tensor(kl_logps, dtype=torch.float32),
        aux_loss_enabled=False, precompute_ref_logps=True, calculate_KL=True, loss_type="kto",
        beta=beta, desirable_weight=dw, undesirable_weight=uw, _total_train_tokens=0,
        _tp_size=1, _metrics=defaultdict(lambda: defaultdict(list)))
    zeros = torch.zeros((b, t - 1))

    def model(**kwargs):
        return SimpleNamespace(log_probs=policy, entropy=zeros, mean_logits=zeros)

    inputs = {"input_ids": torch.zeros((b, t), dtype=torch.long),
              "attention_mask": torch.ones((b, t), dtype=torch.long),
              "completion_mask": torch.tensor(mask, dtype=torch.long),
              "label": torch.tensor(labels, dtype=torch.bool),
              "ref_logps": torch.tensor(ref_logps, dtype=torch.float32),
              "ref_KL_logps": torch.tensor(ref_kl_logps, dtype=torch.float32)}
    loss = trl_kto.KTOTrainer._compute_loss(trainer, model, inputs, False)
    loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss.item(), metrics, policy.grad.numpy()


def kto_case(seed: int, kl_shift: float):
    """Per-token policy log-probs of B completions (masked positions 0, as TRL's fused head
    gives them), summed reference log-probs near the policy's, and mismatched pairs' sums whose
    mean log-ratio is about `kl_shift` (> 0: the clamp does not bite; < 0: it does)."""
    rng = np.random.default_rng(seed)
    b, t = 8, 9
    lengths = rng.integers(2, t, b)
    mask = (np.arange(t)[None, :] >= t - lengths[:, None]).astype(np.int64)  # the completion
    per_token = (rng.uniform(-3, -0.05, (b, t - 1)) * mask[:, 1:]).astype(np.float32)
    sums = per_token.sum(-1)
    ref = (sums + rng.normal(0, 2.0, b)).astype(np.float32)
    kl = (sums + rng.normal(0, 1.0, b)).astype(np.float32)
    ref_kl = (kl - kl_shift + rng.normal(0, 0.3, b)).astype(np.float32)
    labels = np.array([True, False, True, True, False, False, True, False])
    return per_token, kl, ref, ref_kl, mask, labels


@pytest.mark.parametrize(("beta", "dw", "uw", "kl_shift"),
                         [(0.1, 1.0, 1.0, 0.8), (0.5, 1.33, 1.0, 0.8), (0.1, 1.0, 2.0, -0.8)])
def test_kto_loss_gradient_and_metrics_equal_trls(beta, dw, uw, kl_shift):
    per_token, kl, ref, ref_kl, mask, labels = kto_case(3, kl_shift)
    want, want_metrics, want_grad = trl_loss(per_token, kl, ref, ref_kl, mask, labels, beta,
                                             dw, uw)

    def ours(x):
        return kto_loss(x.sum(axis=-1), mx.array(kl), mx.array(ref), mx.array(ref_kl),
                        mx.array(labels.astype(np.float32)), mx.ones(len(labels)), beta, dw, uw)

    got, metrics, per_row = ours(mx.array(per_token))
    grad = mx.grad(lambda x: ours(x)[0])(mx.array(per_token))
    assert abs(got.item() - want) <= 1e-5
    np.testing.assert_allclose(np.array(grad), want_grad, rtol=1e-5, atol=1e-7)
    assert np.abs(want_grad).max() > 1e-4  # a gradient that exists
    assert (metrics["kl"].item() == 0.0) == (kl_shift < 0)  # the clamp at 0, both ways
    for name in ("kl", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        assert metrics[name].item() == pytest.approx(want_metrics[name], abs=1e-5), name
    assert metrics["rewards/margin"].item() == pytest.approx(want_metrics["rewards/margins"],
                                                             abs=1e-5)
    assert np.array(per_row).mean() == pytest.approx(want, abs=1e-5)


def test_a_padding_row_counts_nothing():
    """A row with no completion token (the masked row a rank without rows trains on) adds 0 to
    the loss, the KL estimate and the metrics."""
    per_token, kl, ref, ref_kl, mask, labels = kto_case(5, 0.8)
    args = (mx.array(kl), mx.array(ref), mx.array(ref_kl), mx.array(labels.astype(np.float32)))
    full = kto_loss(mx.array(per_token.sum(-1)), *args, mx.ones(8))
    padded = [np.concatenate([a, a[:1] + 7.0]) for a in (per_token.sum(-1), kl, ref, ref_kl)]
    more = kto_loss(mx.array(padded[0]), mx.array(padded[1]), mx.array(padded[2]),
                    mx.array(padded[3]), mx.array(np.append(labels, True).astype(np.float32)),
                    mx.array([1.0] * 8 + [0.0]))
    assert more[0].item() == pytest.approx(full[0].item(), abs=1e-6)
    for name, value in full[1].items():
        assert more[1][name].item() == pytest.approx(value.item(), abs=1e-6), name


# --- data=unpaired ----------------------------------------------------------------------------


def test_rows_render_as_chats_and_the_kl_rows_are_the_batchs_mismatched_pairs(kto_model):
    """Each row is prompt + completion in the model's template, learnt on the completion; the
    KL rows are row i's prompt with row i - 1's completion (cyclically), as TRL builds them."""
    data = rows_data(kto_model["folder"], kto_model["train"], val_file=str(kto_model["val"]))
    batch = next(iter(data.val_batches(Batching(batch_size=4))))
    index = np.array(batch["index"]).tolist()
    assert index == [0, 1, 2, 3]
    assert np.array(batch["desirable"]).tolist() == [float(r["label"]) for r in
                                                     rated_rows(32, seed=1)[:4]]
    decode = data.tokenizer.decode

    def text(prefix, r, learnt):
        ids, labels = np.array(batch[f"{prefix}input_ids"][r]), np.array(batch[f"{prefix}labels"][r])
        mask = np.array(batch[f"{prefix}loss_mask"][r]) > 0
        tokens = [int(t) for t in labels[mask]] if learnt else [int(ids[0]), *labels[:mask.argmax()]]
        return decode(tokens, skip_special_tokens=False)

    rows = rated_rows(32, seed=1)
    for r in range(4):
        completion = rows[(r - 1) % 4]["completion"]
        completion = completion if isinstance(completion, str) else completion[0]["content"]
        assert text("kl_", r, True) == completion + "<|im_end|>"
        assert text("kl_", r, False) == text("", r, False)  # the same prompt
        own = rows[r]["completion"]
        assert text("", r, True) == (own if isinstance(own, str) else own[0]["content"]) + \
            "<|im_end|>"


@pytest.mark.parametrize(("row", "match"), [
    ({"prompt": "a", "completion": "b", "label": 1}, "'label' must be true or false"),
    ({"prompt": "a", "completion": "b", "label": "yes"}, "'label' must be true or false"),
    ({"prompt": "a", "completion": "b"}, "not a JSON object with 'prompt', 'completion' and 'label'"),
])
def test_a_row_whose_label_is_not_a_boolean_is_one_line(kto_model, tmp_path, row, match):
    bad = write_jsonl(tmp_path / "bad.jsonl", [*rated_rows(2), row])
    with pytest.raises(ConfigError, match=rf"bad.jsonl:3: {match}"):
        rows_data(kto_model["folder"], bad)


# --- the reference: the adapters off ----------------------------------------------------------


def test_the_reference_is_the_model_with_its_adapters_off(kto_model):
    """At the start the policy is its reference: every reward and the KL estimate are 0 and
    each row's loss is 1 - σ(0) = 0.5. Adapters given weights move the rewards off 0 and
    change the loss; the adapters' gradient is not 0."""
    import mlx.nn as nn

    from mlxlab.models.decoders.mlx_lm_decoder import MLXLMDecoder
    from mlxlab.objectives.base import ObjectiveSetup
    from mlxlab.objectives.preference.kto import KTO
    from mlxlab.runtime.cluster.distributed import World

    data = rows_data(kto_model["folder"], kto_model["train"], val_file=str(kto_model["val"]))
    mx.random.seed(0)
    model = MLXLMDecoder(vocab_size=data.vocab_size, pretrained=str(kto_model["folder"]),
                         lora={"rank": 8, "targets": ["query", "value"]})
    batching = Batching(batch_size=8)
    objective = KTO()
    objective.setup(ObjectiveSetup(model=model, data=data, batching=batching, world=World()))
    batch = next(iter(data.val_batches(batching)))
    loss, aux = objective.loss(model, batch)
    assert loss.item() == pytest.approx(0.5, abs=1e-6) and aux["ntokens"].item() == 8
    assert aux["kl"].item() == 0.0 and abs(aux["rewards/chosen"].item()) < 1e-6
    model.update(tree_map_params(model, lambda n, p: p + 0.05 if n.endswith("lora_b") else p))
    (moved, aux), grads = nn.value_and_grad(model, objective.loss)(model, batch)
    assert moved.item() != pytest.approx(0.5, abs=1e-4)
    assert abs(aux["rewards/chosen"].item()) > 1e-3 and abs(aux["rewards/rejected"].item()) > 1e-3
    from mlx.utils import tree_flatten
    assert max(float(mx.abs(g).max()) for _, g in tree_flatten(grads)) > 0


# --- the one loop ----------------------------------------------------------------------------


def kto_args(model: dict, *extra: str) -> list[str]:
    return [f"model.pretrained={model['folder']}", f"data.train_file={model['train']}",
            f"data.val_file={model['val']}", "trainer.batch_size=8", "trainer.max_steps=24",
            "trainer.eval_every_steps=12", "trainer.log_every_steps=1",
            "trainer.schedule.warmup_steps=0", "callbacks.progress.enabled=false",
            "optimizer.learning_rate=3e-3", *extra]


def test_experiment_kto_chat_trains_and_logs_trls_metrics(kto_model, make_cfg):
    """`experiment=kto_chat` (objective=kto, data=unpaired) for 24 steps of LoRA through the one
    loop (in this process: the command line's own start is tested by the refusals below):
    every KTO metric at every step and both evaluations in MLflow, and the held-out margin
    between desirable and undesirable rewards up and above 0."""
    from mlflow.tracking import MlflowClient

    from mlxlab.train import train

    cfg = make_cfg("experiment=kto_chat", *kto_args(kto_model))
    train(cfg)
    client = MlflowClient(cfg.tracking.uri)
    (run_,) = client.search_runs([client.get_experiment_by_name(
        cfg.tracking.experiment_name).experiment_id])
    assert run_.info.status == "FINISHED" and run_.data.tags["choice.objective"] == "kto"

    def history(key: str) -> list[float]:
        return [m.value for m in sorted(client.get_metric_history(run_.info.run_id, key),
                                        key=lambda m: m.step)]

    for key in ("kl", "rewards/chosen", "rewards/rejected", "rewards/margin", "logps/chosen",
                "logps/rejected"):
        assert len(history(f"train/{key}")) == 24, key
        assert len(history(f"val/{key}")) == 2, key
    margin = history("val/rewards/margin")
    assert margin[-1] > 0 and margin[-1] > margin[0], margin


def test_kto_on_other_data_or_one_row_a_batch_is_one_line_before_anything_is_made(
        kto_model, tmp_path, cli_env):
    from one_process import each_in_one_process

    cases = [
        (["experiment=kto_chat", "data=preference"], "does not train on preference data"),
        (["experiment=kto_chat", "trainer.batch_size=1"], "trainer.batch_size=1: objective=kto"),
        (["experiment=dpo_chat", "data=unpaired"], "completions rated good or bad"),
    ]
    argvs = []
    for extra, _ in cases:
        args = [*kto_args(kto_model), *extra]
        if "data=preference" in extra or "data=unpaired" in extra:
            args = [a for a in args if not a.startswith(("data.train_file", "data.val_file"))]
            args.append(f"data.train_file={kto_model['train']}")
        argvs.append(["mlxlab-train", *args, f"hydra.run.dir={tmp_path / 'refused'}"])
    # the three in turn in one process, as python -m mlxlab.train runs each (one start, not three)
    done = each_in_one_process(argvs, cli_env, cwd=tmp_path, after="one_process:names_here")
    for (_, line), (code, stderr, left) in zip(cases, done, strict=True):
        assert code == 2, stderr[-2000:]
        assert line in stderr and "mlxlab: error:" in stderr, stderr[-2000:]
        assert "refused" not in left and "mlruns" not in left, left


@pytest.mark.slow  # three runs in subprocesses
def test_a_sigkilled_kto_run_resumes_bitwise(kto_model, tmp_path, cli_env):
    """experiment=kto_chat SIGKILLed after its checkpoint at step 5 and resumed: the weights,
    the whole MLflow history (KL and rewards included) and state.json equal an uninterrupted
    run's."""
    from test_resume import assert_resumes_bitwise

    args = [a for a in kto_args(kto_model) if not a.startswith(("trainer.max_steps",
                                                                 "trainer.eval_every"))]
    args = ["experiment=kto_chat", *args, "trainer.max_steps=10", "trainer.eval_every_steps=5",
            "checkpoint.save_every_steps=5", "checkpoint.save_every_minutes=null"]
    assert_resumes_bitwise(args, tmp_path, cli_env, "kto")
