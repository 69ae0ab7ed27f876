"""`mlxlab export --format whisper.cpp` (export/speech/): a tiny random Whisper with Whisper's
full vocabulary layout (tests/whispercpp_fixtures.py) written as whisper.cpp's model file,
read back by mlxlab's own reader against the folder's safetensors (names, ggml shapes, types,
values; q8_0 within its rounding), run by whisper.cpp itself (pywhispercpp) against mlxlab's
greedy transcription, and quantized exports judged per utterance by their word error rate
(export/speech/retention.py). Bad input is one line, exit 2, nothing written."""

from __future__ import annotations

import importlib.util
import json
import subprocess

import numpy as np
import pytest

from conftest import MLXLAB
from speech_fixtures import write_audio, write_jsonl
from whispercpp_fixtures import long_tone, whisper_cpp_folder

needs_whisper_cpp = pytest.mark.skipif(importlib.util.find_spec("pywhispercpp") is None,
                                       reason="pywhispercpp (the speech extra) not installed")
D, MELS, FFN, VOCAB, TEXT = 64, 80, 256, 51865, 20


def expected_ne() -> dict[str, tuple[int, ...]]:
    """whisper.cpp's loader's tensors (src/whisper.cpp, whisper_model_load) and their ggml ne
    (innermost first) for this model, written out from the loader, not from mlxlab's code."""
    ne = {"encoder.positional_embedding": (D, 1500), "encoder.conv1.weight": (3, MELS, D),
          "encoder.conv1.bias": (1, D), "encoder.conv2.weight": (3, D, D),
          "encoder.conv2.bias": (1, D), "encoder.ln_post.weight": (D,),
          "encoder.ln_post.bias": (D,), "decoder.positional_embedding": (D, TEXT),
          "decoder.token_embedding.weight": (D, VOCAB), "decoder.ln.weight": (D,),
          "decoder.ln.bias": (D,)}
    for side in ("encoder", "decoder"):
        for i in range(2):
            b = f"{side}.blocks.{i}"
            attns = ["attn", "cross_attn"] if side == "decoder" else ["attn"]
            ne |= {f"{b}.mlp_ln.weight": (D,), f"{b}.mlp_ln.bias": (D,),
                   f"{b}.mlp.0.weight": (D, FFN), f"{b}.mlp.0.bias": (FFN,),
                   f"{b}.mlp.2.weight": (FFN, D), f"{b}.mlp.2.bias": (D,)}
            for a in attns:
                ne |= {f"{b}.{a}_ln.weight": (D,), f"{b}.{a}_ln.bias": (D,),
                       f"{b}.{a}.query.weight": (D, D), f"{b}.{a}.query.bias": (D,),
                       f"{b}.{a}.key.weight": (D, D), f"{b}.{a}.value.weight": (D, D),
                       f"{b}.{a}.value.bias": (D,), f"{b}.{a}.out.weight": (D, D),
                       f"{b}.{a}.out.bias": (D,)}
    return ne


# whisper.cpp's models/convert-h5-to-ggml.py's renaming, layer 0 and the top level, written
# out: transformers' name -> whisper.cpp's
SOURCE_OF = {
    "encoder.blocks.0.attn.query.weight": "model.encoder.layers.0.self_attn.q_proj.weight",
    "encoder.blocks.0.attn.key.weight": "model.encoder.layers.0.self_attn.k_proj.weight",
    "encoder.blocks.0.attn.value.bias": "model.encoder.layers.0.self_attn.v_proj.bias",
    "encoder.blocks.0.attn.out.weight": "model.encoder.layers.0.self_attn.out_proj.weight",
    "encoder.blocks.0.attn_ln.weight": "model.encoder.layers.0.self_attn_layer_norm.weight",
    "encoder.blocks.0.mlp.0.weight": "model.encoder.layers.0.fc1.weight",
    "encoder.blocks.0.mlp.2.weight": "model.encoder.layers.0.fc2.weight",
    "encoder.blocks.0.mlp_ln.bias": "model.encoder.layers.0.final_layer_norm.bias",
    "decoder.blocks.0.cross_attn.query.weight": "model.decoder.layers.0.encoder_attn.q_proj.weight",
    "decoder.blocks.0.cross_attn.key.weight": "model.decoder.layers.0.encoder_attn.k_proj.weight",
    "decoder.blocks.0.cross_attn.value.weight": "model.decoder.layers.0.encoder_attn.v_proj.weight",
    "decoder.blocks.0.cross_attn.out.weight": "model.decoder.layers.0.encoder_attn.out_proj.weight",
    "decoder.blocks.0.cross_attn_ln.bias": "model.decoder.layers.0.encoder_attn_layer_norm.bias",
    "decoder.blocks.1.attn.query.weight": "model.decoder.layers.1.self_attn.q_proj.weight",
    "encoder.conv1.weight": "model.encoder.conv1.weight",
    "encoder.conv2.bias": "model.encoder.conv2.bias",
    "encoder.ln_post.weight": "model.encoder.layer_norm.weight",
    "encoder.positional_embedding": "model.encoder.embed_positions.weight",
    "decoder.positional_embedding": "model.decoder.embed_positions.weight",
    "decoder.token_embedding.weight": "model.decoder.embed_tokens.weight",
    "decoder.ln.bias": "model.decoder.layer_norm.bias",
}


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """The folder, its safetensors read by safetensors (not mlxlab), and a probe task of four
    long tones whose references are the folder's own greedy transcripts."""
    from safetensors.numpy import load_file

    from mlxlab.data.audio_features import log_mel_batch
    from mlxlab.decoding.transcription import transcribe
    from mlxlab.runs.speech_model import load_speech_model

    root = tmp_path_factory.mktemp("whisper_cpp")
    folder = whisper_cpp_folder(root / "whisper")
    weights = load_file(str(folder / "model.safetensors"))
    clips = [long_tone(i) for i in range(12)]
    loaded = load_speech_model(folder)
    texts = transcribe(loaded.model, loaded.tokenizer, np.array(log_mel_batch(clips, MELS)),
                       max_new_tokens=5)
    rows = []
    for i, clip in enumerate(clips):
        write_audio(root / "audio" / f"tone{i}.wav", clip)
        rows.append({"audio": f"audio/tone{i}.wav", "text": texts[i]})
    probe = write_jsonl(root / "probe.jsonl", rows[:4])
    probe_all = write_jsonl(root / "probe_all.jsonl", rows)
    return {"root": root, "folder": folder, "weights": weights, "probe": probe,
            "probe_all": probe_all, "texts": texts}


def _write(case, quant: str, path):
    """The layout of export/speech/ written from the folder's safetensors (the weights as a
    file holds them, not a model in memory)."""
    from mlxlab.data.speech import load_whisper_tokenizer
    from mlxlab.export.speech import whisper_cpp_layout as layout
    from mlxlab.export.speech.ggml_file import GGMLWhisper, write_ggml

    config = json.loads((case["folder"] / "config.json").read_text())
    tokenizer = load_whisper_tokenizer(case["folder"])
    write_ggml(path, GGMLWhisper(layout.hparams(config, quant), layout.mel_filters(MELS),
                                 layout.vocabulary(tokenizer, VOCAB),
                                 layout.ggml_tensors(case["weights"], quant)))
    return path


def test_the_file_reads_back_as_the_folder(case, tmp_path):
    """f16: the header is the config's, the filters librosa's Slaney bank, the tokens the
    vocabulary's bytes, every tensor whisper.cpp loads is there under its name and ggml shape,
    2-D and 3-D ones f16 (exactly the folder's values rounded), the rest f32 (exactly)."""
    from transformers.audio_utils import mel_filter_bank

    from mlxlab.export.speech.ggml_file import read_ggml

    back = read_ggml(_write(case, "f16", tmp_path / "m.bin"))
    assert back.hparams == {"n_vocab": VOCAB, "n_audio_ctx": 1500, "n_audio_state": D,
                            "n_audio_head": 4, "n_audio_layer": 2, "n_text_ctx": TEXT,
                            "n_text_state": D, "n_text_head": 4, "n_text_layer": 2,
                            "n_mels": MELS, "ftype": 1}
    slaney = mel_filter_bank(num_frequency_bins=201, num_mel_filters=MELS, min_frequency=0.0,
                             max_frequency=8000.0, sampling_rate=16000, norm="slaney",
                             mel_scale="slaney")
    np.testing.assert_allclose(back.filters, slaney.T, rtol=1e-6, atol=1e-9)
    assert len(back.tokens) == 50258 and back.tokens[32] == b" "
    assert back.tokens[50257] == b"<|endoftext|>"
    ne = expected_ne()
    assert set(back.tensors) == set(ne)
    for name, tensor in back.tensors.items():
        assert tensor.shape[::-1] == ne[name], name
    for name, source in SOURCE_OF.items():
        tensor, want = back.tensors[name], case["weights"][source].reshape(
            back.tensors[name].shape)
        f32 = tensor.values.ndim < 2 or "positional" in name or name.endswith("conv2.bias")
        assert tensor.ggml_type == (0 if f32 else 1), name
        expected = want if f32 else want.astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(tensor.values, expected, err_msg=name)


def test_q8_0_reads_back_within_its_rounding(case, tmp_path):
    """q8_0: the 2-D weights quantized (ggml type 8), each value within half a step of its
    32-value block (step = the block's largest magnitude / 127) plus the step's own float16
    rounding (up to 127 steps of 2^-11 of it); positions and biases f32,
    the convolutions f16, as whisper.cpp's quantize tool leaves them."""
    from mlxlab.export.speech.ggml_file import read_ggml

    back = read_ggml(_write(case, "q8_0", tmp_path / "m.bin"))
    assert back.hparams["ftype"] == 2007
    for name, source in SOURCE_OF.items():
        tensor = back.tensors[name]
        want = case["weights"][source].reshape(tensor.shape)
        if tensor.values.ndim == 2 and "positional" not in name and "bias" not in name:
            assert tensor.ggml_type == 8, name
            blocks = want.reshape(-1, 32)
            step = np.abs(blocks).max(1, keepdims=True) / 127
            error = np.abs(tensor.values.reshape(-1, 32) - blocks)
            assert (error <= (0.5 + 127 * 2.0**-11) * step + 1e-7).all(), name
            assert error.max() > 0, name  # really quantized
        else:
            assert tensor.ggml_type == (1 if tensor.values.ndim == 3 else 0), name


def test_the_judge_refuses_a_lost_gain_and_keeps_a_kept_one():
    """judge_transcripts on per-utterance hypotheses: an export whose transcripts lost most
    words is refused with the run's, the export's and the base's WER; one that transcribes as
    the run passes with the gain kept."""
    from mlxlab.evaluation.speech.word_errors import text_normalizer
    from mlxlab.export.hf import ExportError
    from mlxlab.export.speech.retention import Utterances, judge_transcripts

    refs = [f"the cat sat on mat number {i}" for i in range(30)]
    task = Utterances("probe", [f"u{i}" for i in range(30)], refs, text_normalizer("auto"))
    base = [f"a hat sat on a mat {i}" for i in range(30)]
    broken = [f"the dog ran {i}" for i in range(30)]
    with pytest.raises(ExportError) as refused:
        judge_transcripts([task], [refs], [broken], [base], base_from="adapters off",
                          written="x.bin", accept_loss=False, instead="export --quant q8_0")
    line = str(refused.value)
    assert "probe/wer" in line and "run 0.0000" in line and "export 0.7143" in line and "base 0.5714" in line, line
    assert "\n" not in line
    entry = judge_transcripts([task], [refs], [refs], [base], base_from="adapters off",
                              written="x.bin", accept_loss=False, instead="-")
    assert entry["verdict"] == "kept" and entry["utterances"] == 30
    assert {m["measure"]: m["kept"] for m in entry["measures"]}["probe/wer"] == 1.0
    accepted = judge_transcripts([task], [refs], [broken], [base], base_from="adapters off",
                                 written="x.bin", accept_loss=True, instead="-")
    assert accepted["accepted_loss"] and "probe/wer" in accepted["lost"]


@needs_whisper_cpp
@pytest.mark.slow  # two whisper.cpp processes: about 20 s on a loaded 2-core box
def test_the_float_export_transcribes_as_the_run_in_whisper_cpp(case, tmp_path):
    """f16 through export_whisper_cpp: whisper.cpp loads the written file and chooses the
    tokens mlxlab's greedy decoding of the folder chooses through every decisive step (the
    check passes), and what it wrote reads back as the folder's weights."""
    from mlxlab.export.speech.ggml_file import read_ggml
    from mlxlab.export.speech.whisper_cpp import export_whisper_cpp
    from mlxlab.export.speech.whisper_cpp_run import whisper_cpp_transcripts

    out = tmp_path / "ggml-tiny.bin"
    report = export_whisper_cpp(case["folder"], out, "f16", probe=case["probe"])
    check = report["check"]
    assert check["status"] == "checked" and check["utterances"] == 4, check
    assert check["decisive_tokens"] >= 8 and check["equal_transcripts"] >= 2, check
    assert out.is_file() and report["bytes"] == out.stat().st_size
    back = read_ggml(out)
    np.testing.assert_array_equal(back.tensors["encoder.conv1.weight"].values,
                                  case["weights"]["model.encoder.conv1.weight"]
                                  .astype(np.float16).astype(np.float32))
    theirs = whisper_cpp_transcripts(out, [long_tone(i) for i in (1, 3)], language="en",
                                     max_new_tokens=5, work=tmp_path / "w")
    assert theirs == [case["texts"][1], case["texts"][3]]
    assert len(set(case["texts"])) > 2  # the transcripts depend on the audio


@needs_whisper_cpp
@pytest.mark.slow
def test_a_q4_0_export_that_loses_the_words_is_refused(case, tmp_path):
    """q4_0 of the folder, judged on its twelve probe utterances (references: the folder's
    own transcripts, so the run's WER is 0): whisper.cpp's transcripts from the q4_0 file lose
    words on most, significantly: refused, nothing written; q8_0 is judged the same way and
    its report names both WERs."""
    from mlxlab.export.hf import ExportError
    from mlxlab.export.speech.whisper_cpp import export_whisper_cpp

    out = tmp_path / "q4.bin"
    with pytest.raises(ExportError) as refused:
        export_whisper_cpp(case["folder"], out, "q4_0", probe=case["probe_all"])
    assert "word error rate" in str(refused.value) and "run 0.0000" in str(refused.value)
    assert not out.exists() and not list(tmp_path.iterdir())


def _cli(args, env):
    return subprocess.run([MLXLAB, "export", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=300)


def test_bad_input_is_one_line_and_writes_nothing(case, tmp_path, cli_env):
    """A folder that is not a Whisper, a --quant whisper.cpp does not take, an option of the
    other formats: one line each, exit 2, no file."""
    text_model = tmp_path / "text"
    text_model.mkdir()
    (text_model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    out = tmp_path / "out.bin"
    cases = [
        ([text_model, "--format", "whisper.cpp", "--out", out], "is not one"),
        ([case["folder"], "--format", "whisper.cpp", "--quant", "q4_1", "--out", out],
         "--quant q4_1"),
        ([case["folder"], "--format", "whisper.cpp", "--dtype", "float16", "--out", out],
         "--dtype does not apply"),
        ([case["folder"], "--format", "hf", "--probe", case["probe"], "--out", out],
         "--probe is for --format whisper.cpp"),
    ]
    from one_process import each_in_one_process

    # in turn in one process (`mlxlab export` runs as a process of its own in test_export)
    done = each_in_one_process([["mlxlab", "export", *args] for args, _ in cases], cli_env,
                               cwd=tmp_path, after="one_process:names_here")
    for (_, says), (code, stderr, names) in zip(cases, done, strict=True):
        lines = stderr.strip().splitlines()
        assert code == 2 and len(lines) == 1, stderr[-2000:]
        assert lines[0].startswith("mlxlab export: error:") and says in lines[0], lines[0]
        assert "out.bin" not in names, names


@needs_whisper_cpp
@pytest.mark.slow
def test_a_lora_run_exports_fused_and_f32_is_refused(case, tmp_path, cli_env):
    """A few-step LoRA run of the folder (model=whisper, data=speech) through the verb: the
    float file holds the fused weights (read back: not the base's) and whisper.cpp's check
    passes on the probe; q8_0 is judged against the run and the run with its adapters off;
    --quant f32, which whisper.cpp's CPU convolution aborts on, is refused in one line and
    nothing is written."""
    from mlx.utils import tree_flatten

    from mlxlab.export.speech.ggml_file import read_ggml
    from mlxlab.models.adapters.lora import fuse_lora
    from mlxlab.runs.speech_model import load_speech_model
    from speech_fixtures import utterance_set

    data = tmp_path / "data"
    train = write_jsonl(data / "train.jsonl", utterance_set(data, 6))
    run_dir = tmp_path / "run"
    done = subprocess.run(
        [MLXLAB, "train", "model=whisper", "data=speech", "objective=speech_to_text",
         f"model.pretrained={case['folder']}", f"data.train_file={train}",
         "data.val_fraction=0.25", "optimized_metric=val/loss", "optimized_mode=min",
         "trainer.batch_size=2", "trainer.max_steps=2", "trainer.eval_every_steps=2",
         "trainer.schedule.warmup_steps=0", "callbacks.progress.enabled=false",
         "tracking=none", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, env=cli_env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    out = tmp_path / "ft.bin"
    done = _cli([run_dir, "--format", "whisper.cpp", "--probe", case["probe"], "--out", out],
                cli_env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "checked in whisper.cpp" in done.stdout, done.stdout
    fused = dict(tree_flatten(fuse_lora(load_speech_model(run_dir).model).parameters()))
    back = read_ggml(out)
    query = np.array(fused["model.decoder.layers.0.self_attn.q_proj.weight"])
    np.testing.assert_array_equal(back.tensors["decoder.blocks.0.attn.query.weight"].values,
                                  query.astype(np.float16).astype(np.float32))
    assert not np.array_equal(query, case["weights"][
        "model.decoder.layers.0.self_attn.q_proj.weight"])  # the adapters are in it
    q8 = tmp_path / "ft-q8.bin"
    done = _cli([run_dir, "--format", "whisper.cpp", "--quant", "q8_0", "--probe",
                 case["probe"], "--accept-loss", "--out", q8], cli_env)
    assert done.returncode == 0 and "base: the run with its adapters off" in done.stdout, (
        done.stdout + done.stderr)[-3000:]
    f32 = tmp_path / "ft-f32.bin"
    done = _cli([run_dir, "--format", "whisper.cpp", "--quant", "f32", "--probe",
                 case["probe"], "--out", f32], cli_env)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "f16 kernels" in lines[0], done.stderr
    assert not f32.exists()


def test_a_vocabulary_off_whisper_s_layout_is_refused():
    """whisper.cpp reads the special tokens at Whisper's ids: a small vocabulary, or one whose
    <|endoftext|> sits elsewhere, is one line naming --format hf; Whisper's own layouts pass."""
    from mlxlab.export.speech.whisper_cpp_layout import check_vocabulary, special_ids
    from speech_fixtures import whisper_tokenizer

    tokenizer = whisper_tokenizer()  # the byte symbols, then Whisper's special tokens
    with pytest.raises(ValueError, match="holds 288 tokens.*--format hf"):
        check_vocabulary({"vocab_size": 288}, tokenizer)
    with pytest.raises(ValueError, match=r"<\|endoftext\|> is id 256; whisper.cpp reads it as "
                                         r"id 50257"):
        check_vocabulary({"vocab_size": VOCAB}, tokenizer)
    # openai/whisper-tiny.en, -tiny and large-v3's ids
    assert special_ids(51864) == {"<|endoftext|>": 50256, "<|startoftranscript|>": 50257,
                                  "<|notimestamps|>": 50362}
    assert special_ids(51865)["<|notimestamps|>"] == 50363
    assert special_ids(51865)["<|transcribe|>"] == 50359
    assert special_ids(51866)["<|notimestamps|>"] == 50364
