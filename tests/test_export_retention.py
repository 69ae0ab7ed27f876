"""An export that changes the weights is read back from what it wrote and judged against the run
and its base (export/retention.py): kept share of the gain, the paired verdict, the refusal that
leaves nothing behind, --accept-loss, and the record on the run's MLflow run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hf_helpers import save_tiny_model
from mlxlab.export import ExportError, export_gguf, export_run
from mlxlab.export.retention import Column, Retention, _kept


def snap_to_q4_1(folder: Path) -> None:
    """The folder's matrices put on GGUF Q4_1's grid (4-bit, 32 weights a block, float16 scale
    and minimum), as a float folder made from a Q4_1 file holds them."""
    import mlx.core as mx

    file = folder / "model.safetensors"
    weights = mx.load(str(file))
    for name, w in weights.items():
        if w.ndim == 2 and w.shape[1] % 32 == 0:
            q, scales, biases = mx.quantize(w, group_size=32, bits=4)
            scales, biases = (a.astype(mx.float16).astype(mx.float32) for a in (scales, biases))
            weights[name] = mx.dequantize(q, scales, biases, group_size=32, bits=4).astype(w.dtype)
    mx.save_safetensors(str(file), weights, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> dict:
    """A small LoRA fine-tune (a fixed completion after varied prompts) of a tiny random llama
    whose weights sit on a 4-bit grid, as a model fine-tuned from a Q4_1 GGUF does; tracked in a
    sqlite MLflow store."""
    from hydra.core.global_hydra import GlobalHydra

    from mlxlab.config import compose_config
    from mlxlab.train import train

    root = tmp_path_factory.mktemp("retention")
    base = save_tiny_model("llama", root / "tiny-llama")
    snap_to_q4_1(base)
    words = ["Once", "upon", "a", "time", "there", "was", "a", "little", "girl", "who", "liked",
             "to", "play", "in", "the", "park"]
    rng = np.random.default_rng(0)
    rows = [{"prompt": " ".join(rng.choice(words, 6)), "completion": " there was a little girl."}
            for _ in range(160)]
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_dir = root / "run"
    # trained in this process (a process start less: the exports below run as users run them)
    train(compose_config(root, [
        "experiment=finetune_completions", f"model.pretrained={base}", f"data.train_file={pairs}",
        "data.max_length=32", "tracking.background=false", "callbacks.progress.enabled=false",
        "trainer.max_steps=40", "trainer.eval_every_steps=40", "optimizer.learning_rate=1e-3",
        "trainer.batch_size=8"], output_dir=run_dir))
    GlobalHydra.instance().clear()
    return {"run": run_dir, "root": root, "uri": f"sqlite:///{root}/mlruns/mlflow.db"}


def test_kept_is_the_share_of_the_gain_and_its_verdict_is_paired():
    """kept = (export - base) / (run - base); right/wrong scores go through McNemar's test,
    and a significant loss below 95 % of the gain is `lost`."""
    rng = np.random.default_rng(0)
    base = Column(np.zeros(200), binary=True)
    run = Column((rng.random(200) < 0.9).astype(float), binary=True)
    half = run.values.copy()
    half[np.flatnonzero(half)[: int(half.sum()) // 2]] = 0.0  # half the right answers lost
    k = _kept("task/exact_match", run, Column(half, binary=True), base)
    assert k.kept == pytest.approx(0.5) and k.kept_low < 0.5 < k.kept_high
    assert k.test.startswith("McNemar") and k.p < 1e-6 and k.lost
    same = _kept("task/exact_match", run, run, base)
    assert same.kept == 1.0 and same.p == 1.0 and not same.lost
    one = run.values.copy()
    one[np.flatnonzero(one)[0]] = 0.0  # one answer lost: not significant
    assert not _kept("task/exact_match", run, Column(one, binary=True), base).lost
    loss = _kept("val/loss", Column(np.full(50, 1.0), False), Column(np.full(50, 1.5), False),
                 Column(np.full(50, 3.0), False))
    assert loss.kept == pytest.approx(0.75)  # lower is better: (3 - 1.5) / (3 - 1)


def test_kept_interval_leaves_out_resamples_where_the_run_is_worse_than_the_base():
    """A small, noisy gain: some resamples have the run worse than the base, where the ratio's
    sign flips. They are left out (no gain there to keep), so an export never worse than the
    base on any example has no negative share in its interval; lower-is-better alike."""
    rng = np.random.default_rng(1)
    base = np.zeros(40)
    run = rng.normal(0.05, 1.0, 40)  # a gain of ~0.05 under noise of 1
    export = np.maximum(base, run) * 0.5 + 0.01  # never below the base, example by example
    k = _kept("val/accuracy", Column(run), Column(export), Column(base))
    assert k.kept is not None and k.kept_low >= 0.0
    loss = _kept("val/loss", Column(-run, False), Column(-export, False), Column(-base, False))
    assert loss.kept_low >= 0.0 and loss.kept_low == pytest.approx(k.kept_low)


def test_several_measures_are_holm_adjusted_before_a_loss_is_called():
    """Two measures each with p ~ 0.031 (McNemar, 6 answers only the run got right) are
    each below 0.05 alone but not after Holm's correction over the two: not lost; one alone is."""
    from mlxlab.export.retention import judge_scores

    run = np.zeros(40)
    run[:20] = 1.0
    export = run.copy()
    export[:6] = 0.0  # 6 right answers lost: kept 70 %, p = 2 / 2**6
    scores = {name: Column(run, binary=True) for name in ("a/exact_match", "b/exact_match")}
    exported = {name: Column(export, binary=True) for name in scores}
    base = {name: Column(np.zeros(40), binary=True) for name in scores}
    alone = judge_scores({"a/exact_match": scores["a/exact_match"]}, base, exported)
    assert alone[0].p == pytest.approx(0.03125) and alone[0].lost
    both = judge_scores(scores, base, exported)
    assert [k.p_holm for k in both] == [pytest.approx(0.0625)] * 2
    assert not any(k.lost for k in both) and "Holm-adjusted 0.0625" in both[0].line()


def test_a_4bit_fused_export_that_loses_the_gain_is_refused_and_leaves_nothing(lora_run,
                                                                               tmp_path):
    """The written folder is read back (mlx-lm's loader) and scored on the run's validation
    rows against the run and the base (adapters off); a significant loss is refused in one
    line naming what keeps the gain, and the folder is not moved into place."""
    out = tmp_path / "q4"
    with pytest.raises(ExportError, match=r"^refused: the written file loses the fine-tune's "
                       r"gain: val/\w+: .*--adapters.*--accept-loss writes it anyway$"):
        export_run(lora_run["run"], out, "mlx-lm", "float32", quantize=4)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".q4")]


def test_accept_loss_writes_it_and_records_the_verdict_on_the_run(lora_run, tmp_path):
    from mlflow import MlflowClient

    out = tmp_path / "q4-accepted"
    report = export_run(lora_run["run"], out, "mlx-lm", "float32", quantize=4,
                        retention=Retention(accept_loss=True))
    entry = report["retention"]
    assert entry["verdict"] == "lost" and entry["accepted_loss"] and entry["lost"]
    assert entry["base"] == "the run with its adapters off"
    assert json.loads((out / "export_report.json").read_text())["retention"]["lost"] == \
        entry["lost"]
    loss = next(m for m in entry["measures"] if m["measure"] == "val/loss")
    assert loss["base"] > loss["run"] and loss["lost"]  # the fine-tune gained; the file lost
    assert entry["recorded"] == "on the run's MLflow run"
    client = MlflowClient(tracking_uri=lora_run["uri"])
    (run,) = client.search_runs(client.get_experiment_by_name("finetune_completions")
                                .experiment_id)
    kept = run.data.metrics[f"export/{out.name}/val/loss/kept"]
    assert kept == pytest.approx(loss["kept"])
    artifact = client.download_artifacts(run.info.run_id, f"exports/{out.name}/retention.json",
                                         str(tmp_path))
    assert json.loads(Path(artifact).read_text())["lost"] == entry["lost"]


@pytest.mark.slow  # two more exports; the benchmark measures it on SmolLM2
def test_adapters_on_the_quantized_base_keep_more_than_the_fused_file(lora_run, tmp_path):
    """--adapters --quantize 4 (the base quantized, the adapters as trained) is read back with
    mlx-lm's own load_adapters; it keeps more of the gain than fusing before quantizing."""
    fused = export_run(lora_run["run"], tmp_path / "fused", "mlx-lm", "float32", quantize=4,
                       retention=Retention(accept_loss=True))["retention"]
    apart = export_run(lora_run["run"], tmp_path / "apart", "mlx-lm", "float32", quantize=4,
                       lora="adapters", retention=Retention(accept_loss=True))["retention"]

    def kept(entry: dict) -> float:
        return next(m["kept"] for m in entry["measures"] if m["measure"] == "val/loss")

    assert kept(apart) > kept(fused)


def test_gguf_is_judged_from_the_file_and_a_refusal_leaves_no_file(lora_run, tmp_path):
    """The .gguf is read back by mlxlab's GGUF reader: Q8_0 keeps the gain (its logits' gap to
    the fine-tune measured from the file); Q4_1, the grid the base came from, rounds most of
    the adapters' change away and is refused with no .gguf or Modelfile left."""
    report = export_gguf(lora_run["run"], tmp_path / "ft.gguf", "q8_0")
    assert report["retention"]["verdict"] == "kept"
    assert report["file_check"]["status"] == "measured"
    assert 0 < report["file_check"]["max_abs_logit_gap"] < 0.1 * report["file_check"][
        "logit_scale"]
    with pytest.raises(ValueError, match=r"^refused: the written file loses the fine-tune's "
                       r"gain: .*--format gguf --adapters"):
        export_gguf(lora_run["run"], tmp_path / "q4.gguf", "q4_1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ft.Modelfile", "ft.gguf"]


def test_tasks_on_an_export_that_changes_nothing_is_an_error(lora_run, tmp_path, monkeypatch,
                                                             capsys):
    """In-process (test_export and others run `mlxlab export` as a process of its own)."""
    from mlxlab.cli.main import main

    task = tmp_path / "t.jsonl"
    task.write_text(json.dumps({"prompt": "Once upon a", "answer": " time"}) + "\n")
    monkeypatch.chdir(tmp_path)
    assert main(["export", str(lora_run["run"]), "--format", "mlx-lm", "--dtype", "float32",
                 "--tasks", str(task), "--out", str(tmp_path / "f32")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        "mlxlab export: error: --tasks judges an export that changes the weights")
    assert not (tmp_path / "f32").exists()


@pytest.mark.parametrize("method", ["gptq", pytest.param("awq", marks=pytest.mark.slow)])
def test_calibrated_quantizers_fit_the_calibration_rows_better(method, tmp_path):
    """mlx_lm.quant's GPTQ and AWQ on rows of our own (no download): the layers come out
    quantized as mlx-lm loads them, and the model's outputs on the calibration rows sit closer
    to the float model's than round-to-nearest's do (what calibrating is for)."""
    import mlx.core as mx
    import mlx.nn as nn

    from mlxlab.export.mlx_lm import quantize
    from mlxlab.export.retention import read_folder

    folder = save_tiny_model("llama", tmp_path / "llama", hidden_size=128,
                             intermediate_size=256, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2)
    rows = mx.array(np.random.default_rng(0).integers(3, 500, size=(16, 64)))
    reference = read_folder(folder)(rows)
    errors = {}
    for m in ("rtn", method):
        model = read_folder(folder)
        config = quantize(model, 4, method=m, calibration=rows)
        assert config["bits"] == 4 and config["group_size"] == 64
        assert isinstance(model.lm.model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
        errors[m] = float(mx.abs(model(rows) - reference).mean())
    assert errors[method] < errors["rtn"]


def test_a_calibrated_method_without_its_quantization_is_an_error(lora_run, tmp_path):
    with pytest.raises(ExportError, match=r"^--quantize-method gptq calibrates mlx-lm's "
                       r"quantization: add --format mlx-lm --quantize 4"):
        export_run(lora_run["run"], tmp_path / "g", "mlx-lm", "float32",
                   quantize_method="gptq")
    with pytest.raises(ExportError, match=r"groups of 64 inputs; .* has \d+: use "
                       r"--quantize-method rtn$"):
        export_run(lora_run["run"], tmp_path / "g", "mlx-lm", "float32", quantize=4,
                   quantize_method="gptq")
    assert not (tmp_path / "g").exists()


@pytest.mark.slow  # lm-eval's start-up and three scorings
def test_lm_eval_tasks_are_paired_per_document(lora_run, tmp_path):
    """--tasks takes lm-eval's task YAMLs (scored through lm-eval on mlxlab's lm-eval model):
    each document's accuracy is paired between the run, the base and the file."""
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location(
        "bench_lm_eval", REPO / "benchmarks" / "parity" / "bench_lm_eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tasks = module.write_tasks(tmp_path / "tasks", 12)
    mc = next(t for t in tasks if t.endswith("tiny_mc.yaml"))
    report = export_run(lora_run["run"], tmp_path / "q8", "mlx-lm", "float32", quantize=8,
                        retention=Retention(tasks=[mc], accept_loss=True))
    acc = next(m for m in report["retention"]["measures"] if m["measure"] == "tiny_mc/acc")
    assert acc["n"] == 12 and acc["test"].startswith("McNemar")
    assert report["retention"]["tasks"] == [mc]


@pytest.mark.parametrize("call, message", [
    pytest.param(lambda run, out: export_run(run, out, "mlx-lm", quantize=4,
                                             retention=Retention(tasks=["no_such_task"])),
                 r"^'no_such_task' is neither a jsonl task file nor an lm-eval task",
                 marks=pytest.mark.slow),  # lm-eval indexes its ~10k tasks first (20 s)
    (lambda run, out: export_run(run, out, "mlx-lm", quantize=4,
                                 retention=Retention(tasks=["/nowhere/t.jsonl"])),
     r"^task file not found: /nowhere/t.jsonl"),
    (lambda run, out: export_gguf(run, out.with_suffix(".gguf"), "q4_k_m", imatrix_rows=-1),
     r"^--imatrix-rows -1: give the number of training rows"),
])
def test_bad_retention_settings_are_one_line_before_anything_is_written(call, message,
                                                                        lora_run, tmp_path):
    with pytest.raises((ValueError, FileNotFoundError), match=message):  # the CLI's two
        call(lora_run["run"], tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_a_bfloat16_model_written_float16_is_a_change_and_an_overflow_is_refused(tmp_path):
    """float16 holds neither bfloat16's range nor the other way round its precision: a
    bfloat16 model written --dtype float16 (the same byte size) changes its weights and is
    judged; a weight past 65,504 would be written as inf, so it is refused by name."""
    import mlx.core as mx

    from mlxlab.export.judgement import changes_weights as _changes_weights
    from mlxlab.export.judgement import refuse_overflow as _refuse_overflow
    from mlxlab.models.decoders.mlx_lm_decoder import MLXLMDecoder

    model = MLXLMDecoder(vocab_size=1, pretrained=str(save_tiny_model("llama", tmp_path / "t")))
    model.set_dtype(mx.bfloat16)
    assert _changes_weights(model, "float16", None, "hf", "fuse")
    assert not _changes_weights(model, "bfloat16", None, "hf", "fuse")
    assert not _changes_weights(model, "float32", None, "mlx-lm", "fuse")  # holds both
    _refuse_overflow(model, "float16")  # nothing past float16's range: no refusal
    embedding = model.lm.model.embed_tokens
    embedding.weight = mx.concatenate([mx.full((1, embedding.weight.shape[1]), 1e5,
                                               dtype=mx.bfloat16), embedding.weight[1:]])
    with pytest.raises(ExportError, match=r"^--dtype float16: .*embed_tokens.weight holds "
                       r"99840, past float16's largest value 65,504 .*--dtype bfloat16 or "
                       r"float32$"):
        _refuse_overflow(model, "float16")
    _refuse_overflow(model, "bfloat16")


def test_a_draft_export_honours_accept_loss_and_tasks(lora_run, tmp_path):
    """--draft judges the run's file as export_gguf does, with the options given: q4_1 (which
    loses the gain, above) is written with --accept-loss, its verdict recorded; a refusal
    leaves none of the four files."""
    from mlxlab.export.speculative import export_gguf_with_draft

    draft = save_tiny_model("llama", tmp_path / "draft", seed=1, num_hidden_layers=1)
    out = tmp_path / "out" / "ft.gguf"
    with pytest.raises(ValueError, match=r"^refused: the written file loses"):
        export_gguf_with_draft(lora_run["run"], draft, out, "q4_1")
    assert not out.parent.exists() or not any(out.parent.iterdir())
    report = export_gguf_with_draft(lora_run["run"], draft, out, "q4_1",
                                    retention=Retention(accept_loss=True))
    assert report["retention"]["accepted_loss"] and report["retention"]["read_back"] == str(out)
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "ft.Modelfile", "ft.draft.gguf", "ft.gguf", "ft.llama-server.sh"]


@pytest.mark.slow  # a training run (~15 s on a loaded box)
def test_float16_of_a_weight_past_its_range_is_one_line_exit_2_and_no_folder(tmp_path, capsys):
    """A run whose base holds a weight past 65,504 (here an embedding entry of a token the
    data never uses) exported --dtype float16 is refused in one line naming the weight; nothing
    is left at --out. bfloat16 holds it: that export is written."""
    import mlx.core as mx

    from mlxlab.cli.main import main
    from test_mlx_lm_decoders import train_chat

    folder = save_tiny_model("llama", tmp_path / "tiny", chat="chatml")
    weights = mx.load(str(folder / "model.safetensors"))
    table = weights["model.embed_tokens.weight"]
    weights["model.embed_tokens.weight"] = mx.concatenate(
        [table[:-1], mx.full((1, table.shape[1]), 1e5, dtype=table.dtype)])  # the last id
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "pt"})
    _, run = train_chat(folder, tmp_path / "train", "eval.tasks=[]", "trainer.max_steps=1",
                        "trainer.eval_every_steps=1")
    out = tmp_path / "f16"
    capsys.readouterr()
    assert main(["export", str(run), "--format", "mlx-lm", "--dtype", "float16",
                 "--out", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mlxlab export: error: --dtype float16: "), lines
    assert "model.embed_tokens.weight holds 100000, past float16's largest" in lines[0]
    assert not out.exists()
    assert main(["export", str(run), "--format", "mlx-lm", "--dtype", "bfloat16", "--accept-loss",
                 "--out", str(tmp_path / "bf16")]) == 0
