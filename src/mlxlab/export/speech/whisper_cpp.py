"""`mlxlab export RUN --format whisper.cpp --out FILE.bin [--quant f16|f32|q8_0|q5_0|q5_1|q4_0]`:
a Whisper run (or folder) as whisper.cpp's model file (ggml_file.py, whisper_cpp_layout.py),
its LoRA adapters fused, proven by whisper.cpp itself before it is moved to FILE.bin:

- float (f16, f32): whisper.cpp (whisper_cpp_run.py) transcribes the probe utterances from
  the written file and must give, utterance by utterance, the transcript mlxlab's greedy
  decoding gives of the run (decoding/transcription.py); any difference refuses the export.
  Compared, token for token, are the steps mlxlab decides decisively: an utterance's chosen
  tokens up to its first step whose token leads the next by under MARGIN logits. There,
  float16 (the file's weights, whisper.cpp's activations) may legitimately pick the other,
  and the rest of the transcript follows from that pick, so it is reported (how many
  transcripts are equal in full), not compared; a probe with no decisive step refuses the
  export (give --probe other utterances);
- quantized (q8_0, q5_0, q5_1, q4_0: gguf-py's quantizers, in the layout whisper.cpp's
  quantize tool writes): whisper.cpp transcribes every utterance of the run's transcription
  tasks (eval.tasks) or of --probe, and the word and character error rates are judged per
  utterance against the run and its base (retention.py): an export that loses the gain is
  refused unless --accept-loss.

The probe utterances: --probe (a transcription task file, audio/text rows), else the run's
transcription tasks; a float export with neither is checked on a few synthesized tones. A
refusal leaves nothing: the file is written in a scratch folder and moved into place last.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mlxlab.export.hf import ExportError
from mlxlab.export.speech.ggml_file import QUANTIZED, GGMLWhisper, write_ggml
from mlxlab.export.speech.retention import Utterances, judge_transcripts
from mlxlab.export.speech.whisper_cpp_layout import (
    check_quant,
    check_vocabulary,
    ggml_tensors,
    hparams,
    mel_filters,
    vocabulary,
)
from mlxlab.export.speech.whisper_cpp_run import token_limit, whisper_cpp_decode

CHECKED = 8   # probe utterances a float export is checked on
MARGIN = 0.5  # logits: a greedy step closer than this is a near-tie float16 may flip
F32_ABORT = ("this whisper.cpp runs its encoder's convolutions on f16 kernels only and aborts "
             "on an f32 file: export --quant f16 (float16 weights) or --format hf (float32)")


@dataclass
class Probe:
    """The utterances an export is checked or judged on: per task, its Utterances and audio."""

    tasks: list[Utterances] = field(default_factory=list)
    audio: list[list[np.ndarray]] = field(default_factory=list)
    language: str = "en"
    where: str = ""
    non_speech: bool = False  # the model suppresses text tokens (OpenAI's non-speech symbols)


def export_whisper_cpp(source: str | Path, out: str | Path, quant: str = "f16", *,
                       overwrite: bool = False, probe: str | Path | None = None,
                       accept_loss: bool = False) -> dict[str, Any]:
    """Write `source` (a Whisper run or folder) as whisper.cpp's `out` in `quant` once
    whisper.cpp has proven it (module docstring); the report. Bad input and refusals are
    ValueErrors (ExportError), with nothing written."""
    from mlxlab.runs.speech_model import is_speech_source, load_speech_model

    check_quant(quant)
    out = Path(out).expanduser()
    if out.is_dir() or (out.exists() and not overwrite):
        raise ExportError(f"--out {out} exists: give a new file name, or --overwrite"
                          if not out.is_dir() else f"--out {out} is a folder: give the .bin "
                          "file to write")
    if not is_speech_source(source):
        raise ExportError(f"--format whisper.cpp exports a Whisper (a speech run or a Whisper "
                          f"folder); {source} is not one: export it --format hf or gguf")
    loaded = load_speech_model(source)
    config = loaded.model.config
    check_vocabulary(config, loaded.tokenizer)
    utterances = probe_utterances(loaded, probe)
    eot = int(loaded.tokenizer.convert_tokens_to_ids("<|endoftext|>"))
    utterances.non_speech = any(int(t) < eot for t in
                                loaded.model.generation_config.get("suppress_tokens") or [])
    if quant in QUANTIZED and not utterances.tasks:
        raise ExportError(f"--quant {quant} is judged on transcribed utterances: give --probe "
                          "TASK.jsonl (audio/text rows), or export a run scored on eval.tasks")
    if quant not in QUANTIZED:  # a float file is checked on the first CHECKED utterances
        utterances.audio = [audio[:CHECKED] for audio in utterances.audio]
    limit = token_limit(int(config["max_target_positions"]))
    run_texts = [mlxlab_transcripts(loaded, audio, utterances.language, limit)
                 for audio in utterances.audio]
    decisive = ([] if quant in QUANTIZED else
                [[_decisive(loaded, clip, utterances.language, limit) for clip in audio]
                 for audio in utterances.audio])
    base_texts, base_from = (base_transcripts(loaded, utterances, limit)
                             if quant in QUANTIZED else (None, ""))
    weights = fused_weights(loaded.model)
    work = Path(tempfile.mkdtemp(prefix="mlxlab-whisper-cpp-"))
    try:
        written = work / out.name
        size = write_ggml(written, GGMLWhisper(
            hparams(config, quant), mel_filters(int(config["num_mel_bins"])),
            vocabulary(loaded.tokenizer, int(config["vocab_size"])), ggml_tensors(weights, quant)))
        report = {"format": "whisper.cpp", "source": str(loaded.path), "out": str(out),
                  "quant": quant, "bytes": size, "probe": utterances.where}
        theirs, their_ids = _whisper_cpp(written, utterances, limit, work, quant)
        if quant in QUANTIZED:
            report["retention"] = judge_transcripts(
                utterances.tasks, run_texts, theirs, base_texts, base_from=base_from,
                written=str(out), accept_loss=accept_loss,
                instead="export --quant q8_0 or f16")
            report["retention"]["recorded"] = _record(loaded, quant, report["retention"])
        else:
            report["check"] = compare_transcripts(utterances, run_texts, theirs, their_ids,
                                                  decisive)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(written), str(out))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return report


def _record(loaded: Any, quant: str, entry: dict) -> str:
    """The retention on a run's MLflow run (export/retention.py's `record`): "yes", or why
    not."""
    if loaded.kind != "run" or loaded.checkpoint is None:
        return "no: not a run"
    from mlxlab.checkpoint import CheckpointState
    from mlxlab.export.retention import record

    why = record(CheckpointState.read(loaded.checkpoint), f"whisper.cpp-{quant}", entry)
    return why or "yes"


def fused_weights(model: Any) -> dict[str, np.ndarray]:
    """The model's parameters as float32 numpy under transformers' names, LoRA adapters fused
    into their weights (in place: the model is the export's from here on)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlxlab.models.adapters.lora import fuse_lora

    fuse_lora(model)
    return {name: np.array(value.astype(mx.float32))
            for name, value in tree_flatten(model.parameters())}


def mlxlab_transcripts(loaded: Any, audio: list[np.ndarray], language: str,
                        limit: int) -> list[str]:
    from mlxlab.data.audio_features import log_mel_batch
    from mlxlab.decoding.transcription import transcribe

    n_mels = int(loaded.model.config["num_mel_bins"])
    out: list[str] = []
    for start in range(0, len(audio), 8):
        features = np.array(log_mel_batch(audio[start:start + 8], n_mels))
        out += transcribe(loaded.model, loaded.tokenizer, features, language=language,
                          max_new_tokens=limit)
    return out


def base_transcripts(loaded: Any, probe: Probe, limit: int
                      ) -> tuple[list[list[str]] | None, str]:
    """The base's transcripts: the run with its adapters off, the pretrained folder a full
    fine-tune started from, or none (a folder exported as it is)."""
    from mlxlab.models.adapters.lora import adapters_off, has_adapters

    if has_adapters(loaded.model):
        with adapters_off(loaded.model):
            return ([mlxlab_transcripts(loaded, a, probe.language, limit) for a in probe.audio],
                    "the run with its adapters off")
    if loaded.kind != "run":
        return None, "none: a Whisper folder, not a fine-tune (judged against the folder)"
    from mlxlab.checkpoint import CheckpointState
    from mlxlab.runs.named_model import EvalModel

    state = CheckpointState.read(loaded.checkpoint)
    folder = Path(str((state.config.get("model") or {}).get("pretrained"))).expanduser()
    try:
        from mlxlab.models.speech.whisper import WhisperModel

        base = WhisperModel(pretrained=str(folder))
        base.eval()
    except Exception as err:  # noqa: BLE001 - no base is a reported gap, not a failed export
        return None, f"none: {folder} did not load ({type(err).__name__})"
    other = EvalModel(base, loaded.tokenizer, folder, "pretrained")
    return [mlxlab_transcripts(other, a, probe.language, limit) for a in probe.audio], str(folder)


def _whisper_cpp(written: Path, probe: Probe, limit: int, work: Path, quant: str
                 ) -> tuple[list[list[str]], list[list[list[int]]]]:
    """whisper.cpp's transcripts and chosen ids of every probe utterance, per task."""
    flat = [clip for task in probe.audio for clip in task]
    try:
        texts, ids = whisper_cpp_decode(written, flat, language=probe.language,
                                        max_new_tokens=limit, work=work / "whisper_cpp",
                                        non_speech=probe.non_speech)
    except ValueError as err:
        raise ExportError(f"refused: {err}" + (f" ({F32_ABORT})" if quant == "f32" else "")) \
            from None
    out_texts, out_ids, start = [], [], 0
    for task in probe.audio:
        out_texts.append(texts[start:start + len(task)])
        out_ids.append(ids[start:start + len(task)])
        start += len(task)
    return out_texts, out_ids


def _decisive(loaded: Any, clip: np.ndarray, language: str, limit: int
              ) -> tuple[list[int], int, int]:
    """mlxlab's greedy choice for `clip` (its tokens, the end token included where it
    ended), how many leading steps are decisive (the chosen token leads every other allowed
    token by MARGIN logits or more) and the end token's id."""
    import mlx.core as mx

    from mlxlab.data.audio_features import log_mel_batch
    from mlxlab.decoding.transcription import prompt_for, transcribe_ids

    model, n_mels = loaded.model, int(loaded.model.config["num_mel_bins"])
    features = np.array(log_mel_batch([clip], n_mels))
    tokens = transcribe_ids(model, loaded.tokenizer, features, language=language,
                            max_new_tokens=limit)[0]
    prompt = prompt_for(model, loaded.tokenizer, language)
    chosen = tokens + ([prompt.eos] if len(tokens) < limit else [])
    ids = mx.array([prompt.ids + chosen[:-1]], dtype=mx.int32)
    logits = np.array(model(mx.array(features), ids)[0].astype(mx.float32))
    for step, token in enumerate(chosen):
        row = logits[len(prompt.ids) - 1 + step].copy()
        row[[t for t in prompt.suppress if t < row.size]] = -np.inf
        if step == 0:
            row[[t for t in prompt.begin_suppress if t < row.size]] = -np.inf
        if row[token] - np.max(np.delete(row, token)) < MARGIN:
            return chosen, step, prompt.eos
    return chosen, len(chosen), prompt.eos


def compare_transcripts(probe: Probe, run: list[list[str]], theirs: list[list[str]],
                        their_ids: list[list[list[int]]],
                        decisive: list[list[tuple[list[int], int, int]]]) -> dict:
    """The float file's check: on every probe utterance, whisper.cpp's chosen tokens are
    mlxlab's through the decisive steps (an ExportError naming the first utterance where they
    are not, or where no step is decisive); how many transcripts are equal in full is
    reported."""
    utterances = equal = compared = total = differ = 0
    first = ""
    for task, ours, other, ids, sure in zip(probe.tasks, run, theirs, their_ids, decisive,
                                            strict=True):
        for ident, a, b, got, (chosen, lead, eos) in zip(task.ids, ours, other, ids, sure,
                                                         strict=False):
            utterances += 1
            equal += a == b
            compared += lead
            total += len(chosen)
            seq = [t for t in got if t < eos] + ([eos] if eos in got else [])
            if seq[:lead] != chosen[:lead]:
                differ += 1
                first = first or f"{task.task}/{ident}: the run {a!r}, whisper.cpp {b!r}"
    if differ:
        raise ExportError(f"refused: whisper.cpp decodes the written file differently from the "
                          f"run on {differ} of {utterances} probe utterances, within the steps "
                          f"mlxlab decides by {MARGIN} logits or more ({first}); the file does "
                          "not hold the run's model: export --format hf")
    if not compared:
        raise ExportError(f"refused: mlxlab's greedy decoding of the {utterances} probe "
                          f"utterances has a near-tie (two tokens within {MARGIN} logits) at "
                          "its first step on each, where float16 may pick either, so "
                          "whisper.cpp's reading of the file is not proven: give --probe other "
                          "utterances")
    return {"status": "checked", "checker": "whisper.cpp (pywhispercpp)",
            "utterances": utterances, "equal_transcripts": equal, "decisive_tokens": compared,
            "tokens": total, "margin": MARGIN, "probe": probe.where}


def probe_utterances(loaded: Any, probe: str | Path | None) -> Probe:
    """The utterances to check or judge the export on (module docstring)."""
    from mlxlab.data.audio_io import read_audio
    from mlxlab.evaluation.speech.word_errors import text_normalizer
    from mlxlab.evaluation.tasks import TRANSCRIPTION, read_tasks

    config = _run_config(loaded)
    settings = config.get("eval") or {}
    language = settings.get("language") or (config.get("data") or {}).get("language") or "en"
    if probe is not None:
        tasks, where = read_tasks([probe]), f"--probe {probe}"
        if tasks[0].kind != TRANSCRIPTION:
            raise ExportError(f"--probe {probe}: a transcription task (audio/text rows), not "
                              f"a {tasks[0].kind} task")
    else:
        files = [t for t in settings.get("tasks") or [] if str(t).endswith(".jsonl")]
        tasks = [t for t in (read_tasks(files) if files else []) if t.kind == TRANSCRIPTION]
        where = "the run's eval.tasks" if tasks else ""
    normalize = text_normalizer(settings.get("normalizer", "auto"), language)
    out = Probe(language=language, where=where)
    for task in tasks:
        out.tasks.append(Utterances(task.name, [e.id for e in task.examples],
                                    [e.text for e in task.examples], normalize))
        out.audio.append([read_audio(e.audio) for e in task.examples])
    if not out.tasks:
        out.tasks, out.audio = _tones(normalize)
        out.where = "synthesized tones (no --probe, no transcription task on the run)"
    return out


def _run_config(loaded: Any) -> dict:
    if loaded.kind != "run" or loaded.checkpoint is None:
        return {}
    from mlxlab.checkpoint import CheckpointState

    return CheckpointState.read(loaded.checkpoint).config


def _tones(normalize) -> tuple[list[Utterances], list[list[np.ndarray]]]:
    """Three tones with a little noise (1-3 s): a float file's check where no utterances are
    at hand (the transcripts compared, not scored; the references are placeholders)."""
    rate = 16_000
    clips = []
    for i, (seconds, hz) in enumerate([(1.2, 330.0), (2.0, 660.0), (3.0, 990.0)]):
        t = np.arange(int(seconds * rate)) / rate
        noise = np.random.default_rng(i).normal(0, 0.05, t.size)
        clips.append((0.4 * np.sin(2 * np.pi * hz * t) + noise).astype(np.float32))
    ids = [f"tone{i}" for i in range(len(clips))]
    return [Utterances("tones", ids, ["tone"] * len(clips), normalize)], [clips]
