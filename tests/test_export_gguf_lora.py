"""`mlxlab export RUN --format gguf --adapters`: the base and a GGUF LoRA adapter beside it, so the
fine-tune is not re-quantized. llama.cpp itself (the xllamacpp wheel) loads the base with the
adapter, as the written llama-server script and Modelfile name them, and decodes greedily the
tokens mlxlab's own generation of the run decodes, and other tokens than the base alone; the
adapter file holds the keys and tensor layout llama.cpp's convert_lora_to_gguf.py writes (read
back with the `gguf` package's reader); what has no GGUF adapter form is one line, exit 2, and
no file."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
import pytest

from gguf_files import tiny_llama_gguf
from hf_helpers import save_tiny_model
from mlxlab.cli.main import main
from mlxlab.runs.inference import load_run, sample_ids
from test_mlx_lm_decoders import train_chat

PROMPTS = ["Once upon a time", "The little dog", "She said", "In the park there was",
           "Tom and Lily"]
TOKENS = 16
ALL = "model.lora.targets=[query,key,value,out,gate_proj,up_proj,down_proj]"
TRAIN = ["eval.tasks=[]", "trainer.max_steps=8", "trainer.eval_every_steps=8", ALL]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    """A tiny Llama (transformers' folder) fine-tuned with LoRA on every projection, exported
    with --adapters at f32 (so llama.cpp's base holds the run's weights exactly)."""
    root = tmp_path_factory.mktemp("gguf_lora")
    folder = save_tiny_model("llama", root / "tiny-llama", chat="chatml")
    _, run = train_chat(folder, root / "train", *TRAIN)
    out = root / "out" / "ft.gguf"
    assert main(["export", str(run), "--format", "gguf", "--adapters", "--quant", "f32",
                 "--out", str(out)]) == 0
    return {"root": root, "folder": folder, "run": run, "out": out}


def server_command(folder: Path) -> list[str]:
    """The llama-server command line the written script runs."""
    return shlex.split((folder / "ft.llama-server.sh").read_text().strip().splitlines()[-1])


def llama_cpp_greedy(model: Path, adapter: Path | None, prompts: list[list[int]]) -> list[str]:
    """llama.cpp's greedy text after each prompt (given as mlxlab's ids), the adapter applied
    at --lora's scale 1 as llama-server's command line applies it."""
    import xllamacpp as xl

    params = xl.CommonParams()
    params.model.path = str(model)
    params.n_ctx = 128
    params.cpuparams.n_threads = 1
    if adapter is not None:
        params.lora_adapters = [xl.CommonAdapterLoraInfo(str(adapter), 1.0)]
    server = xl.Server(params)
    out = []
    for ids in prompts:
        answer = server.handle_completions({"prompt": ids, "n_predict": TOKENS, "temperature": 0,
                                            "cache_prompt": False})
        out.append(answer["choices"][0]["text"])
    return out


def mlxlab_greedy(run: Path, prompts: list[str]) -> tuple[list[list[int]], list[str]]:
    """(the prompts' ids as mlxlab lays them out, mlxlab's greedy text after each: `mlxlab
    generate --temperature 0`'s tokens)."""
    from mlxlab.runs.generate import plain_prompt_ids

    loaded = load_run(run)
    folder = loaded.tokenizer_path.parent
    ids = [plain_prompt_ids(loaded.tokenizer, folder, loaded.model.hf_config, p) for p in prompts]
    texts = [loaded.tokenizer.decode(list(sample_ids(loaded, p, TOKENS, 0.0, 0, 1.0)))
             for p in prompts]
    return ids, texts


def test_llama_cpp_decodes_the_fine_tune_from_base_and_adapter(exported):
    pytest.importorskip("xllamacpp", reason="llama.cpp's prebuilt wheel (dev extra)")
    folder = exported["out"].parent
    command = server_command(folder)
    base, adapter = (folder / command[command.index(f) + 1] for f in ("-m", "--lora"))
    assert (base.name, adapter.name) == ("ft.base.gguf", "ft.lora.gguf")
    prompt_ids, ours = mlxlab_greedy(exported["run"], PROMPTS)
    theirs = llama_cpp_greedy(base, adapter, prompt_ids)
    alone = llama_cpp_greedy(base, None, prompt_ids)
    assert theirs == ours
    assert alone != theirs  # the adapter is applied, and changes what the base decodes
