"""A whisper.cpp model file run by whisper.cpp itself (pywhispercpp's prebuilt library: the
`speech` extra on Linux x86-64 and macOS arm64), decoding as mlxlab's greedy transcription
does (decoding/transcription.py):

- the prompt <|startoftranscript|><|lang|><|transcribe|><|notimestamps|> (whisper.cpp's
  no_timestamps), one 30-second window (single_segment), temperature 0 and no fallback to
  higher ones (temperature_inc 0), none of its entropy, log-probability or no-speech
  thresholds dropping a transcript;
- at most `max_new_tokens` tokens: whisper.cpp's max_tokens stops one token later than its
  value, and its own limit is n_text_ctx / 2 - 4, so `max_new_tokens` must stay under that
  (`token_limit`);
- whisper.cpp always suppresses its special tokens and, as the first token, a blank and the
  end (suppress_blank): what a Whisper checkpoint's generation config suppresses too; where
  that config also suppresses text tokens (OpenAI's non-speech symbols, as checkpoints do),
  whisper.cpp suppresses its own list of them (suppress_nst, the same list), so the two
  greedy decodings agree where the logits do.

whisper.cpp computes the log-mel features itself, from the file's mel filters; audio shorter
than a second it refuses to transcribe, so utterances are padded with silence to 1.1 s (the
features mlxlab computes are of the audio padded to 30 s already: the same).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16_000
SHORTEST = int(1.1 * SAMPLE_RATE)


def token_limit(n_text_ctx: int) -> int:
    """The most tokens both decoders produce for a decoder of `n_text_ctx` positions:
    whisper.cpp gives up (an empty transcript) on a transcript that reaches n_text_ctx / 2 -
    4 tokens without ending."""
    return max(1, n_text_ctx // 2 - 5)


def whisper_cpp_model(path: Path, log: Path):
    """pywhispercpp's Model of the file `path` (its load log written to `log`); a ValueError
    naming the last line of whisper.cpp's log where it does not load."""
    try:
        from pywhispercpp.model import Model
    except ImportError as err:
        raise ValueError("reading the file in whisper.cpp needs pywhispercpp (pip install "
                         f"'mlxlab[speech]'; {err})") from None
    threads = max(1, min(4, os.cpu_count() or 1))
    try:
        model = Model(str(path), redirect_whispercpp_logs_to=str(log), n_threads=threads,
                      print_progress=False, print_realtime=False)
    except Exception as err:  # noqa: BLE001 - whisper.cpp's refusal, reported as a line
        raise ValueError(f"whisper.cpp did not load {path.name}: {_last_line(log) or err}") \
            from None
    return model  # a file whisper.cpp refuses ends the child process: its parent reports it


def _last_line(log: Path) -> str:
    try:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    errors = [line for line in lines if "error" in line.lower() or "failed" in line.lower()]
    return (errors or lines or [""])[-1].strip()


def whisper_cpp_transcripts(path: Path, audios: Sequence[np.ndarray], *, language: str,
                            max_new_tokens: int, work: Path, timeout: float = 1800) -> list[str]:
    """Each 16 kHz utterance of `audios` transcribed by whisper.cpp from the model file
    `path` (greedy, as the module says), its text stripped."""
    return whisper_cpp_decode(path, audios, language=language, max_new_tokens=max_new_tokens,
                              work=work, timeout=timeout)[0]


def whisper_cpp_decode(path: Path, audios: Sequence[np.ndarray], *, language: str,
                       max_new_tokens: int, work: Path, timeout: float = 1800,
                       non_speech: bool = False) -> tuple[list[str], list[list[int]]]:
    """whisper.cpp's transcripts of `audios` (whisper_cpp_transcripts) and the token ids it
    chose for each, its end token included where it ended; `non_speech` suppresses OpenAI's
    non-speech symbols (a checkpoint whose generation config does). whisper.cpp runs in a child
    process: a file it aborts on (a failed GGML_ASSERT ends the process) is a ValueError line
    naming the assertion, not a crash of the export."""
    import json
    import subprocess
    import sys

    work.mkdir(parents=True, exist_ok=True)
    padded = [np.asarray(a, np.float32) for a in audios]
    np.savez(work / "audio.npz", *[np.pad(a, (0, max(0, SHORTEST - a.size))) for a in padded])
    settings = {"language": language, "max_new_tokens": max_new_tokens,
                "non_speech": non_speech}
    (work / "settings.json").write_text(json.dumps(settings))
    done = subprocess.run([sys.executable, "-m", __name__, str(path), str(work)],
                          capture_output=True, text=True, timeout=timeout)
    result = work / "transcripts.json"
    if done.returncode != 0 or not result.is_file():
        why = _last_line(work / "whisper_cpp.log") or (done.stderr.strip().splitlines() or
                                                       [f"exit {done.returncode}"])[-1]
        assert_line = [line for line in (done.stderr or "").splitlines() if "GGML_ASSERT" in line]
        raise ValueError(f"whisper.cpp failed on {path.name} (exit {done.returncode}): "
                         f"{(assert_line or [why])[0].strip()}")
    return json.loads(result.read_text()), json.loads((work / "tokens.json").read_text())


def _transcribe_in_child(path: Path, work: Path) -> None:
    """The child's side: the file loaded in whisper.cpp, the utterances transcribed, the texts
    written to work/transcripts.json."""
    import json

    settings = json.loads((work / "settings.json").read_text())
    model = whisper_cpp_model(path, work / "whisper_cpp.log")
    params = dict(language=settings["language"], no_timestamps=True, single_segment=True,
                  no_context=True, temperature=0.0, temperature_inc=0.0, entropy_thold=-1.0,
                  logprob_thold=-1.0e30, no_speech_thold=2.0, suppress_blank=True,
                  suppress_nst=bool(settings.get("non_speech")),
                  max_tokens=max(0, settings["max_new_tokens"] - 1))
    import _pywhispercpp as pw

    with np.load(work / "audio.npz") as audio:
        texts, tokens = [], []
        for i in range(len(audio.files)):
            segments = model.transcribe(audio[f"arr_{i}"], **params)
            texts.append(" ".join(s.text for s in segments).strip())
            ctx = model._ctx  # pywhispercpp's whisper_context: the chosen ids are read from it
            tokens.append([pw.whisper_full_get_token_id(ctx, j, t)
                           for j in range(pw.whisper_full_n_segments(ctx))
                           for t in range(pw.whisper_full_n_tokens(ctx, j))])
    (work / "tokens.json").write_text(json.dumps(tokens))
    (work / "transcripts.json").write_text(json.dumps(texts))


if __name__ == "__main__":
    import sys

    try:
        _transcribe_in_child(Path(sys.argv[1]), Path(sys.argv[2]))
    except ValueError as err:
        print(err, file=sys.stderr)
        sys.exit(2)
