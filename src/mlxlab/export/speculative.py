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

from pathlib import Path

from mlxlab.errors import ConfigError
from mlxlab.export.llama_server import command_path, llama_server_script, write_script


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
                           quant: str = "f16", overwrite: bool = False, check: bool = True,
                           num_draft_tokens: int = 3) -> dict:
    """The run as `out` (export_gguf: its Modelfile beside it), the draft as
    draft_gguf_path(out) in the same --quant, and the llama-server script that pairs them;
    returns the run's export report with `draft` (the draft's) and `command` (the script)."""
    from mlxlab.export import export_gguf

    out = Path(out).expanduser()
    if num_draft_tokens < 1:
        raise ConfigError(f"--num-draft-tokens must be >= 1, got {num_draft_tokens}")
    draft_file, script = draft_gguf_path(out), command_path(out)
    for existing in (draft_file, script):
        if existing.exists() and not overwrite:
            raise ConfigError(f"{existing} exists: pick a new --out or pass --overwrite")
    check_pair(run, draft)
    report = export_gguf(run, out, quant, overwrite=overwrite, check=check)
    draft_report = export_gguf(draft, draft_file, quant, overwrite=overwrite, check=check)
    # a draft is not a model to talk to: Ollama gets the run's Modelfile only
    Path(draft_report.pop("modelfile")).unlink(missing_ok=True)
    write_script(script, llama_server_command(out, draft_file, num_draft_tokens))
    report.update(draft=draft_report, command=str(script), num_draft_tokens=num_draft_tokens)
    return report
