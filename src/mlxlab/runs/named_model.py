"""A model a verb names, loaded to score or to generate from: a Hugging Face or mlx-lm folder (a
pretrained checkpoint, or what `mlxlab export` wrote) or a finished run (its best or last
checkpoint), with the tokenizer it reads and its chat template. `mlxlab eval` and lm-eval's
`mlxlab` model (evaluation/), `mlxlab generate` and a speculative draft (decoding/speculative.py)
load through `load_eval_model`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import mlx.nn as nn
from tokenizers import Tokenizer

from mlxlab.data.chat import ChatTemplate, chat_template
from mlxlab.decoding.speculative import check_draft, same_tokenizer
from mlxlab.errors import ConfigError, MissingFileError
from mlxlab.runs.learned_reward import is_reward_run
from mlxlab.runs.loading import load_run, require_task
from mlxlab.runs.model_source import RUN, open_model_source


@dataclass
class EvalModel:
    """A model to score and where it came from: `kind` pretrained | export | run; a run's
    `checkpoint` and MLflow `run_id` (None elsewhere)."""

    model: nn.Module
    tokenizer: Tokenizer
    path: Path
    kind: str
    checkpoint: Path | None = None
    run_id: str | None = None
    template: ChatTemplate | None = None  # a chat model's: its prompts go through it
    tokenizer_folder: Path | None = None  # its tokenizer files (and end-of-text settings)
    provenance: dict = field(default_factory=dict)  # a model's (model_source.ModelSource)


def refuse_reward_model(name: str | Path, purpose: str = "scoring evaluation tasks") -> None:
    """One ConfigError line when `name` is a reward model's run (a score head: no next-token
    distribution to generate from or score choices with), before anything is loaded or logged."""
    try:
        source = open_model_source(name)
    except MissingFileError:  # the loading names it
        return
    if source.kind == RUN and is_reward_run(source.path):
        raise ConfigError(f"{source.path} is a reward model (model.head=score): it scores "
                          f"(prompt, completion) rows and cannot be used for {purpose}; give a "
                          "language model's run or folder (mlxlab eval REWARD_RUN rows.jsonl "
                          "scores rows with it)")


def load_eval_model(name: str | Path, which: str = "best", chat: str = "auto",
                    purpose: str = "scoring evaluation tasks") -> EvalModel:
    """The decoder `name` names (open_model_source: a Hugging Face / mlx-lm / exported folder,
    or a finished run, its `which` checkpoint), with the tokenizer it reads and, per `chat`
    (eval.chat), its chat template. `purpose` names the use in the error for a classifier."""
    refuse_reward_model(name, purpose)
    source = open_model_source(name)
    path = source.path
    if source.kind != RUN:
        from mlxlab.models.pretrained import pretrained_model

        if not (path / "tokenizer.json").is_file():
            raise ConfigError(f"{path} has no tokenizer.json: {purpose} needs the model's fast "
                              "tokenizer (saved by transformers) beside it")
        if (path / "adapters").is_dir():
            raise ConfigError(f"{path} holds a base model and LoRA adapters (mlxlab export "
                              "--adapters): use the run itself, or an export with --fuse-lora")
        model = pretrained_model(path)
        model.eval()
        return EvalModel(model, Tokenizer.from_file(str(path / "tokenizer.json")), path,
                         source.kind, template=chat_template(path, chat), tokenizer_folder=path,
                         provenance=source.provenance)
    run = load_run(path, which)
    require_task(run, "lm", purpose)
    folder = run.tokenizer_path.parent
    return EvalModel(run.model, run.tokenizer, path, RUN, run.checkpoint, run.state.run_id,
                     chat_template(folder, chat), tokenizer_folder=folder)


def load_draft(target: EvalModel, name: str | Path, purpose: str) -> nn.Module:
    """The draft model `name` names (its best checkpoint, plain prompts), checked against
    `target` for speculative decoding (decoding/speculative.py check_draft), else one
    ConfigError line; `purpose` names the use in the error for a classifier."""
    draft = load_eval_model(str(name), "best", "plain", purpose=purpose)
    check_draft(target.model, draft.model, same_tokenizer(target.tokenizer, draft.tokenizer))
    return draft.model
