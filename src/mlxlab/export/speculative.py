"""A run and its draft model for llama.cpp and LM Studio: both GGUF files and the command that
pairs them.

    export_gguf_with_draft("outputs/ft/<time>", "outputs/draft_model/<time>", "exported/ft.gguf")
    -> exported/ft.gguf, exported/ft.draft.gguf, exported/ft.Modelfile,
       exported/ft.llama-server.sh  (llama-server -m ft.gguf -md ft.draft.gguf --draft-max 3)

The pair is checked as `mlxlab generate --draft` checks it (decoding/speculative.py check_draft:
the same tokenizer and vocabulary, a smaller draft, caches that roll back) before a file is
written. llama.cpp pairs them on its command line (`-md`); LM Studio pairs them in its chat
sidebar (Speculative Decoding: Draft Model) or through its SDK's `draftModel`, once both files
are imported; Ollama has no draft models (its Modelfile serves the run alone).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Unpack

from mlxlab.errors import ConfigError
from mlxlab.export.llama_server import command_path, llama_server_script, write_script
from mlxlab.export.request import DraftGGUFOptions, known_options


def draft_gguf_path(gguf_file: Path) -> Path:
    """The draft's GGUF beside the run's: `ft.gguf` -> `ft.draft.gguf`."""
    return gguf_file.with_name(f"{gguf_file.stem}.draft.gguf")


def llama_server_command(gguf_file: Path, draft_file: Path, num_draft_tokens: int) -> str:
    """A shell script that runs `llama-server` on the pair from the folder it lies in (the
    files named relative to it, so the folder may move); its arguments go on to llama-server."""
    model, draft = gguf_file.name, draft_file.name
    return llama_server_script(f"""
{model} with its draft {draft}: speculative decoding in llama.cpp's server. Greedy answers
are {model}'s own, sooner. Arguments go on to llama-server (--port 8080; -ngl 99 -ngld 99
puts both models on a GPU).
LM Studio: `lms import {model}` and `lms import {draft}`, load the first, then pick the second
as the Draft Model under Speculative Decoding in the chat sidebar (or its SDK's draftModel).
Ollama has no draft models: `ollama create NAME -f {Path(model).stem}.Modelfile` serves
{model} alone.""", ["-m", model, "-md", draft, "--draft-max", str(num_draft_tokens)])


def check_pair(run: str | Path, draft: str | Path) -> None:
    """`draft` is a draft `run` can use (check_draft), else one ConfigError line."""
    from mlxlab.runs.named_model import load_draft, load_eval_model

    target = load_eval_model(str(run), "best", "plain", purpose="mlxlab export --draft")
    load_draft(target, draft, purpose="mlxlab export --draft")


def export_gguf_with_draft(run: str | Path, draft: str | Path, out: str | Path,
                           quant: str = "f16", **options: Unpack[DraftGGUFOptions]) -> dict:
    """The run as `out` (export_gguf: its Modelfile beside it), the draft as
    draft_gguf_path(out) in the same --quant, and the llama-server script that pairs them;
    returns the run's export report with `draft` (the draft's) and `command` (the script).
    Each file is judged as export_gguf judges it (`retention`: --tasks, --accept-loss, for
    both), all are written under a temporary folder beside `out` and moved into place together
    once both are: a refusal of either leaves nothing."""
    from mlxlab.export import export_gguf, is_model_folder
    from mlxlab.export.ollama import modelfile_path

    given = known_options(options, DraftGGUFOptions, "export_gguf_with_draft")
    overwrite, check = given.get("overwrite", False), given.get("check", True)
    num_draft_tokens, retention = given.get("num_draft_tokens", 3), given.get("retention")
    out = Path(out).expanduser()
    if num_draft_tokens < 1:
        raise ConfigError(f"--num-draft-tokens must be >= 1, got {num_draft_tokens}")
    draft_file, script = draft_gguf_path(out), command_path(out)
    outputs = (out, modelfile_path(out), draft_file, script)
    for existing in outputs:
        if existing.exists() and not overwrite:
            raise ConfigError(f"{existing} exists: pick a new --out or pass --overwrite")
    check_pair(run, draft)
    tmp = out.parent / f".{out.name}.draft-{os.getpid()}"
    try:
        tmp.mkdir(parents=True)
        report = export_gguf(run, tmp / out.name, quant, check=check, retention=retention)
        draft_report = export_gguf(draft, tmp / draft_file.name, quant, check=check,
                                   retention=None if is_model_folder(Path(draft).expanduser())
                                   else retention)  # a folder has no run to be judged against
        # a draft is not a model to talk to: Ollama gets the run's Modelfile only
        Path(draft_report.pop("modelfile")).unlink(missing_ok=True)
        write_script(tmp / script.name, llama_server_command(out, draft_file, num_draft_tokens))
        for file in outputs:  # all written and judged: moved into place together
            os.replace(tmp / file.name, file)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for written, file in ((report, out), (draft_report, draft_file)):
        written["gguf"] = str(file)
        if written.get("retention"):  # judged in the temporary folder: named where it lies
            written["retention"]["read_back"] = str(file)
    report.update(modelfile=str(modelfile_path(out)), draft=draft_report, command=str(script),
                  num_draft_tokens=num_draft_tokens)
    return report
