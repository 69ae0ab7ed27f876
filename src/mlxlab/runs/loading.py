"""A finished run loaded to be used: its model (eval mode), the tokenizer it was trained with
(checked against the checkpoint's hash) and, for CSV classifiers, the row encoding learnt from
the training CSV (saved in the checkpoint). predict.py, generate.py and evaluation/file_metrics.py take the
LoadedRun this makes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import OmegaConf
from tokenizers import Tokenizer

from mlxlab.data.tokenizer import tokenizer_hash
from mlxlab.runs.model import load_run_model
from mlxlab.runs.tokenizer import require_run_tokenizer

if TYPE_CHECKING:  # mlx is imported through mlxlab, which loads the fast BLAS first
    import mlx.nn as nn

    from mlxlab.checkpoint import CheckpointState
    from mlxlab.data.tabular import TabularText


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
    if "numeric" not in data_cfg:  # older still than numeric bins: numbers as text
        data_cfg.numeric = "text"
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
