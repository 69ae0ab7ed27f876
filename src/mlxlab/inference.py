"""One way to use a finished run: load it, predict rows, complete prompts, evaluate on new data.

    run = load_run("outputs/train/<time>")                  # best checkpoint; which="last" = newest
    predict_frame(run, pd.read_csv("test.csv"))             # classifier: id + label columns
    complete(run, "Once upon a time", max_tokens=50)         # language model: the continuation
    evaluate(run, "labelled.csv")                            # accuracy/F1/AUC, or loss/perplexity

The `mlxlab predict/generate/eval/register/serve` verbs and the MLflow pyfunc model
(serving/pyfunc.py) all go through here, so a run is loaded, checked and sampled one way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from omegaconf import OmegaConf
from tokenizers import Tokenizer

from mlxlab.data.tokenizer import EOT_TOKENS, find_token_id, start_ids, tokenizer_hash
from mlxlab.runs import load_run_model, require_run_tokenizer

if TYPE_CHECKING:  # mlx is imported through mlxlab, which loads the fast BLAS first
    import mlx.nn as nn

    from mlxlab.data.tabular import TabularText
    from mlxlab.training.checkpoint import CheckpointState


@dataclass
class LoadedRun:
    """A finished run ready to predict: `encoding` turns CSV rows into the run's token batches
    and its label ids back into label values (classifiers; None for language models)."""

    model: nn.Module
    tokenizer: Tokenizer
    encoding: TabularText | None
    config: dict
    checkpoint: Path
    state: CheckpointState
    tokenizer_path: Path

    @property
    def task(self) -> str:
        return "classification" if self.state.model_init.get("num_labels") else "lm"


def load_run(
    path: str | Path,
    which: str = "best",
    tokenizer_path: str | Path | None = None,
    encoding_state: dict | None = None,
) -> LoadedRun:
    """The run's model (eval mode) from its best (or `which="last"`: newest) checkpoint, the
    tokenizer it was trained with (checked against the checkpoint's hash) and, for CSV
    classifiers, the row encoding learnt from the training CSV (saved in the checkpoint; older
    checkpoints re-read the training CSV). `tokenizer_path`/`encoding_state` replace the run
    folder's (a logged MLflow model keeps them beside the checkpoint)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: pass a run directory (outputs/<task>/<time>) or a checkpoint"
        )
    tokenizer_path = Path(tokenizer_path or require_run_tokenizer(path, "mlxlab"))
    model, state = load_run_model(path, which)
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    expected = state.tokenizer_hash
    if expected and tokenizer_hash(tokenizer) != expected:
        raise ValueError(
            f"{tokenizer_path} is not the tokenizer {state.path} was trained with "
            "(hash differs): use the tokenizer.json of that run"
        )
    config = state.config
    encoding = None
    if state.model_init.get("num_labels"):
        encoding = _row_encoding(state, tokenizer, tokenizer_path, encoding_state)
    return LoadedRun(model, tokenizer, encoding, config, state.path, state,
                     tokenizer_path)


def _row_encoding(
    state: CheckpointState, tokenizer: Tokenizer, tokenizer_path: Path, saved: dict | None
) -> TabularText:
    from mlxlab.config import instantiate
    from mlxlab.data.tabular import TabularText

    data_cfg = OmegaConf.create(state.config["data"])
    if "label_column" not in data_cfg:
        raise ValueError(
            f"{state.path} is a classifier without a CSV data config (no "
            "label_column): only CSV classification runs predict rows"
        )
    data_cfg.tokenizer = {**data_cfg.get("tokenizer", {}), "path": str(tokenizer_path)}
    saved = saved or state.encoding
    if saved is not None:  # label values and columns saved by the run
        settings = OmegaConf.to_container(data_cfg, resolve=True)
        return TabularText.from_encoding_state(settings, tokenizer, saved)
    # A checkpoint from before mlxlab saved them: learn them from the training CSV again.
    data_cfg.cache_dir = None
    data = instantiate(data_cfg)
    if not Path(data.path).is_file():
        raise FileNotFoundError(
            f"the run's training CSV {data.path} is gone and {state.path} "
            "predates saved label values: restore the file at that path"
        )
    data.setup(None)
    return data


def require_task(run: LoadedRun, task: str, verb: str) -> None:
    """A clear error when a verb meets the other kind of run."""
    if run.task != task:
        wanted = {"lm": "a language model (e.g. experiment=tinystories_nano)",
                  "classification": "a CSV classifier (e.g. the default titanic run)"}[task]
        raise ValueError(
            f"{run.checkpoint} is a {type(run.model).__name__} {run.task} run: {verb} needs "
            f"{wanted}"
        )


# --------------------------------------------------------------------------- classifiers


def _rows(run: LoadedRun, df: pd.DataFrame, with_label: bool = False) -> pd.DataFrame:
    """The training columns of `df` in training order (extra columns dropped, so the text the
    model sees is the training text), or an error naming the missing ones."""
    data = run.encoding
    needed = list(data.columns) + ([data.id_column] if data.id_column else [])
    if with_label:
        needed.append(data.label_column)
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise ValueError(
            f"the CSV lacks column(s) {missing} the run was trained on; it has "
            f"{list(df.columns)} (give a CSV with the training columns"
            f"{'' if with_label else '; the label may be absent'})"
        )
    return df[needed].reset_index(drop=True)


def class_probabilities(run: LoadedRun, rows: pd.DataFrame, batch_size: int = 64) -> np.ndarray:
    """(N, num_labels) softmax probabilities for the rows of `rows`, in row order."""
    import mlx.core as mx

    probs = []
    for batch in run.encoding.encode_frame(rows, batch_size=batch_size):
        logits = run.model(batch["input_ids"], attention_mask=batch["attention_mask"])
        probs.append(np.array(mx.softmax(logits.astype(mx.float32), axis=-1)))
    return np.concatenate(probs) if probs else np.zeros((0, run.encoding.num_labels), np.float32)


def predict_frame(
    run: LoadedRun, frame: pd.DataFrame, batch_size: int = 64, probability: bool = False,
    max_new_tokens: int = 32,
) -> pd.DataFrame:
    """Classifier: the submission frame (id column if any, the label column with the original
    label values; `probability` of the predicted label with probability=True) for the rows of
    `frame`, in row order. Language model: `prompt` and its greedy `completion` for a frame with
    a `prompt` (or `text`) column."""
    if run.task == "lm":
        prompts = prompt_column(frame)
        completions = [complete(run, p, max_new_tokens, temperature=0.0) for p in prompts]
        return pd.DataFrame({"prompt": prompts, "completion": completions})
    rows = _rows(run, frame)
    probs = class_probabilities(run, rows, batch_size)
    out = run.encoding.submission(rows, probs.argmax(axis=-1)) if len(rows) else pd.DataFrame(
        {run.encoding.label_column: []}
    )
    if probability:
        out["probability"] = probs.max(axis=-1)
    return out


def prompt_column(frame: pd.DataFrame) -> list[str]:
    for column in ("prompt", "text"):
        if column in frame.columns:
            return [str(x) for x in frame[column]]
    raise ValueError(
        f"a language model predicts from a 'prompt' (or 'text') column, got columns "
        f"{list(frame.columns)}"
    )


# --------------------------------------------------------------------------- language models


def sample_ids(
    run: LoadedRun,
    prompt: str,
    max_tokens: int = 100,
    temperature: float = 0.8,
    top_k: int = 40,
    top_p: float = 0.95,
    seed: int = 0,
) -> Iterator[int]:
    """New token ids after `prompt`: at most `max_tokens`, ending before <|endoftext|>.

    The prompt starts as every document does in the training stream: after the tokenizer's BOS
    (a pretrained Llama's), else after the end-of-text token (ours).
    """
    from mlxlab.models.transformer import generate_step

    require_task(run, "lm", "generating text")
    if max_tokens < 0:
        raise ValueError(f"--max-tokens must be >= 0, got {max_tokens}")
    model, tokenizer = run.model, run.tokenizer
    eot = find_token_id(tokenizer, EOT_TOKENS, "end-of-text")
    start = start_ids(tokenizer) or [eot]
    prompt_ids = [*start, *tokenizer.encode(prompt, add_special_tokens=False).ids]
    if len(prompt_ids) >= model.max_seq_len:
        raise ValueError(
            f"the prompt is {len(prompt_ids)} tokens but the model's context is "
            f"{model.max_seq_len}: shorten --prompt"
        )
    if max_tokens == 0:
        return
    for n, token in enumerate(generate_step(model, prompt_ids, temperature, top_k, top_p, seed), 1):
        if token == eot:
            return
        yield token
        if n >= max_tokens:
            return


def decode_stream(tokenizer: Tokenizer, ids: Iterable[int]) -> Iterator[str]:
    """Text pieces as the ids come, each yielded once it is whole text.

    A byte-level BPE token can end inside a multi-byte character, which decodes as U+FFFD; such
    a tail is held back until a later token completes it (or shown as is at the end).
    """
    seen: list[int] = []
    shown = 0  # characters of decode(seen) already yielded
    text = ""
    for token in ids:
        seen.append(token)
        text = tokenizer.decode(seen, skip_special_tokens=False)
        if not text.endswith("\ufffd") and len(text) > shown:
            yield text[shown:]
            shown = len(text)
    if len(text) > shown:
        yield text[shown:]


def complete(
    run: LoadedRun,
    prompt: str,
    max_tokens: int = 100,
    temperature: float = 0.8,
    top_k: int = 40,
    top_p: float = 0.95,
    seed: int = 0,
    on_text: Callable[[str], None] | None = None,
) -> str:
    """The continuation of `prompt` (without the prompt); `on_text` sees each piece as it comes.
    temperature=0 is greedy."""
    pieces = []
    ids = sample_ids(run, prompt, max_tokens, temperature, top_k, top_p, seed)
    for piece in decode_stream(run.tokenizer, ids):
        pieces.append(piece)
        if on_text is not None:
            on_text(piece)
    return "".join(pieces)


# --------------------------------------------------------------------------- evaluation


def evaluate(run: LoadedRun, data: str | Path, batch_size: int = 64) -> dict[str, Any]:
    """Metrics of the run on new data: a labelled CSV for a classifier (loss, accuracy, f1,
    roc_auc as in training's val/ metrics, plus the confusion matrix and label names), a text
    file (or jsonl/parquet with a text column) for a language model (token-weighted loss and
    perplexity over the file packed into the run's windows, as training's validation does)."""
    data = Path(data).expanduser()
    if not data.is_file():
        raise FileNotFoundError(f"{data} not found: give a labelled CSV (classifier) or a text "
                                "file (language model)")
    if run.task == "lm":
        return _evaluate_text(run, data, batch_size)
    return _evaluate_csv(run, data, batch_size)


def _evaluate_csv(run: LoadedRun, path: Path, batch_size: int) -> dict[str, Any]:
    from mlxlab.data.tabular import read_csv
    from mlxlab.training.metrics import classification_metrics, confusion_matrix

    enc = run.encoding
    if path.suffix.lower() not in (".csv", ".tsv", ".txt"):
        raise ValueError(f"{path} is not a CSV: a classifier is evaluated on a labelled CSV")
    df = read_csv(path)
    rows = _rows(run, df, with_label=True)
    rows = rows[rows[enc.label_column].notna()].reset_index(drop=True)
    index = {v: i for i, v in enumerate(enc.label_values)}
    unknown = sorted({str(v) for v in rows[enc.label_column] if v not in index})
    if unknown:
        raise ValueError(
            f"{path}: label value(s) {unknown[:5]} in column {enc.label_column!r} were not in "
            f"the training data (known: {enc.label_names}); evaluate on rows with known labels"
        )
    if not len(rows):
        raise ValueError(f"{path} has no labelled rows to evaluate")
    y = rows[enc.label_column].map(index).to_numpy(np.int64)
    probs = class_probabilities(run, rows.drop(columns=[enc.label_column]), batch_size)
    loss = float(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, None)).mean())
    metrics = {k.split("/", 1)[1]: v for k, v in classification_metrics(y, probs, loss).items()}
    return {"task": "classification", "checkpoint": str(run.checkpoint), "rows": len(y),
            **metrics, "labels": list(enc.label_names),
            "confusion": confusion_matrix(y, probs.argmax(axis=1), enc.num_labels).tolist()}


def _evaluate_text(run: LoadedRun, path: Path, batch_size: int) -> dict[str, Any]:
    from mlxlab.data.batching import Batching
    from mlxlab.data.streaming import StreamingText, regroup_flat_config
    from mlxlab.export.quality import lm_metrics

    saved = regroup_flat_config(run.config.get("data", {}))  # runs saved before the grouping too
    source, packing = saved.get("source") or {}, saved.get("packing") or {}
    seq_len = int(packing.get("seq_len") or run.model.max_seq_len)
    # The whole file is the "validation split": packed unshuffled into the run's windows with
    # its tokenizer, each document after BOS (if any) and before end-of-text, as in training.
    data = StreamingText(
        source={"data_files": str(path), "text_column": source.get("text_column", "text"),
                "sample_by": source.get("sample_by", "paragraph")},
        splits={"val_split": "train", "val_examples": 0}, packing={"seq_len": seq_len},
        shuffle_buffer=0, tokenizer={"path": str(run.tokenizer_path)},
    )
    data.setup(None)
    batches = list(data.val_batches(Batching(batch_size=max(1, min(batch_size, 8)))))
    if not batches:
        raise ValueError(f"{path} holds no text to evaluate")
    metrics = lm_metrics(run.model, batches)
    return {"task": "lm", "checkpoint": str(run.checkpoint), "tokens": int(metrics["tokens"]),
            "loss": metrics["loss"], "perplexity": metrics["perplexity"],
            "accuracy": metrics["accuracy"]}
