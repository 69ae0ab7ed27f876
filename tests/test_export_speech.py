"""`mlxlab export` of a Whisper (export/speech/): a tiny random Whisper folder and a few-step
LoRA run written as transformers' folder and as mlx-whisper's, then opened by the tools
themselves here, apart from the export's own proof: transformers' WhisperForConditional-
Generation + WhisperProcessor transcribe as mlxlab does, mlx_whisper.transcribe on the
mlx-whisper folder (a tiny Whisper on OpenAI's vocabulary, which mlx-whisper decodes with)
too; bad input is one line, exit 2, nothing written."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

from mlxlab.cli.export import main as export_main
from mlxlab.export.hf import ExportError
from mlxlab.export.speech import export_whisper
from whisper_fixtures import tone, whisper_folder

NEW = 12


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return whisper_folder(tmp_path_factory.mktemp("speech-export") / "whisper")


def _mlxlab(folder):
    from mlxlab.data.speech import load_whisper_tokenizer
    from mlxlab.models.speech.whisper import WhisperModel

    model = WhisperModel(pretrained=str(folder))
    model.eval()
    return model, load_whisper_tokenizer(folder)


def _transformers_transcript(folder, audio, prompt_tokens):
    """transformers' greedy transcript of `audio` from the folder alone (its model, processor
    and generation config), the prompt given as decoder_input_ids."""
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor
    from transformers.generation.utils import GenerationMixin

    model = WhisperForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    processor = WhisperProcessor.from_pretrained(folder)
    feats = processor(audio, sampling_rate=16000, return_tensors="pt").input_features
    prompt = processor.tokenizer.convert_tokens_to_ids(prompt_tokens)
    with torch.no_grad():
        out = GenerationMixin.generate(model, feats, decoder_input_ids=torch.tensor([prompt]),
                                       max_new_tokens=NEW, do_sample=False, num_beams=1)
    return processor.tokenizer.decode(out[0, len(prompt):], skip_special_tokens=True).strip()


def test_hf_export_transcribes_as_mlxlab_in_transformers(small, tmp_path, capsys):
    from mlxlab.data.audio_features import log_mel
    from mlxlab.decoding.transcription import transcribe

    out = tmp_path / "hf"
    assert export_main([str(small), "--format", "hf", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "checked in transformers" in printed
    weights = mx.load(str(out / "model.safetensors"))
    source = mx.load(str(small / "model.safetensors"))
    assert set(weights) == set(source)  # transformers' names; the tied proj_out not stored
    for name, value in source.items():
        assert mx.array_equal(weights[name], value), name
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["WhisperForConditionalGeneration"]
    for name in ("generation_config.json", "preprocessor_config.json", "tokenizer.json"):
        assert (out / name).read_bytes() == (small / name).read_bytes()
    model, tokenizer = _mlxlab(small)
    audio = tone(1.5, 660, seed=5)
    ours = transcribe(model, tokenizer, log_mel(audio, 80)[None], max_new_tokens=NEW)[0]
    prompt = ["<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>"]
    assert _transformers_transcript(out, audio, prompt) == ours
    report = json.loads((out / "export_report.json").read_text())
    assert report["check"]["status"] == "checked"
    assert report["check"]["max_abs_logit_gap"] <= report["check"]["allowed_gap"]
    card = (out / "README.md").read_text()
    assert "library_name: transformers" in card and "## Export check" in card


@pytest.mark.parametrize("argv, says", [
    (["--format", "gguf"], "--format gguf does not take a Whisper model"),
    (["--format", "mlx-lm"], "--format mlx-lm does not take a Whisper model"),
    (["--format", "peft"], "--format peft does not take a Whisper model"),
    (["--format", "hf", "--quantize", "4"], "--quantize does not apply to --format hf"),
    (["--format", "mlx-whisper", "--quantize", "7"], "takes 2, 3, 4, 5, 6, 8 bits"),
    (["--format", "mlx-whisper"], "mlx-whisper decodes with OpenAI's Whisper vocabulary"),
    (["--format", "hf", "--tasks", "x.jsonl"], "--tasks does not apply to a Whisper export"),
])
def test_bad_input_is_one_line_and_writes_nothing(small, tmp_path, capsys, argv, says):
    out = tmp_path / "out"
    assert export_main([str(small), *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mlxlab export: error: ") and "\n" not in err and says in err, err
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_out_a_file_or_a_full_folder(small, tmp_path, capsys):
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    assert export_main([str(small), "--format", "hf", "--out", str(full)]) == 2
    assert "is not empty: pick a new --out or pass --overwrite" in capsys.readouterr().err
    assert [p.name for p in full.iterdir()] == ["keep.txt"]
    afile = tmp_path / "file"
    afile.write_text("mine")
    assert export_main([str(small), "--format", "hf", "--out", str(afile), "--overwrite"]) == 2
    assert "is a file" in capsys.readouterr().err and afile.read_text() == "mine"


def test_mlx_whisper_on_another_model_is_refused(tiny_lm_run, tmp_path, capsys):
    run_dir = tiny_lm_run[0]
    out = tmp_path / "out"
    assert export_main([str(run_dir), "--format", "mlx-whisper", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "is not a Whisper model" in err and "\n" not in err
    assert not out.exists()


def test_mlx_whisper_names_are_the_inverse_of_the_loaders(small):
    """mlx-whisper's names and axes written here, read back by whisper_folder's renaming,
    are the model's own tensors (the encoder's sinusoids, which mlx-whisper computes, aside)."""
    from mlx.utils import tree_flatten

    from mlxlab.export.speech.mlx_whisper_folder import mlx_whisper_weights
    from mlxlab.models.speech.whisper_folder import rename_mlx_whisper

    model, _ = _mlxlab(small)
    written = mlx_whisper_weights(model, "float32")
    assert written["encoder.conv1.weight"].shape == (64, 3, 80)  # (out, kernel, in)
    assert "decoder.blocks.1.cross_attn.key.weight" in written
    back = rename_mlx_whisper(written)
    own = dict(tree_flatten(model.parameters()))
    assert set(own) - set(back) == {"model.encoder.embed_positions.weight"}
    for name, value in back.items():
        assert mx.array_equal(value, own[name]), name


def test_a_wrong_layout_is_refused_and_leaves_nothing(small, tmp_path, monkeypatch):
    """The proof is what stands between a wrong writer and --out: q and k swapped in every
    attention refuse the export in transformers' logits."""
    from mlxlab.export.speech import hf_folder

    right = hf_folder.whisper_hf_weights

    def swapped(model, dtype):
        weights = right(model, dtype)
        return {n.replace("q_proj", "@").replace("k_proj.weight", "q_proj.weight")
                .replace("@", "k_proj") if "self_attn" in n and n.endswith(".weight") else n: v
                for n, v in weights.items()}

    monkeypatch.setattr(hf_folder, "whisper_hf_weights", swapped)
    out = tmp_path / "hf"
    with pytest.raises(ExportError, match="refused: transformers"):
        export_whisper(small, out, "hf")
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def openai_vocab(tmp_path_factory):
    pytest.importorskip("mlx_whisper")
    from whisper_vocab_fixtures import openai_vocab_folder

    return openai_vocab_folder(tmp_path_factory.mktemp("openai-vocab") / "whisper")


@pytest.mark.slow
def test_mlx_whisper_export_transcribes_as_mlxlab_in_mlx_whisper(openai_vocab, tmp_path, capsys):
    import mlx_whisper

    from mlxlab.decoding.transcription import transcribe
    from mlxlab.export.speech.mlx_whisper_proof import mlx_whisper_features

    out = tmp_path / "mlx"
    assert export_main([str(openai_vocab), "--format", "mlx-whisper", "--out", str(out)]) == 0
    assert "checked in mlx-whisper" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["n_vocab"] == 51865 and config["n_mels"] == 80 and "quantization" not in config
    written, tokenizer = _mlxlab(out)  # mlxlab reads its own export back: float16 values
    written.set_dtype(mx.float32)
    assert json.loads((out / "export_report.json").read_text())["dtype"] == "float16"
    audio = tone(2.0, 500, seed=7)
    ours = transcribe(written, tokenizer, mlx_whisper_features(audio, written),
                      max_new_tokens=NEW)[0]
    theirs = mlx_whisper.transcribe(audio, path_or_hf_repo=str(out), temperature=0.0,
                                    without_timestamps=True, condition_on_previous_text=False,
                                    compression_ratio_threshold=None, logprob_threshold=None,
                                    no_speech_threshold=None, language="en", fp16=False,
                                    sample_len=NEW)
    assert theirs["text"].strip() == ours and ours
    model, _ = _mlxlab(openai_vocab)  # the source: the export holds its values in float16
    feats = mx.array(mlx_whisper_features(audio, model))
    ids = mx.array([[50258, 50259, 50359, 50363, 400, 1000]])
    ours, theirs = np.array(written(feats, ids)), np.array(model(feats, ids))
    # float16's rounding of weights of std 0.3 moves these logits ~1e-3 of their scale
    assert np.abs(ours - theirs).max() < 5e-3 * np.abs(theirs).max()


@pytest.mark.slow
def test_quantized_mlx_whisper_export_loads_quantized(openai_vocab, tmp_path):
    import mlx.nn as nn
    from mlx_whisper.load_models import load_model

    from mlxlab.export.hf import ExportError

    with pytest.raises(ExportError, match="judged on the run's transcribed utterances"):
        export_whisper(openai_vocab, tmp_path / "judged", "mlx-whisper", quantize=4)
    assert not (tmp_path / "judged").exists()
    out = tmp_path / "q4"  # --no-check: written, not judged
    report = export_whisper(openai_vocab, out, "mlx-whisper", quantize=4, check=False)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == {"group_size": 64, "bits": 4}
    weights = mx.load(str(out / "weights.safetensors"))
    assert weights["decoder.blocks.0.attn.query.weight"].dtype == mx.uint32
    assert "decoder.blocks.0.attn.query.scales" in weights
    assert weights["decoder.positional_embedding"].dtype == mx.float16  # not quantized
    model = load_model(str(out), dtype=mx.float32)
    assert isinstance(model.decoder.blocks[0].mlp1, nn.QuantizedLinear)
    assert report["check"]["status"] == "unchecked"
    assert report["retention"]["status"] == "not judged"
    assert "library_name: mlx" in (out / "README.md").read_text()


@pytest.mark.slow
def test_a_quantized_mlx_whisper_export_of_a_run_is_judged_by_word_error_rate(openai_vocab,
                                                                             tmp_path):
    """A run scored on eval.tasks, exported 4-bit to mlx-whisper: mlx-whisper's transcripts
    of the task's utterances are paired with the run's and its adapters-off base's; the
    judgement is in the report (written with --accept-loss whatever it found)."""
    from hydra.core.global_hydra import GlobalHydra

    from conftest import compose_cfg
    from mlxlab.train import train
    from speech_fixtures import utterance_set, write_jsonl

    data = tmp_path / "data"
    rows = utterance_set(data, 6)
    task = write_jsonl(data / "task.jsonl", [{"id": r["file_name"], "audio": str(
        data / r["file_name"]), "text": r["transcription"]} for r in rows[:3]])
    cfg = compose_cfg(tmp_path, [
        "experiment=finetune_speech", "tracking=none", "callbacks.progress.enabled=false",
        f"model.pretrained={openai_vocab}", f"data.train_file={write_jsonl(data / 'train.jsonl', rows)}",
        "data.val_fraction=0.25", f"eval.tasks=[{task}]", "trainer.batch_size=2",
        "trainer.max_steps=2", "trainer.eval_every_steps=2", "trainer.schedule.warmup_steps=0"])
    train(cfg)
    GlobalHydra.instance().clear()
    report = export_whisper(cfg.paths.output_dir, tmp_path / "q4", "mlx-whisper", quantize=4,
                            accept_loss=True)
    judged = report["retention"]
    assert judged["base"] == "the run with its adapters off", judged
    assert "task" in json.dumps(judged), judged


@pytest.mark.slow
def test_a_lora_run_exports_fused_and_transformers_computes_its_logits(small, tmp_path):
    """A few-step LoRA run of experiment=finetune_speech: the hf export holds the adapters
    fused (weights moved off the base), and transformers, given only the folder, computes the
    run's own logits (adapters on) and transcribes as the run's model does."""
    import torch
    from hydra.core.global_hydra import GlobalHydra
    from mlx.utils import tree_flatten
    from transformers import WhisperForConditionalGeneration

    from conftest import compose_cfg
    from mlxlab.data.audio_features import log_mel
    from mlxlab.decoding.transcription import transcribe
    from mlxlab.runs.speech_model import load_speech_model
    from mlxlab.train import train
    from speech_fixtures import utterance_set, write_jsonl

    data = tmp_path / "data"
    rows = write_jsonl(data / "train.jsonl", utterance_set(data, 6))
    cfg = compose_cfg(tmp_path, [
        "experiment=finetune_speech", "tracking=none", "callbacks.progress.enabled=false",
        f"model.pretrained={small}", f"data.train_file={rows}", "data.val_fraction=0.25",
        "trainer.batch_size=2", "trainer.max_steps=3", "trainer.eval_every_steps=3",
        "trainer.schedule.warmup_steps=0", "optimizer.learning_rate=0.05"])
    train(cfg)
    GlobalHydra.instance().clear()
    run = load_speech_model(cfg.paths.output_dir)
    assert any(".lora_" in k for k, _ in tree_flatten(run.model.parameters()))
    out = tmp_path / "hf"
    report = export_whisper(cfg.paths.output_dir, out, "hf")
    assert report["lora"] == "fuse" and report["step"] == 3
    written = mx.load(str(out / "model.safetensors"))
    base = mx.load(str(small / "model.safetensors"))
    name = "model.decoder.layers.0.self_attn.q_proj.weight"
    assert not mx.allclose(written[name], base[name]).item()  # the adapters are in it
    audio = tone(1.0, 300, seed=3)
    feats = log_mel(audio, 80)[None]
    ids = np.array([[267, 268, 271, 275, 40, 41, 42]])
    ours = np.array(run.model(mx.array(feats), mx.array(ids)))
    hf = WhisperForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(input_features=torch.tensor(feats),
                    decoder_input_ids=torch.tensor(ids)).logits.numpy()
    assert np.abs(ours - theirs).max() < 1e-3 * max(1.0, np.abs(ours).max())
    prompt = ["<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>"]
    expected = transcribe(run.model, run.tokenizer, feats, max_new_tokens=NEW)[0]
    assert _transformers_transcript(out, audio, prompt) == expected


@pytest.mark.slow
def test_a_ctranslate2_base_gets_the_files_transformers_needs(small, tmp_path):
    """A CTranslate2 folder has no transformers config, generation config or
    preprocessor_config.json: the hf export writes them (the special tokens transformers'
    Whisper generate looks up by name, the suppressed tokens of CTranslate2's config), and
    transformers transcribes from the folder alone as mlxlab does from the CTranslate2 one."""
    from mlxlab.data.audio_features import log_mel
    from mlxlab.decoding.transcription import transcribe
    from test_whisper_ctranslate2 import ct2_folder

    ct2 = ct2_folder(small, tmp_path / "ct2")
    out = tmp_path / "hf"
    export_whisper(ct2, out, "hf")
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["suppress_tokens"] == [5, 6] and generation["task_to_id"]["transcribe"] == 271
    assert generation["lang_to_id"]["<|en|>"] == 268 and generation["no_timestamps_token_id"] == 275
    assert json.loads((out / "preprocessor_config.json").read_text())["feature_size"] == 80
    model, tokenizer = _mlxlab(ct2)
    audio = tone(1.2, 520, seed=9)
    ours = transcribe(model, tokenizer, log_mel(audio, 80)[None], max_new_tokens=NEW)[0]
    prompt = ["<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>"]
    assert _transformers_transcript(out, audio, prompt) == ours


def _real_ct2_folder():
    import os
    from pathlib import Path

    cache = Path(os.environ.get("MLXLAB_SPEECH_CACHE", Path.home() / ".cache/mlxlab/speech"))
    return cache / "whisper-base-ct2"


@pytest.mark.slow
@pytest.mark.skipif(not (_real_ct2_folder() / "model.bin").is_file(), reason="openai/whisper-base "
                    "is not downloaded: python benchmarks/speech/whisper_checkpoint.py fetches it")
def test_real_whisper_base_exports_transcribe_a_sentence_alike(tmp_path):
    """openai/whisper-base (faster-whisper's folder) exported to both formats: transformers
    and mlx-whisper, each called as a user calls it (mlx_whisper.transcribe with its defaults),
    transcribe a sentence eSpeak NG speaks as mlxlab does."""
    pytest.importorskip("mlx_whisper")
    import mlx_whisper

    from benchmarks.speech.make_speech_set import Espeak
    from mlxlab.data.audio_features import log_mel
    from mlxlab.decoding.transcription import transcribe

    silence = np.zeros(8000, np.float32)
    speech = np.concatenate([silence, Espeak().say("Please open the window.", "en-us", 160, 50),
                             silence])
    model, tokenizer = _mlxlab(_real_ct2_folder())
    ours = transcribe(model, tokenizer, log_mel(speech, 80)[None])[0]
    assert ours == "Please open the window."
    export_whisper(_real_ct2_folder(), tmp_path / "hf", "hf")
    prompt = ["<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>"]
    assert _transformers_transcript(tmp_path / "hf", speech, prompt) == ours
    report = export_whisper(_real_ct2_folder(), tmp_path / "mlx", "mlx-whisper")
    assert report["check"]["status"] == "checked"
    text = mlx_whisper.transcribe(speech, path_or_hf_repo=str(tmp_path / "mlx"))["text"]
    assert text.strip() == ours
