"""`mlxlab export --format gguf --draft`: a model and its draft for llama.cpp and LM Studio.
Both GGUF files are written with the llama-server command that pairs them; llama.cpp itself
(the xllamacpp wheel) loads the pair from what that command names, decodes speculatively (the
draft proposes tokens) and answers greedily as the model alone does. A pair speculative decoding
cannot use is one line, exit 2, before a file is written."""

from __future__ import annotations

import re
import shlex

import pytest

from hf_helpers import save_tiny_model
from mlxlab.cli.main import main

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("export_draft")
    target = save_tiny_model("llama", root / "target", seed=0, chat="chatml", num_hidden_layers=4)
    draft = save_tiny_model("llama", root / "draft", seed=1, chat="chatml", num_hidden_layers=1)
    out = root / "out" / "ft.gguf"
    assert main(["export", str(target), "--format", "gguf", "--quant", "f32", "--draft",
                 str(draft), "--num-draft-tokens", "4", "--out", str(out)]) == 0
    return {"root": root, "target": target, "draft": draft, "out": out}


def test_both_files_and_the_command_that_pairs_them(exported, capsys):
    folder = exported["out"].parent
    assert sorted(p.name for p in folder.iterdir()) == [
        "ft.Modelfile", "ft.draft.gguf", "ft.gguf", "ft.llama-server.sh"]
    script = (folder / "ft.llama-server.sh").read_text()
    command = shlex.split(script.strip().splitlines()[-1])
    assert command[:1] == ["exec"] and command[1] == "llama-server"
    assert command[command.index("-m") + 1] == "ft.gguf"
    assert command[command.index("-md") + 1] == "ft.draft.gguf"
    assert command[command.index("--draft-max") + 1] == "4"
    assert "Ollama has no draft models" in script and "lms import ft.draft.gguf" in script
    assert (folder / "ft.llama-server.sh").stat().st_mode & 0o111
    # Ollama serves the model alone: its Modelfile, none for the draft
    assert (folder / "ft.Modelfile").read_text().startswith("FROM ./ft.gguf\n")


def test_llama_cpp_decodes_with_the_draft_as_the_model_alone(exported):
    xl = pytest.importorskip("xllamacpp", reason="llama.cpp's prebuilt wheel (dev extra)")
    folder = exported["out"].parent
    line = (folder / "ft.llama-server.sh").read_text().strip().splitlines()[-1]
    command = shlex.split(line)
    model, draft = (folder / command[command.index(f) + 1] for f in ("-m", "-md"))
    k = int(command[command.index("--draft-max") + 1])

    def complete(with_draft: bool) -> dict:
        params = xl.CommonParams()
        params.model.path = str(model)
        params.n_ctx = 128
        params.cpuparams.n_threads = 1
        if with_draft:  # what -md and --draft-max set on llama-server's command line
            params.speculative.draft.mparams.path = str(draft)
            params.speculative.draft.n_max = k
            params.speculative.types = [
                xl.common_speculative_type.COMMON_SPECULATIVE_TYPE_DRAFT_SIMPLE]
        server = xl.Server(params)
        return server.handle_completions({"prompt": PROMPT, "n_predict": 24, "temperature": 0,
                                          "cache_prompt": False})

    alone, drafted = complete(False), complete(True)
    assert drafted["choices"][0]["text"] == alone["choices"][0]["text"]
    assert drafted["usage"]["completion_tokens"] == 24
    assert drafted["timings"]["draft_n"] > 0  # the draft proposed tokens llama.cpp checked
    assert "draft_n" not in alone["timings"]


def test_pairs_it_cannot_use_are_refused_before_a_file_is_written(exported, capsys):
    root, target, draft = exported["root"], exported["target"], exported["draft"]
    other = save_tiny_model("qwen2", root / "other", seed=0, num_hidden_layers=1)
    cases = {
        "tokenizer is not the model's": ["--format", "gguf", "--draft", other],
        "is not smaller than the model": ["--format", "gguf", "--draft", target],
        "add --format gguf": ["--format", "hf", "--draft", draft],
        "--num-draft-tokens must be >= 1": ["--format", "gguf", "--draft", draft,
                                            "--num-draft-tokens", "0"],
    }
    for expected, args in cases.items():
        out = root / re.sub(r"\W+", "_", expected) / "x.gguf"
        assert main(["export", str(target), *map(str, args), "--out", str(out)]) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("mlxlab export: error: ") and expected in last, last
        assert not out.parent.exists() or not any(out.parent.iterdir())


def test_a_draft_refused_after_the_models_file_is_written_leaves_nothing(exported, capsys):
    """GLM-4 (no GGUF writer) shares the model's tokenizer and is smaller, so the pair checks;
    its GGUF is refused after the model's own file is written: nothing is moved into place."""
    root, target = exported["root"], exported["target"]
    draft = save_tiny_model("glm4", root / "glm4-draft", seed=1, chat="chatml",
                            num_hidden_layers=1)
    out = root / "refused" / "ft.gguf"
    capsys.readouterr()
    assert main(["export", str(target), "--format", "gguf", "--quant", "f32", "--draft",
                 str(draft), "--out", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "model_type='glm4' has no GGUF export here" in lines[0], lines
    assert not out.parent.exists() or not any(out.parent.iterdir())
