"""Speech made offline for the Whisper proof: sentences on an invented vocabulary (names and terms
Whisper has never heard) spoken by eSpeak NG (espeakng-loader's library and data, through ctypes)
in several voices, speeds and pitches, white noise at set SNRs, resampled to 16 kHz WAV, written
as an audiofolder: OUT/{train,test}/metadata.csv (file_name, transcription, voice, rate, pitch,
snr_db) beside the WAVs. The held-out split has its own voices and its own sentences (the same
vocabulary).

    python benchmarks/speech/make_speech_set.py [--out DIR] [--train 400] [--test 100]
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import json
import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: benchmarks.*
from benchmarks.speech.whisper_checkpoint import CACHE  # noqa: E402

NAMES = ["Zorvath", "Quelmora", "Thraxol", "Ylsendra", "Vexnor", "Drustavel", "Kaltrimund", "Brisquane"]
THINGS = ["klendrite", "morvex", "glimthar", "snevrite", "plorvane", "druskel", "fennoquat", "travelite"]
ADJECTIVES = ["brivantic", "plorvish", "quendral", "skavorous", "trimbly", "vostrane"]
INVENTED = {w.lower() for w in NAMES + THINGS + ADJECTIVES}
TEMPLATES = [
    "{name} found the {adj} {thing} near the old bridge",
    "please give the {thing} to {name} before noon",
    "the {thing} that {name} sold was {adj}",
    "{name} and {name2} measured the {thing} twice",
    "we stored the {adj} {thing} beside the {thing2}",
    "{name} says the {thing} is too {adj} to use",
    "after lunch {name} cleaned the {thing2} and the {thing}",
    "a {adj} {thing} fell from the shelf in {name}'s room",
]
# eSpeak NG voices (language + variant); the held-out split speaks with voices training never hears
TRAIN_VOICES = ["en-us+m3", "en-us+f2", "en+m1", "en-gb-scotland+m4", "en-029+f1", "en-us-nyc+m5"]
TEST_VOICES = ["en-gb-x-rp+f3", "en+m7", "en-us+f4"]
RATES, PITCHES, SNRS = (140, 165, 190), (35, 50, 65), (None, 20.0, 10.0)  # words/min, 0-99, dB


class Espeak:
    """eSpeak NG in this process: synchronous synthesis into a buffer of 16-bit samples."""

    def __init__(self) -> None:
        import espeakng_loader

        self.lib = ctypes.CDLL(espeakng_loader.get_library_path())
        self.rate = self.lib.espeak_Initialize(2, 0, espeakng_loader.get_data_path().encode(), 0)
        if self.rate <= 0:
            raise RuntimeError("eSpeak NG did not initialize (espeakng-loader's data path)")
        self.chunks: list[np.ndarray] = []
        proto = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
        self.callback = proto(self._collect)  # kept referenced: eSpeak calls it later
        self.lib.espeak_SetSynthCallback(self.callback)

    def _collect(self, wav, n: int, _events) -> int:
        if n > 0:
            self.chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0

    def say(self, text: str, voice: str, rate: int, pitch: int, seed: int = 0) -> np.ndarray:
        """`text` spoken, float32 at 16 kHz; `seed` fixes eSpeak's breath noise (else the clock's)."""
        import soxr

        if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ValueError(f"eSpeak NG has no voice {voice!r}")
        self.lib.espeak_SetParameter(1, rate, 0)  # espeakRATE
        self.lib.espeak_SetParameter(3, pitch, 0)  # espeakPITCH
        self.lib.espeak_ng_SetRandSeed(ctypes.c_long(seed))
        self.chunks = []
        data = text.encode()
        self.lib.espeak_Synth(data, len(data) + 1, 0, 1, 0, 1, None, None)  # UTF-8, synchronous
        wave = np.concatenate(self.chunks).astype(np.float32) / 32768.0
        return soxr.resample(wave, self.rate, 16000).astype(np.float32)


def sentences(n: int, rng: random.Random, avoid: set[str]) -> list[str]:
    """`n` distinct sentences from the templates, none in `avoid`."""
    out: list[str] = []
    while len(out) < n:
        name, name2 = rng.sample(NAMES, 2)
        thing, thing2 = rng.sample(THINGS, 2)
        text = rng.choice(TEMPLATES).format(name=name, name2=name2, thing=thing, thing2=thing2,
                                            adj=rng.choice(ADJECTIVES))
        text = text[0].upper() + text[1:] + "."
        if text not in avoid and text not in out:
            out.append(text)
    return out


def write_split(folder: Path, texts: list[str], voices: list[str], rng: random.Random,
                tts: Espeak) -> dict:
    """One split's WAVs and metadata.csv; its seconds of audio and of synthesis."""
    import soundfile as sf

    folder.mkdir(parents=True, exist_ok=True)
    rows, audio_s, t0 = [], 0.0, time.perf_counter()
    for i, text in enumerate(texts):
        voice, rate, pitch, snr = (rng.choice(voices), rng.choice(RATES), rng.choice(PITCHES),
                                   rng.choice(SNRS))
        wave = tts.say(text, voice, rate, pitch, seed=i)
        if snr is not None:  # white noise at `snr` dB below the speech's power
            power = float(np.mean(wave**2)) / 10 ** (snr / 10)
            wave = wave + np.random.default_rng(rng.randrange(2**32)).normal(
                0, power**0.5, wave.shape).astype(np.float32)
        wave = wave / max(1.0, float(np.abs(wave).max()))
        sf.write(folder / f"{i:05d}.wav", wave, 16000, subtype="PCM_16")
        audio_s += len(wave) / 16000
        rows.append({"file_name": f"{i:05d}.wav", "transcription": text, "voice": voice,
                     "rate": rate, "pitch": pitch, "snr_db": snr or ""})
    seconds = time.perf_counter() - t0
    with open(folder / "metadata.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return {"utterances": len(rows), "audio_s": round(audio_s, 1), "synthesis_s": round(seconds, 2),
            "utterances_per_s": round(len(rows) / seconds, 1)}


def read_split(folder: Path) -> list[dict]:
    with open(folder / "metadata.csv", newline="") as f:
        return list(csv.DictReader(f))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=CACHE / "speech-set")
    p.add_argument("--train", type=int, default=400)
    p.add_argument("--test", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="8 + 4 utterances in a temporary folder")
    args = p.parse_args(argv)
    if args.smoke:
        import tempfile

        args.out, args.train, args.test = Path(tempfile.mkdtemp(prefix="speech_set_")), 8, 4
    rng, tts = random.Random(args.seed), Espeak()
    train = sentences(args.train, rng, set())
    test = sentences(args.test, rng, set(train))
    report = {"train": write_split(args.out / "train", train, TRAIN_VOICES, rng, tts),
              "test": write_split(args.out / "test", test, TEST_VOICES, rng, tts), "out": str(args.out)}
    print(json.dumps(report, indent=1))
    (args.out / "report.json").write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
