"""Speech data and the speech-to-text objective against transformers: Whisper's log-mel
features (WhisperFeatureExtractor), audio reading (channels, resampling), the three layouts of
utterances (audiofolder, jsonl, CSV), the decoder prompt and label masks (transformers'
DataCollatorSpeechSeq2SeqWithPadding), the loss (WhisperForConditionalGeneration's), a LoRA
step (with PEFT and torch's AdamW), every bad-audio refusal before a run folder exists, and a
real `mlxlab train` run (slow)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

# the speech extra is in the dev extra (pyproject.toml): CI has it
soundfile = pytest.importorskip("soundfile", reason="the speech extra: pip install -e '.[dev]'")
pytest.importorskip("soxr", reason="the speech extra: pip install -e '.[dev]'")

import mlx.core as mx  # noqa: E402

from conftest import PYTHON, config_refusal  # noqa: E402
from mlxlab.data.audio_features import log_mel, log_mel_batch  # noqa: E402
from mlxlab.data.audio_io import read_audio  # noqa: E402
from mlxlab.data.batching import Batching  # noqa: E402
from mlxlab.data.speech import SpeechTranscripts, decoder_prompt  # noqa: E402
from mlxlab.errors import ConfigError  # noqa: E402
from speech_fixtures import (  # noqa: E402
    utterance_set,
    whisper_tokenizer,
    write_audio,
    write_csv,
    write_jsonl,
)
from whisper_fixtures import tone, whisper_folder  # noqa: E402

BATCHING = Batching(batch_size=4, bucket_multiple=8)


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    return whisper_folder(tmp_path_factory.mktemp("whisper") / "model")


@pytest.fixture(scope="module")
def jsonl_set(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("jsonl")
    return write_jsonl(folder / "train.jsonl", utterance_set(folder, 6))


# ---- features and reading ------------------------------------------------------------------
@pytest.mark.parametrize("n_mels", [80, 128])
def test_log_mel_equals_whisper_feature_extractor(n_mels):
    from transformers import WhisperFeatureExtractor

    noise = np.random.default_rng(1).standard_normal(16_000 * 31).astype(np.float32)
    audios = [tone(2.5, 440.0), 0.1 * noise,  # longer than 30 s: cut as the extractor cuts it
              tone(7.0, 3000.0), np.full(160, 1e-3, np.float32)]
    expected = WhisperFeatureExtractor(feature_size=n_mels)(
        audios, sampling_rate=16_000, return_tensors="np").input_features
    batch = np.array(log_mel_batch(audios, n_mels))
    assert batch.shape == (4, n_mels, 3000) and batch.dtype == np.float32
    np.testing.assert_allclose(batch, expected, atol=1e-4, rtol=0)
    np.testing.assert_allclose(log_mel(audios[0], n_mels), expected[0], atol=1e-4, rtol=0)


def test_read_audio_downmixes_and_resamples_to_16k(tmp_path):
    import soxr

    t = np.arange(44_100) / 44_100
    left, right = 0.5 * np.sin(2 * np.pi * 300 * t), 0.2 * np.sin(2 * np.pi * 1200 * t)
    stereo = np.stack([left, right], axis=1).astype(np.float32)
    write_audio(tmp_path / "a.flac", stereo, 44_100)
    audio = read_audio(tmp_path / "a.flac")
    on_disk, _ = soundfile.read(str(tmp_path / "a.flac"), dtype="float32")  # FLAC's 16 bits
    expected = soxr.resample(on_disk.mean(axis=1), 44_100, 16_000, quality="HQ")
    assert audio.dtype == np.float32 and audio.shape == (16_000,)
    np.testing.assert_allclose(audio, expected, atol=1e-6)
    write_audio(tmp_path / "b.wav", stereo[:16_000], 16_000)  # at 16 kHz: only the mean
    np.testing.assert_allclose(read_audio(tmp_path / "b.wav"),
                               soundfile.read(str(tmp_path / "b.wav"))[0].mean(axis=1),
                               atol=1e-7)


# ---- the three layouts -----------------------------------------------------------------------
def test_audiofolder_splits_by_its_folders(tmp_path, model_folder):
    root = tmp_path / "af"
    write_csv(root / "train" / "metadata.csv", utterance_set(root / "train", 5))
    write_csv(root / "test" / "metadata.csv", utterance_set(root / "test", 2))
    data = SpeechTranscripts(str(root), processor=str(model_folder))
    assert (len(data.train), len(data.val)) == (5, 2)  # test/ is validated on, nothing held out
    assert data.utterance_ids("val") == ["utt0.wav", "utt1.wav"]
    # one metadata.csv at the top naming the split folders' files, validation/ as the split
    top = tmp_path / "top"
    rows = utterance_set(top, 4, prefix="train/") + utterance_set(top, 2, prefix="validation/")
    write_csv(top / "metadata.csv", rows)
    data = SpeechTranscripts(str(top), processor=str(model_folder))
    assert data.utterance_ids("train") == [f"train/utt{i}.wav" for i in range(4)]
    assert data.utterance_ids("val") == ["validation/utt0.wav", "validation/utt1.wav"]
    assert data.splits["val"].texts == [r["transcription"] for r in rows[4:]]
    with pytest.raises(ConfigError, match="an audiofolder .* names its audio files in file_name"):
        SpeechTranscripts(str(top), processor=str(model_folder), columns={"audio": "path"})
    (root / "test" / "metadata.csv").write_text("file_name,transcription\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="its val split holds no utterances"):
        SpeechTranscripts(str(root), processor=str(model_folder))


def test_jsonl_and_csv_with_their_own_column_names(tmp_path, model_folder):
    rows = [{"id": f"spk1-{i}", "path": r["file_name"], "sentence": r["transcription"]}
            for i, r in enumerate(utterance_set(tmp_path, 5))]
    keys = {"columns": {"audio": "path", "text": "sentence", "id": "id"}}
    for path in (write_jsonl(tmp_path / "rows.jsonl", rows), write_csv(tmp_path / "rows.csv",
                                                                       rows)):
        data = SpeechTranscripts(str(path), processor=str(model_folder), val_fraction=0.4,
                                 **keys)
        ids = data.utterance_ids("train") + data.utterance_ids("val")
        assert sorted(ids) == [r["id"] for r in rows] and len(data.val) == 2
        texts = dict(zip(ids, data.splits["train"].texts + data.splits["val"].texts))
        assert texts == {r["id"]: r["sentence"] for r in rows}
    with pytest.raises(ConfigError, match=r"data.columns has \['wav'\]"):
        SpeechTranscripts(str(path), processor=str(model_folder), columns={"wav": "path"})
    with pytest.raises(ConfigError, match="no string column 'file_name'"):
        SpeechTranscripts(str(tmp_path / "rows.csv"), processor=str(model_folder))


# ---- prompts and masks -----------------------------------------------------------------------
def recipe_labels(tokenizer, texts: list[str], start_id: int) -> np.ndarray:
    """transformers' Whisper fine-tuning recipe (the blog's DataCollatorSpeechSeq2SeqWithPadding
    on `tokenizer(text).input_ids`, the tokenizer loaded with language="en", task="transcribe"):
    labels padded with -100, the leading <|startoftranscript|> cut off."""
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token  # as Whisper's checkpoints
    tokenizer.set_prefix_tokens(language="en", task="transcribe")  # the recipe loads it so
    batch = tokenizer.pad({"input_ids": [tokenizer(t).input_ids for t in texts]},
                          return_tensors="np")
    labels = np.where(batch["attention_mask"] == 1, batch["input_ids"], -100)
    if (labels[:, 0] == start_id).all():
        labels = labels[:, 1:]
    return labels


@pytest.mark.parametrize(("loss_on_prompt", "leading_space"),
                         [(False, False), (True, False), (False, True)])
def test_prompt_and_label_masks_follow_the_recipe(jsonl_set, model_folder, loss_on_prompt,
                                                  leading_space):
    """transformers' recipe (leading_space=false: the bare text), and Whisper's own first
    word with its space (the default)."""
    data = SpeechTranscripts(str(jsonl_set), processor=str(model_folder), val_fraction=0.34,
                             loss_on_prompt=loss_on_prompt, leading_space=leading_space)
    data.setup()
    tok = data.whisper_tokenizer
    batch = next(iter(data.train_batches(BATCHING, 0)))
    texts = [data.splits["train"].texts[i] for i in np.array(batch["index"])]
    texts = [" " + t for t in texts] if leading_space else texts
    inputs, labels = np.array(batch["decoder_input_ids"]), np.array(batch["labels"])
    start, en, transcribe, no_ts, end = tok.convert_tokens_to_ids(
        ["<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>",
         "<|endoftext|>"])
    expected = recipe_labels(tok, texts, start)
    if not loss_on_prompt:
        expected[:, :3] = -100  # <|en|><|transcribe|><|notimestamps|>: forced, never scored
    assert labels.shape[1] % 8 == 0 and labels.shape == inputs.shape
    np.testing.assert_array_equal(labels[:, :expected.shape[1]], expected)
    assert (labels[:, expected.shape[1]:] == -100).all()
    for row, text in enumerate(texts):
        ids = tok(text, add_special_tokens=False).input_ids
        sequence = [start, en, transcribe, no_ts, *ids]
        assert inputs[row, :len(sequence)].tolist() == sequence
        assert (inputs[row, len(sequence):] == end).all()  # padded with the model's pad (eot)
    assert np.array(batch["input_features"]).shape == (len(texts), 80, 3000)


@pytest.mark.parametrize("language", ["en", "de", "french", "ja", "yue", None])
def test_decoder_prompt_is_transformers_prefix_tokens(language):
    tokenizer = whisper_tokenizer()  # every language, in Whisper's order
    tokenizer.set_prefix_tokens(language=language, task="transcribe" if language else None,
                                predict_timestamps=False)
    assert decoder_prompt(tokenizer, language, "transcribe") == tokenizer.prefix_tokens
    tokenizer.set_prefix_tokens(language=language, task="translate" if language else None)
    assert decoder_prompt(tokenizer, language, "translate") == tokenizer.prefix_tokens


def test_english_only_prompt_and_a_wrong_language(jsonl_set, model_folder):
    data = SpeechTranscripts(str(jsonl_set), processor=str(model_folder), language=None)
    assert data.whisper_tokenizer.convert_ids_to_tokens(data.prompt) == [
        "<|startoftranscript|>", "<|notimestamps|>"]
    with pytest.raises(ConfigError, match="data.language='klingon'"):
        SpeechTranscripts(str(jsonl_set), processor=str(model_folder), language="klingon")


# ---- the loss against transformers --------------------------------------------------------
def test_loss_equals_transformers_whisper_loss(jsonl_set, model_folder):
    import torch
    from transformers import WhisperForConditionalGeneration

    from mlxlab.models.speech.whisper import WhisperModel
    from mlxlab.objectives.supervised.speech_to_text import speech_to_text_loss

    data = SpeechTranscripts(str(jsonl_set), processor=str(model_folder), val_fraction=0.34)
    data.setup()
    batch = next(iter(data.train_batches(BATCHING, 0)))
    model = WhisperModel(pretrained=str(model_folder))
    loss, aux = speech_to_text_loss(model, batch, per_example=True)
    reference = WhisperForConditionalGeneration.from_pretrained(model_folder).eval()
    with torch.no_grad():
        out = reference(input_features=torch.tensor(np.array(batch["input_features"])),
                        decoder_input_ids=torch.tensor(np.array(batch["decoder_input_ids"])),
                        labels=torch.tensor(np.array(batch["labels"]), dtype=torch.long))
    assert float(loss) == pytest.approx(out.loss.item(), rel=1e-4)
    labels = np.array(batch["labels"])
    assert float(aux["ntokens"]) == (labels != -100).sum()
    # each utterance's loss, from transformers' logits
    logp = torch.log_softmax(out.logits, -1).numpy()
    scored = labels != -100
    nll = -np.take_along_axis(logp, np.where(scored, labels, 0)[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.array(aux["example_loss"]),
                               (nll * scored).sum(1) / scored.sum(1), rtol=1e-4)


def test_lora_steps_equal_transformers_with_peft(jsonl_set, model_folder):
    """The reference recipe's step (transformers' loss, PEFT's LoRA on the decoder, torch's
    AdamW, a global-norm clip of 1) and mlxlab's, from the same adapter values on the same
    batches: the gradients at the first step and the loss at each of three steps agree."""
    import mlx.nn as nn
    import mlx.optimizers as optim
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import WhisperForConditionalGeneration

    from mlxlab import kernels
    from mlxlab.models.speech.whisper import WhisperModel
    from mlxlab.objectives.supervised.speech_to_text import speech_to_text_loss

    data = SpeechTranscripts(str(jsonl_set), processor=str(model_folder), val_fraction=0.34)
    data.setup()
    batches = list(data.train_batches(Batching(batch_size=2, bucket_multiple=8), 0))[:3]
    names = "q_proj|k_proj|v_proj|out_proj|fc1|fc2"
    torch.manual_seed(0)
    reference = get_peft_model(WhisperForConditionalGeneration.from_pretrained(model_folder),
                               LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=(
                                   rf".*\bdecoder\.layers\.\d+\..*\b({names})")))
    theirs = {n: p for n, p in reference.named_parameters() if p.requires_grad}
    for n, p in theirs.items():  # B away from zero: every adapter gets a gradient
        if "lora_B" in n:
            p.data = torch.randn(p.shape) * 0.05
    model = WhisperModel(pretrained=str(model_folder), lora={
        "rank": 4, "alpha": 8, "targets": ["query", "key", "value", "out", "fc1", "fc2"],
        "modules": ["decoder"]})

    def their_name(name: str) -> str:
        layer, which = name.rsplit(".lora_", 1)
        return f"base_model.model.{layer}.lora_{which.upper()}.default.weight"

    ours = dict(nn.utils.tree_flatten(model.trainable_parameters()))
    assert len(ours) == len(theirs) > 0
    model.load_weights([(n, mx.array(theirs[their_name(n)].detach().numpy().T)) for n in ours],
                       strict=False)
    step = nn.value_and_grad(model, lambda m, b: speech_to_text_loss(m, b)[0])
    adamw = optim.AdamW(learning_rate=1e-2, weight_decay=0.0, bias_correction=True)
    torch_adamw = torch.optim.AdamW(list(theirs.values()), lr=1e-2, weight_decay=0.0)
    for i, batch in enumerate(batches):
        torch_adamw.zero_grad()
        out = reference(**{k: torch.tensor(np.array(batch[k]), dtype=dtype) for k, dtype in (
            ("input_features", torch.float32), ("decoder_input_ids", torch.long),
            ("labels", torch.long))})
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(list(theirs.values()), 1.0)
        torch_adamw.step()
        loss, grads = step(model, batch)
        grads, _ = kernels.clip_grad_norm(grads, 1.0)
        if i == 0:  # torch's gradients are clipped in place by now
            for name, grad in nn.utils.tree_flatten(grads):
                want = theirs[their_name(name)].grad.numpy().T
                scale = np.abs(want).max()
                assert scale > 0, name
                np.testing.assert_allclose(np.array(grad) / scale, want / scale, atol=1e-4,
                                           err_msg=name)
        adamw.update(model, grads)
        mx.eval(model.parameters())
        assert float(loss) == pytest.approx(out.loss.item(), rel=1e-4), i


# ---- bad audio: one line, before a run folder exists ------------------------------------
def bad_rows(folder: Path) -> dict[str, tuple[dict, str]]:
    """Each bad utterance (its row, files written) and the words its refusal must hold."""
    write_audio(folder / "silent.wav", np.zeros(16_000, np.float32))
    write_audio(folder / "long.wav", tone(31.0, 440.0))
    (folder / "broken.wav").write_bytes(b"RIFF....WAVEfmt not really audio")
    write_audio(folder / "ok.wav", tone(1.0, 440.0))
    return {
        "missing": ({"file_name": "gone.wav", "transcription": "x"}, "audio file not found"),
        "unreadable": ({"file_name": "broken.wav", "transcription": "x"}, "cannot be read"),
        "silent": ({"file_name": "silent.wav", "transcription": "x"}, "is silent"),
        "long": ({"file_name": "long.wav", "transcription": "x"}, "longer than Whisper's 30 s"),
        "transcript": ({"file_name": "ok.wav", "transcription": "word " * 40},
                       "decoder tokens with its prompt, over the decoder's 64"),
    }


def speech_overrides(model: Path, train_file: Path) -> list[str]:
    return ["model=whisper", "data=speech", "objective=speech_to_text",
            f"model.pretrained={model}", f"data.train_file={train_file}",
            "data.val_fraction=0.25", "optimized_metric=val/loss", "optimized_mode=min"]


def test_every_bad_utterance_is_refused_by_the_config_check(tmp_path, model_folder):
    data = tmp_path / "data"
    good = utterance_set(data, 4)
    for name, (row, words) in bad_rows(data).items():
        train = write_jsonl(data / f"{name}.jsonl", [*good, row])
        line = config_refusal(tmp_path, speech_overrides(model_folder, train))
        assert line is not None and f"{train}:5: " in line and words in line, (name, line)
        assert row["file_name"] in line and "\n" not in line


def test_speech_data_and_objective_are_asked_for_together(tmp_path, model_folder, jsonl_set):
    speech = speech_overrides(model_folder, jsonl_set)
    assert config_refusal(tmp_path, speech) is None
    line = config_refusal(tmp_path, [o for o in speech if not o.startswith("objective=")])
    assert "objective=speech_to_text" in line and "audio and transcripts (speech)" in line
    line = config_refusal(tmp_path, [o for o in speech if not o.startswith("optimized_")])
    assert line.startswith("optimized_metric='val/accuracy' is not computed") and "val/loss" in line


@pytest.mark.parametrize("bad", ["silent", pytest.param("missing", marks=pytest.mark.slow),
                                 pytest.param("unreadable", marks=pytest.mark.slow),
                                 pytest.param("long", marks=pytest.mark.slow),
                                 pytest.param("transcript", marks=pytest.mark.slow)])
def test_mlxlab_train_refuses_bad_audio_with_exit_2_and_no_run_folder(tmp_path, cli_env,
                                                                      model_folder, bad):
    data = tmp_path / "data"
    row, words = bad_rows(data)[bad]
    train = write_jsonl(data / "train.jsonl", [*utterance_set(data, 4), row])
    run_dir = tmp_path / "run"
    done = subprocess.run([PYTHON, "-m", "mlxlab.train",
                           *speech_overrides(model_folder, train), f"hydra.run.dir={run_dir}"],
                          cwd=tmp_path, env=cli_env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"mlxlab: error: {train}:5: ") and words in last
    assert not run_dir.exists() and not (tmp_path / "outputs").exists()


# ---- a real run ---------------------------------------------------------------------------
@pytest.mark.slow
def test_mlxlab_train_fine_tunes_whisper_and_its_checkpoint_reloads(tmp_path, cli_env,
                                                                    model_folder):
    from mlxlab.objectives.supervised.speech_to_text import speech_to_text_loss
    from mlxlab.runs.model import load_run_model

    data = tmp_path / "data"
    train = write_jsonl(data / "train.jsonl", utterance_set(data, 8))
    run_dir = tmp_path / "run"
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    done = subprocess.run(
        [PYTHON, "-m", "mlxlab.train", *speech_overrides(model_folder, train),
         "trainer.batch_size=3", "trainer.max_steps=4",
         "trainer.eval_every_steps=2", "trainer.log_every_steps=1",
         "trainer.schedule.warmup_steps=0", "trainer.batching.bucket_multiple=32",
         "callbacks.progress.enabled=false", "tracking=mlflow", f"tracking.uri={store}",
         f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, env=cli_env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    finished = json.loads((run_dir / "finished.json").read_text())
    assert finished, finished
    # a resume reads the run's tokenizer (data.tokenizer.path): the same prompts and labels
    resumed = SpeechTranscripts(str(train), processor=str(model_folder), val_fraction=0.25,
                                tokenizer={"path": str(run_dir / "tokenizer.json")})
    fresh = SpeechTranscripts(str(train), processor=str(model_folder), val_fraction=0.25)
    assert resumed._folder() == run_dir
    assert [s.tolist() for s in resumed.train.sequences] == [
        s.tolist() for s in fresh.train.sequences]
    model, _ = load_run_model(run_dir)
    batch = next(iter(_val(train, model_folder)))
    loss, _ = speech_to_text_loss(model, batch)
    logged = _logged_val_loss(store)
    assert float(loss) == pytest.approx(logged, rel=1e-3)  # the best checkpoint's val/loss


def _val(train: Path, model_folder: Path):
    data = SpeechTranscripts(str(train), processor=str(model_folder), val_fraction=0.25,
                             seed=42, split_seed=42)
    data.setup()
    return data.val_batches(Batching(batch_size=3, bucket_multiple=32))


def _logged_val_loss(store: str) -> float:
    import mlflow

    client = mlflow.MlflowClient(store)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    history = client.get_metric_history(runs[0].info.run_id, "val/loss")
    return min(m.value for m in history)


def test_batches_hold_many_utterances(jsonl_set, model_folder):
    data = SpeechTranscripts(str(jsonl_set), processor=str(model_folder), val_fraction=0.34)
    data.setup()
    sizes = [b["input_features"].shape[0] for b in data.train_batches(BATCHING, 0)]
    assert sizes == [4] and isinstance(next(iter(data.val_batches(BATCHING)))["labels"],
                                       mx.array)


def test_mel_bins_of_a_folder_whose_config_does_not_say_and_a_mismatch(tmp_path, jsonl_set,
                                                                        model_folder):
    """A CTranslate2 folder's config.json has no sizes: the feature extractor's feature_size
    decides (else 80), and the objective refuses data whose bins are not the model's."""
    import shutil

    from mlxlab.models.speech.whisper import WhisperModel
    from mlxlab.objectives.supervised.speech_to_text import check_mel_bins

    folder = Path(shutil.copytree(model_folder, tmp_path / "ct2_like"))
    (folder / "config.json").write_text(json.dumps({"suppress_ids": []}))
    features = json.loads((folder / "preprocessor_config.json").read_text())
    (folder / "preprocessor_config.json").write_text(json.dumps({**features,
                                                                 "feature_size": 128}))
    data = SpeechTranscripts(str(jsonl_set), processor=str(folder), val_fraction=0.34)
    assert data.n_mels == 128
    (folder / "preprocessor_config.json").unlink()
    assert SpeechTranscripts(str(jsonl_set), processor=str(folder), val_fraction=0.34).n_mels == 80
    with pytest.raises(ConfigError, match="the data makes 128 log-mel bins and the model takes 80"):
        check_mel_bins(WhisperModel(pretrained=str(model_folder)), data)
