"""`mlxlab transcribe` and `mlxlab serve`'s POST /v1/audio/transcriptions on a tiny random
Whisper folder (transformers saved it), as a user runs them: real processes, audio files
written with soundfile, the official `openai` client. Both print or answer what
decoding/transcription.py's `transcribe` gives on the features data/audio_features.py makes of
the files; bad input is one line (the verb) or OpenAI's error object (the server)."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from conftest import MLXLAB
from one_process import each_in_one_process
from serve_helpers import serving
from whisper_fixtures import SAMPLE_RATE, tone, whisper_folder

MAX_NEW = 224  # the verb's and the server's default


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """The folder, two audio files and what transcribe() makes of them in this process."""
    import soundfile

    from mlxlab.data.audio_features import log_mel_batch
    from mlxlab.data.audio_io import read_audio
    from mlxlab.data.speech import load_whisper_tokenizer
    from mlxlab.decoding.transcription import transcribe
    from mlxlab.models.speech.whisper import WhisperModel

    root = tmp_path_factory.mktemp("transcribe")
    folder = whisper_folder(root / "whisper-tiny-random", end_bias=1.5)
    config = json.loads((folder / "config.json").read_text())
    config["max_target_positions"] = 448  # room for the default 224 new tokens
    (folder / "config.json").write_text(json.dumps(config))
    files = []
    for i, (seconds, hz) in enumerate([(1.0, 440), (2.0, 880)]):
        path = root / f"clip{i}.wav"
        soundfile.write(str(path), tone(seconds, hz, seed=i), SAMPLE_RATE)
        files.append(path)
    _grow_positions(folder)
    model = WhisperModel(pretrained=str(folder))
    features = np.array(log_mel_batch([read_audio(f) for f in files], 80))
    tokenizer = load_whisper_tokenizer(folder)
    expected = transcribe(model, tokenizer, features, max_new_tokens=MAX_NEW)
    return folder, files, expected


def _grow_positions(folder):
    """The decoder's learned positions padded to the config's 448 (random rows beyond 64)."""
    import mlx.core as mx

    weights = mx.load(str(folder / "model.safetensors"))
    positions = weights["model.decoder.embed_positions.weight"]
    extra = mx.random.normal((448 - positions.shape[0], positions.shape[1]), key=mx.random.key(0))
    weights["model.decoder.embed_positions.weight"] = mx.concatenate([positions, 0.3 * extra])
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "pt"})


def test_the_verb_prints_one_transcript_per_file(case, cli_env):
    folder, files, expected = case
    assert any(expected) and expected[0] != expected[1]
    out = subprocess.run([MLXLAB, "transcribe", str(folder), *map(str, files)], env=cli_env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines() == expected


def test_bad_input_is_one_line(case, cli_env, tmp_path):
    folder, files, _ = case
    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    noise = tmp_path / "notes.wav"
    noise.write_text("not audio")
    cases = [([str(other), str(files[0])], "is no Whisper folder"),
             ([str(folder), str(tmp_path / "missing.wav")], "audio file not found"),
             ([str(folder), str(noise)], "cannot be read"),
             ([str(folder), str(files[0]), "--beam-size", "0"], "beam_size=0")]
    # the four in turn in one process (one process start, not four)
    done = each_in_one_process([["mlxlab", "transcribe", *args] for args, _ in cases], cli_env,
                               cwd=tmp_path)
    for (args, says), (code, stderr, _) in zip(cases, done, strict=True):
        lines = stderr.strip().splitlines()
        assert code == 2 and len(lines) == 1, stderr[-2000:]
        assert lines[0].startswith("mlxlab transcribe: error:") and says in lines[0], (args, lines)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bert", "notes.wav"]  # nothing made


def test_the_server_answers_openai_transcriptions(case, cli_env, tmp_path):
    import openai

    folder, files, expected = case
    with serving([str(folder)], tmp_path / "serve.log", cli_env) as url:
        client = openai.OpenAI(base_url=url, api_key="unused")
        assert [m.id for m in client.models.list().data] == [str(folder)]
        for path, text in zip(files, expected, strict=True):
            with open(path, "rb") as f:
                answer = client.audio.transcriptions.create(model=folder.name, file=f)
            assert answer.text == text
        with open(files[1], "rb") as f:
            plain = client.audio.transcriptions.create(model=str(folder), file=f,
                                                       response_format="text", language="en")
        assert plain.strip() == expected[1]
        with open(files[0], "rb") as f, pytest.raises(openai.BadRequestError) as bad:
            client.audio.transcriptions.create(model=folder.name, file=f, response_format="srt")
        assert bad.value.body["param"] == "response_format"
        with open(files[0], "rb") as f, pytest.raises(openai.NotFoundError):
            client.audio.transcriptions.create(model="whisper-1", file=f)
        with pytest.raises(openai.BadRequestError) as bad:
            client.audio.transcriptions.create(model=folder.name,
                                               file=("a.wav", b"not audio", "audio/wav"))
        assert bad.value.body["param"] == "file"
        with pytest.raises(openai.BadRequestError) as bad:  # a Whisper model writes no chat
            client.chat.completions.create(model=folder.name,
                                           messages=[{"role": "user", "content": "hi"}])
        assert "/v1/audio/transcriptions" in bad.value.body["message"]


@pytest.mark.slow
def test_a_speech_run_transcribes_as_its_model(tmp_path, cli_env):
    """A finished run of model=whisper (LoRA, a few steps) is a MODEL for the verb: its
    transcripts are those of the run's model and tokenizer as runs/speech_model.py loads
    them."""
    from mlx.utils import tree_flatten

    from mlxlab.data.audio_features import log_mel_batch
    from mlxlab.data.audio_io import read_audio
    from mlxlab.decoding.transcription import transcribe
    from mlxlab.runs.speech_model import load_speech_model
    from speech_fixtures import utterance_set, write_jsonl

    folder = whisper_folder(tmp_path / "whisper")
    data = tmp_path / "data"
    train = write_jsonl(data / "train.jsonl", utterance_set(data, 6))
    run_dir = tmp_path / "run"
    done = subprocess.run(
        [MLXLAB, "train", "model=whisper", "data=speech", "objective=speech_to_text",
         f"model.pretrained={folder}", f"data.train_file={train}", "data.val_fraction=0.25",
         "optimized_metric=val/loss", "optimized_mode=min", "trainer.batch_size=2",
         "trainer.max_steps=2", "trainer.eval_every_steps=2", "trainer.schedule.warmup_steps=0",
         "callbacks.progress.enabled=false", "tracking=none", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, env=cli_env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    clips = sorted(data.glob("*.wav"))[:2]
    out = subprocess.run([MLXLAB, "transcribe", str(run_dir), *map(str, clips),
                          "--max-new-tokens", "8"], env=cli_env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    loaded = load_speech_model(run_dir)
    assert loaded.kind == "run"
    assert any(".lora_" in k for k, _ in tree_flatten(loaded.model.parameters()))
    features = np.array(log_mel_batch([read_audio(c) for c in clips], 80))
    expected = transcribe(loaded.model, loaded.tokenizer, features, max_new_tokens=8)
    assert out.stdout.splitlines() == expected
