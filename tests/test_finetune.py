"""Fine-tuning a Hugging Face checkpoint: `mlxlab train experiment=finetune_completions` with
model.pretrained=<tiny random Llama saved by transformers> trains LoRA adapters on
prompt/completion pairs, lowers the completion loss, and exports both ways: the base tensors
come back bit-identical (HF -> mlxlab -> HF in float32), and mlx-lm gives the same logits for
the adapters on the base as for the fused export."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from conftest import PYTHON
from hf_helpers import mlx_logits, save_tiny_model, torch_logits
from mlxlab.config import asset_path
from mlxlab.data.batching import Batching
from mlxlab.data.completions import PromptCompletion
from mlxlab.evaluation.file_metrics import lm_metrics
from mlxlab.export import export_run
from mlxlab.models.adapters.lora import fuse_lora
from mlxlab.models.decoders.mlx_lm_decoder import MLXLMDecoder
from mlxlab.runs import load_run_model

IDS = np.random.default_rng(3).integers(0, 500, size=(2, 24))


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory) -> dict:
    from hydra.core.global_hydra import GlobalHydra

    from mlxlab.config import compose_config
    from mlxlab.train import train

    root = tmp_path_factory.mktemp("ft")
    base = save_tiny_model("llama", root / "tiny-llama")
    pairs = root / "pairs.jsonl"
    lines = Path(asset_path("tinystories/pairs.jsonl")).read_text().splitlines()[:48]
    pairs.write_text("\n".join(lines) + "\n")
    run_dir = root / "run"
    # trained in this process (a process start less: the module reads the finished run)
    train(compose_config(root, [
        "experiment=finetune_completions", f"model.pretrained={base}", f"data.train_file={pairs}",
        "data.max_length=96", "tracking=none", "callbacks.progress.enabled=false",
        "trainer.max_steps=40", "trainer.eval_every_steps=40", "optimizer.learning_rate=3e-3",
        "trainer.batch_size=8"], output_dir=run_dir))
    GlobalHydra.instance().clear()
    return {"base": base, "run": run_dir, "pairs": pairs, "root": root}


def test_data_masks_the_prompt(finetuned):
    """Examples are <s> prompt completion </s>; only the completion and </s> are scored."""
    data = PromptCompletion(str(finetuned["pairs"]), val_fraction=0.25,
                            tokenizer={"path": str(finetuned["base"] / "tokenizer.json")})
    data.setup(None)
    tok = data.tokenizer
    rows = [json.loads(line) for line in finetuned["pairs"].read_text().splitlines()]
    batch = next(data.val_batches(Batching(batch_size=4)))
    ids, labels, mask = (np.array(batch[k]) for k in ("input_ids", "labels", "loss_mask"))
    assert (ids[:, 0] == tok.token_to_id("<s>")).all()
    for r in range(len(ids)):
        scored = labels[r][mask[r] == 1].tolist()
        assert scored[-1] == tok.token_to_id("</s>")
        completion = tok.decode(scored[:-1])
        row = next(x for x in rows if tok.decode(tok.encode(x["completion"]).ids) == completion)
        unscored = tok.decode(labels[r][: int(np.argmax(mask[r]))].tolist())
        assert unscored == row["prompt"]  # everything before the completion is the prompt


def test_lora_finetuning_lowers_the_completion_loss(finetuned):
    base = MLXLMDecoder(vocab_size=1, pretrained=str(finetuned["base"]))
    tuned, state = load_run_model(finetuned["run"])
    assert state.model_init["hf_config"]["model_type"] == "llama"
    data = PromptCompletion(str(finetuned["pairs"]), val_fraction=0.25,
                            tokenizer={"path": str(finetuned["run"] / "tokenizer.json")})
    data.setup(None)
    train = list(data.train_batches(Batching(batch_size=8), 0))
    before, after = lm_metrics(base, train)["loss"], lm_metrics(tuned, train)["loss"]
    assert after < 0.9 * before, (before, after)


def test_adapters_and_fused_exports_agree_in_mlx_lm(finetuned, tmp_path):
    import mlx_lm
    from transformers import AutoModelForCausalLM

    adapters_dir, fused_dir = tmp_path / "adapters", tmp_path / "fused"
    report = export_run(finetuned["run"], adapters_dir, "mlx-lm", "float32", lora="adapters")
    export_run(finetuned["run"], fused_dir, "hf", "float32", lora="fuse")
    assert report["lora"] == "adapters"
    config = json.loads((adapters_dir / "adapters" / "adapter_config.json").read_text())
    assert config["lora_parameters"]["keys"] == [
        "self_attn.k_proj", "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj"]
    # HF -> mlxlab -> HF: the frozen base comes back bit-identical, with the same config
    original = mx.load(str(finetuned["base"] / "model.safetensors"))
    exported = mx.load(str(adapters_dir / "model.safetensors"))
    assert original.keys() == exported.keys()
    assert all(mx.array_equal(original[k], exported[k]).item() for k in original)
    written = json.loads((adapters_dir / "config.json").read_text())
    source = json.loads((finetuned["base"] / "config.json").read_text())
    assert (written["rope_theta"], written["rope_scaling"]) == (source["rope_theta"],
                                                                source["rope_scaling"])
    # the adapters on the base in mlx-lm = the fused export in mlx-lm = mlxlab's model
    with_adapters, _ = mlx_lm.load(str(adapters_dir), adapter_path=str(adapters_dir / "adapters"))
    fused, _ = mlx_lm.load(str(fused_dir))
    tuned, _ = load_run_model(finetuned["run"])
    a, f = (np.array(m(mx.array(IDS))) for m in (with_adapters, fused))
    ours = mlx_logits(tuned, IDS)
    # mlx-lm's LoRA layer computes what ours does: same logits to 1e-4
    assert np.abs(a - ours).max() <= 1e-4
    # the fused export = mlxlab's own fused model
    assert np.abs(f - mlx_logits(fuse_lora(tuned), IDS)).max() <= 1e-4
    # fusing W + scale * A @ B rounds differently from adding scale * (x A) B, and a random
    # model amplifies that at a few positions: fused and unfused agree to 1e-4 of the logits'
    # size (typically to 1e-6)
    assert np.abs(f - a).max() <= 1e-4 * np.abs(a).max()
    assert np.median(np.abs(f - a)) <= 1e-5
    assert np.abs(ours - mlx_logits(MLXLMDecoder(1, pretrained=str(finetuned["base"])), IDS)).max() > 1e-2
    hf = AutoModelForCausalLM.from_pretrained(fused_dir).eval()
    assert np.abs(torch_logits(hf, IDS) - f).max() <= 1e-4  # the fused export, in transformers
    for name in ("tokenizer_config.json", "tokenizer.json"):
        assert (fused_dir / name).read_bytes() == (finetuned["base"] / name).read_bytes()
    done = subprocess.run(
        [PYTHON, "-m", "mlx_lm", "generate", "--model", str(adapters_dir), "--adapter-path",
         str(adapters_dir / "adapters"), "--prompt", "Once upon a time", "--max-tokens", "8"],
        capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("kind", ["qwen2", "mistral"])
def test_round_trip_is_bit_identical(kind, tmp_path):
    """HF -> mlxlab (a LoRA run: the base stays frozen) -> HF: tied embeddings and q/k/v biases
    (qwen2), grouped-query attention (mistral) come back as the same tensors and config."""
    from hydra.core.global_hydra import GlobalHydra

    from conftest import compose_cfg
    from mlxlab.train import train

    base = save_tiny_model(kind, tmp_path / kind)
    cfg = compose_cfg(tmp_path, [
        "experiment=finetune_completions", f"model.pretrained={base}", "tracking=none",
        "callbacks.progress.enabled=false", "trainer.max_steps=2", "trainer.eval_every_steps=2",
        "data.max_length=64",
    ])
    train(cfg)
    GlobalHydra.instance().clear()
    out = tmp_path / "out"
    export_run(cfg.paths.output_dir, out, "hf" if kind == "qwen2" else "mlx-lm",
               lora="fuse" if kind == "qwen2" else "adapters")
    original = mx.load(str(base / "model.safetensors"))
    exported = mx.load(str(out / "model.safetensors"))
    assert original.keys() == exported.keys()
    if kind == "mistral":  # the base without the adapters
        assert all(mx.array_equal(original[k], exported[k]).item() for k in original)
    else:  # fused: only the LoRA-wrapped projections changed
        same = {k for k in original if mx.array_equal(original[k], exported[k]).item()}
        assert {k for k in original if "self_attn" not in k or "bias" in k} <= same
        assert "lm_head.weight" not in exported  # tied
    source = json.loads((base / "config.json").read_text())
    written = json.loads((out / "config.json").read_text())
    assert {k: v for k, v in written.items() if k not in ("dtype", "torch_dtype")} == \
        {k: v for k, v in source.items() if k not in ("dtype", "torch_dtype")}


def test_text_fine_tuning_documents_carry_bos_and_eos(finetuned):
    """finetune_text packs documents as <s> text </s> with the checkpoint's tokenizer."""
    from mlxlab.data.streaming import StreamingText

    data = StreamingText(source={"data_files": asset_path("tinystories/sample.txt")},
                         splits={"val_examples": 0}, packing={"seq_len": 64}, shuffle_buffer=0,
                         tokenizer={"path": str(finetuned["base"] / "tokenizer.json")})
    data.setup(None)
    batch = next(data.train_batches(Batching(batch_size=2), 0))
    ids = np.array(batch["input_ids"])[0].tolist()
    bos, eos = data.tokenizer.token_to_id("<s>"), data.tokenizer.token_to_id("</s>")
    assert ids[0] == bos and data.eot_id == eos
    if eos in ids:
        assert ids[ids.index(eos) + 1] == bos


def test_presets_without_a_checkpoint_fail_in_one_line(tmp_path):
    done = subprocess.run(
        [PYTHON, "-m", "mlxlab.cli.main", "train", "experiment=finetune_text", "tracking=none",
         f"paths.root_dir={tmp_path}", f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "mlxlab: error: model.pretrained must be set: add "
        "model.pretrained=/path/to/hf_model_folder to the command line"]


def test_quantized_base_with_adapters_reports_what_mlx_lm_computes(finetuned, tmp_path):
    """--adapters --quantize 4: a 4-bit base plus float adapters (QLoRA-style); the perplexity
    reported is mlx-lm's own for that pair on the run's validation data."""
    import mlx_lm

    from mlxlab.export.quality import validation_batches

    out = tmp_path / "q4"
    report = export_run(finetuned["run"], out, "mlx-lm", "float32", quantize=4, lora="adapters")
    model, _ = mlx_lm.load(str(out), adapter_path=str(out / "adapters"))
    _, state = load_run_model(finetuned["run"])
    theirs = lm_metrics(model, validation_batches(state, finetuned["run"] / "tokenizer.json"))
    assert theirs["perplexity"] == pytest.approx(report["after"]["perplexity"], rel=1e-4)
    assert report["after"]["perplexity"] != report["before"]["perplexity"]


def test_pretrained_folder_problems_are_named(tmp_path):
    from hydra.core.global_hydra import GlobalHydra

    from conftest import compose_cfg
    from mlxlab.errors import UserError
    from mlxlab.runs import use_pretrained_tokenizer

    (tmp_path / "no-tokenizer").mkdir()
    for folder, message in [("missing", "no such folder or file; give a local"),
                            ("no-tokenizer", "has no tokenizer.json")]:
        cfg = compose_cfg(tmp_path, ["experiment=finetune_text",
                                     f"model.pretrained={tmp_path / folder}"])
        with pytest.raises(UserError, match=message):
            use_pretrained_tokenizer(cfg)
        GlobalHydra.instance().clear()
