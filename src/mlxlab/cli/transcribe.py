"""Transcribe audio files with a Whisper model (a Whisper folder, or a finished speech run),
one transcript a line, in the order the files are given.

    mlxlab transcribe models/whisper-tiny speech/a.wav speech/b.flac
    mlxlab transcribe outputs/speech/<time> *.wav --beam-size 5 --language de
    mlxlab transcribe RUN a.wav --checkpoint last --batch-size 8 --max-new-tokens 100

MODEL is a transformers Whisper folder (config.json with model_type whisper), an mlx-whisper
folder (its config.json with n_mels, ... and weights.safetensors or weights.npz, beside the
tokenizer files of the same size of Whisper), what `mlxlab export` wrote, a hub id, or a finished
run of model=whisper (its --checkpoint). Each file (WAV, FLAC, OGG; resampled to 16 kHz, mixed
to mono) is read, its first 30 s made into the model's log-mel features, and decoded from
Whisper's prompt <|startoftranscript|><|LANG|><|transcribe|><|notimestamps|>: greedily, or
with --beam-size N > 1 by beam search. --max-new-tokens caps each transcript (default 224, half
the decoder's 448 positions, as transformers' Whisper does).
"""

from __future__ import annotations

import sys

from mlxlab.cli.common import add_run_arguments, guarded, parser_for


def main(argv: list[str]) -> int:
    parser = parser_for("transcribe", __doc__)
    add_run_arguments(parser, any_model=True)
    parser.add_argument("audio", nargs="+", help="audio files (WAV, FLAC, OGG)")
    parser.add_argument("--language", default="en", help="Whisper's language code (en, de, ...)")
    parser.add_argument("--beam-size", type=int, default=1, help="1 = greedy")
    parser.add_argument("--max-new-tokens", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=8, help="files decoded at once")
    args = parser.parse_args(argv)

    def body() -> int:
        import numpy as np

        from mlxlab.data.audio_features import log_mel_batch
        from mlxlab.data.audio_io import read_audio
        from mlxlab.decoding.transcription import check_settings, transcribe
        from mlxlab.runs.speech_model import load_speech_model

        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        audios = [read_audio(p) for p in args.audio]  # every file read before any work
        check_source(args.run, args.checkpoint)
        loaded = load_speech_model(args.run, args.checkpoint)
        check_settings(loaded.model, loaded.tokenizer, args.language, args.beam_size,
                       args.max_new_tokens)
        print(f"[{loaded.checkpoint or loaded.path}]", file=sys.stderr)
        for start in range(0, len(audios), args.batch_size):
            features = np.array(log_mel_batch(audios[start:start + args.batch_size],
                                              int(loaded.model.config["num_mel_bins"])))
            for text in transcribe(loaded.model, loaded.tokenizer, features,
                                   language=args.language, beam_size=args.beam_size,
                                   max_new_tokens=args.max_new_tokens):
                print(text, flush=True)
        return 0

    return guarded("transcribe", body)


def check_source(name: str, which: str) -> None:
    """A run that is no speech run is one line (a folder says what it is when it loads)."""
    from mlxlab.errors import ConfigError
    from mlxlab.runs.model_source import RUN, open_model_source
    from mlxlab.runs.speech_model import speech_run_config

    source = open_model_source(name)
    if source.kind == RUN and speech_run_config(source.path, which) is None:
        raise ConfigError(f"{name} is not a speech run (model=whisper): transcribe with a "
                          "Whisper folder or a run that fine-tuned one")
