"""`mlxlab export RUN --format gguf --adapters`: the base and a GGUF LoRA adapter beside it, so the
fine-tune is not re-quantized. llama.cpp itself (the xllamacpp wheel) loads the base with the
adapter, as the written llama-server script and Modelfile name them, and decodes greedily the
tokens mlxlab's own generation of the run decodes, and other tokens than the base alone; the
adapter file holds the keys and tensor layout llama.cpp's convert_lora_to_gguf.py writes (read
back with the `gguf` package's reader); what has no GGUF adapter form is one line, exit 2, and
no file."""

from __future__ import annotations

import shlex
from pathlib import Path

import numpy as np
import pytest

from gguf_files import rewrite_gguf
from hf_helpers import save_tiny_model
from mlxlab.cli.main import main
from mlxlab.export.gguf_adapters import export_gguf_adapters
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


def test_the_adapter_is_what_llama_cpps_converter_writes(exported, tmp_path):
    """Keys and tensors as convert_lora_to_gguf.py writes them, and as llama-adapter.cpp checks
    them against the base (lora_a ne [in, rank], lora_b ne [rank, out]); base + (alpha / rank) *
    B @ A is, tensor by tensor, the fused export's weight (--format gguf without --adapters:
    transformers' layout through the base export's own row fixes)."""
    import gguf

    folder = exported["out"].parent
    adapter = gguf.GGUFReader(folder / "ft.lora.gguf")
    fields = {name: field.contents() for name, field in adapter.fields.items()
              if not name.startswith("GGUF.")}
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama"
    rank, alpha = 8, fields["adapter.lora.alpha"]
    assert alpha == 16.0  # model.lora.alpha 16 at rank 8: mlxlab's scale 2 = alpha / rank
    assert adapter.fields["adapter.lora.alpha"].types == [gguf.GGUFValueType.FLOAT32]
    pairs = {t.name: t for t in adapter.tensors}
    kinds = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
    assert sorted(pairs) == sorted(f"blk.{i}.{k}.weight.lora_{ab}" for i in range(2)
                                   for k in kinds for ab in "ab")
    base = {t.name: t for t in gguf.GGUFReader(folder / "ft.base.gguf").tensors}
    fused_file = tmp_path / "fused.gguf"
    assert main(["export", str(exported["run"]), "--format", "gguf", "--quant", "f32",
                 "--out", str(fused_file)]) == 0
    fused = {t.name: t for t in gguf.GGUFReader(fused_file).tensors}
    for name in {n.rsplit(".", 1)[0] for n in pairs}:
        a, b, w = pairs[f"{name}.lora_a"], pairs[f"{name}.lora_b"], base[name]
        assert a.tensor_type == b.tensor_type == gguf.GGMLQuantizationType.F32
        # GGUF's ne order: what llama-adapter.cpp compares with the base tensor's
        assert int(a.shape[0]) == int(w.shape[0]) and int(b.shape[1]) == int(w.shape[1])
        assert int(a.shape[1]) == int(b.shape[0]) == rank
        merged = w.data + alpha / rank * (b.data @ a.data)
        assert np.abs(merged - fused[name].data).max() <= 1e-5, name
    assert any(np.abs(pairs[f"{n}.lora_b"].data).max() > 1e-3 for n in base if n + ".lora_b"
               in pairs)  # trained: B moved off its zero init


def test_a_gguf_base_is_named_by_its_path_not_copied(tmp_path, capsys):
    """A run whose model.pretrained is a GGUF file ships that file untouched: no base is
    written, the Modelfile and the script name it by its absolute path, and llama.cpp on that
    file with the adapter decodes the run's greedy text. (An F32 file: llama.cpp's Q8_0
    product also rounds the activations to 8 bits, which MLX's does not, so on a Q8_0 base a
    near tie in this random model can go the other way.)"""
    pytest.importorskip("xllamacpp", reason="llama.cpp's prebuilt wheel (dev extra)")
    from mlxlab.export.gguf import write_gguf

    base = tmp_path / "models" / "tiny.gguf"
    write_gguf(save_tiny_model("qwen2", tmp_path / "tiny-qwen2", chat="chatml"), base, "f32")
    before = base.read_bytes()
    _, run = train_chat(base, tmp_path / "train", *TRAIN)
    out = tmp_path / "out" / "ft.gguf"
    assert main(["export", str(run), "--format", "gguf", "--adapters", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "ft.Modelfile", "ft.llama-server.sh", "ft.lora.gguf"]
    assert base.read_bytes() == before
    modelfile = (out.parent / "ft.Modelfile").read_text()
    assert modelfile.startswith(f"FROM {base.resolve()}\nADAPTER ./ft.lora.gguf\n")
    command = server_command(out.parent)
    assert command[command.index("-m") + 1] == str(base.resolve())
    assert command[command.index("--lora") + 1] == "ft.lora.gguf"
    prompt_ids, ours = mlxlab_greedy(run, PROMPTS[:3])
    assert llama_cpp_greedy(base, out.parent / "ft.lora.gguf", prompt_ids) == ours
    # nothing is quantized: --quant is refused, and the export stays as it was
    written = {p.name: p.read_bytes() for p in out.parent.iterdir()}
    assert main(["export", str(run), "--format", "gguf", "--adapters", "--quant", "q4_0",
                 "--overwrite", "--out", str(out)]) == 2
    assert "--quant q4_0: the base is the run's own GGUF file" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.parent.iterdir()} == written
    # a file that changed since the run trained on it is not the adapters' base
    rewrite_gguf(base, tmp_path / "other.gguf", {"general.name": "changed"}).replace(base)
    assert main(["export", str(run), "--format", "gguf", "--adapters", "--overwrite",
                 "--out", str(out)]) == 2
    assert f"{base.resolve()} changed since the run trained on it" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.parent.iterdir()} == written


REFUSALS = {  # case -> (save_tiny_model kind, training overrides, what the one line says)
    "dora": ("llama", ["model.lora.kind=dora"],
             "a DORA run has no GGUF adapter form (llama.cpp applies plain LoRA only): export "
             "it fused instead (--format gguf without --adapters)"),
    "no_lora": ("llama", ["model.lora.rank=0"], "--adapters needs a LoRA run"),
    "no_gguf_arch": ("glm4", [], "model_type='glm4' has no GGUF export here"),
    "regrouped_arch": ("qwen3_moe", ["model.lora.targets=[query,experts]"],
                       "the adapters on model.layers.0.mlp reach the routed experts, which "
                       "llama.cpp stacks into one 3-D tensor a projection"),
}


@pytest.mark.parametrize("case", [*REFUSALS, "exists", "draft"])
def test_what_has_no_gguf_adapter_form_is_one_line_exit_2_and_no_file(case, exported, tmp_path,
                                                                       capsys):
    out = tmp_path / "out" / "ft.gguf"
    extra: list[str] = []
    if case in REFUSALS:
        kind, overrides, expect = REFUSALS[case]
        folder = save_tiny_model(kind, tmp_path / f"tiny-{kind}", chat="chatml")
        _, run = train_chat(folder, tmp_path / "train", "eval.tasks=[]", "trainer.max_steps=1",
                            "trainer.eval_every_steps=1", *overrides)
    elif case == "exists":  # one of the four outputs is there: nothing is replaced or added
        run, expect = exported["run"], "ft.lora.gguf exists: pick a new --out or pass --overwrite"
        out.parent.mkdir()
        (out.parent / "ft.lora.gguf").write_text("mine")
    else:
        run, expect = exported["run"], "--draft does not apply to --format gguf --adapters"
        extra = ["--draft", str(exported["folder"])]
    capsys.readouterr()
    assert main(["export", str(run), "--format", "gguf", "--adapters", *extra,
                 "--out", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mlxlab export: error: "), lines
    assert expect in lines[0], lines
    left = sorted(p.name for p in out.parent.iterdir()) if out.parent.exists() else []
    assert left == (["ft.lora.gguf"] if case == "exists" else [])
    if case == "exists":
        assert (out.parent / "ft.lora.gguf").read_text() == "mine"


@pytest.mark.slow  # ~17 s on 2 cores: mlx-lm's convert and a 4-bit training run
def test_a_qlora_base_goes_out_packed_as_it_trained(tmp_path):
    """A QLoRA run on mlx-lm's 4-bit folder (group size 32): --quant q4_1 writes its packed base
    block for block (the nibbles, scales and minimums it trained on; no float round trip, no
    fused update), and llama.cpp runs that base with the adapter."""
    pytest.importorskip("xllamacpp", reason="llama.cpp's prebuilt wheel (dev extra)")
    import gguf
    from mlx_lm.convert import convert

    folder = save_tiny_model("llama", tmp_path / "tiny-llama", chat="chatml")
    packed = tmp_path / "llama-4bit"
    convert(str(folder), str(packed), quantize=True, q_bits=4, q_group_size=32, dtype="float32")
    _, run = train_chat(packed, tmp_path / "train", *TRAIN)
    out = tmp_path / "out" / "ft.gguf"
    report = export_gguf_adapters(run, out, "q4_1")
    # every matrix repacked from the folder's own blocks (gguf.py _as_q4_1), none through float
    assert report["base"]["tensor_types"]["Q4_1 (direct)"] == 16
    assert "Q4_1" not in report["base"]["tensor_types"]
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out.parent / "ft.base.gguf")
             .tensors if len(t.shape) == 2}
    assert set(types.values()) == {"Q4_1"} and len(types) == 16  # 7 a block, embedding, output
    prompt_ids, _ = mlxlab_greedy(run, PROMPTS[:3])
    tuned = llama_cpp_greedy(out.parent / "ft.base.gguf", out.parent / "ft.lora.gguf", prompt_ids)
    assert tuned != llama_cpp_greedy(out.parent / "ft.base.gguf", None, prompt_ids)


def test_overwrite_replaces_the_four_files_and_says_what_each_is(exported, tmp_path, capsys):
    from mlxlab.export.gguf_adapters import export_gguf_adapters as export

    out = tmp_path / "ft.gguf"
    report = export(exported["run"], out, "q8_0")
    assert (report["format"], report["quant"], report["lora"]) == ("gguf", "q8_0", "adapters")
    assert report["base"]["written"] and report["base"]["tensor_types"]["Q8_0"] == 16
    assert (report["adapter"]["rank"], report["adapter"]["alpha"]) == (8, 16.0)
    assert report["chat_style"] == "chatml" and report["stop"] == ["<|im_end|>"]
    assert (tmp_path / "ft.Modelfile").read_text().startswith(
        "FROM ./ft.base.gguf\nADAPTER ./ft.lora.gguf\n\nTEMPLATE")
    capsys.readouterr()
    assert main(["export", str(exported["run"]), "--format", "gguf", "--adapters", "--overwrite",
                 "--out", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()[-4:]
    assert f"base -> {tmp_path / 'ft.base.gguf'} (llama, f16," in lines[0]
    assert "pretrained weights, not fused" in lines[0]
    assert lines[1].startswith(f"LoRA adapter -> {tmp_path / 'ft.lora.gguf'} (rank 8, alpha 16, "
                               "14 weights, F32")
    assert lines[2].startswith(f"Ollama: {tmp_path / 'ft.Modelfile'} (FROM the base, ADAPTER")
    assert lines[3] == (f"llama.cpp: {tmp_path / 'ft.llama-server.sh'} (llama-server -m BASE "
                        "--lora ADAPTER)")
    import gguf

    types = {t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "ft.base.gguf").tensors}
    assert "F16" in types and "Q8_0" not in types  # the q8_0 base replaced by the f16 one
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ft.Modelfile", "ft.base.gguf", "ft.llama-server.sh", "ft.lora.gguf"]


def test_the_pair_read_back_from_its_files_is_the_fine_tune(exported, tmp_path):
    """The f32 base with the adapter's update added where llama.cpp adds it (gguf_readback.py,
    as the judgement of a quantized pair reads it) gives the run's own logits."""
    import mlx.core as mx

    from mlxlab.export.gguf_readback import read_written_gguf
    from mlxlab.runs import load_run_model

    folder = exported["out"].parent
    pair = read_written_gguf(folder / "ft.base.gguf", exported["folder"], tmp_path / "pair",
                             lora=folder / "ft.lora.gguf")
    alone = read_written_gguf(folder / "ft.base.gguf", exported["folder"], tmp_path / "alone")
    model, _ = load_run_model(exported["run"])
    model.eval()
    ids = mx.array([[5, 17, 99, 3, 250, 31, 7, 8]])
    ours, theirs = np.array(model(ids)), np.array(pair(ids))
    assert np.abs(theirs - ours).max() <= 1e-4 * np.abs(ours).max()
    assert np.abs(np.array(alone(ids)) - ours).max() > 1e-2  # the adapter is what differs


def test_a_quantized_pair_is_judged_and_takes_tasks(exported, tmp_path, capsys):
    """--quant q4_0 --adapters: the quantized base and the adapter are read back and judged
    (retention on the report and printed), and --tasks / --accept-loss are honoured; at f32
    (nothing changes) --tasks is one line."""
    import json

    task = tmp_path / "t.jsonl"
    task.write_text(json.dumps({"prompt": "Once upon a", "answer": " time"}) + "\n")
    out = tmp_path / "q4" / "ft.gguf"
    capsys.readouterr()
    assert main(["export", str(exported["run"]), "--format", "gguf", "--adapters", "--quant",
                 "q4_0", "--tasks", str(task), "--accept-loss", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "retention, read back from what was written" in printed and "t/exact_match" in printed
    assert main(["export", str(exported["run"]), "--format", "gguf", "--adapters", "--quant",
                 "f32", "--tasks", str(task), "--out", str(tmp_path / "f32" / "ft.gguf")]) == 2
    assert "--quant f32 writes the base as it trained: drop them" in capsys.readouterr().err
    assert not (tmp_path / "f32").exists()


@pytest.mark.slow  # a GGUF through transformers and a training run (~15 s)
def test_a_float_folder_transformers_made_from_a_gguf_exports_with_adapters(tmp_path, capsys):
    """transformers keeps quantization_config {quant_method: gguf} in the config.json of a
    model it loaded from a GGUF file, over the float weights it dequantized to: such a folder is
    float, and its LoRA run exports as a base and an adapter, judged."""
    import json
    import shutil

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from mlxlab.export.gguf import write_gguf

    tiny = save_tiny_model("llama", tmp_path / "tiny", chat="chatml")
    write_gguf(tiny, tmp_path / "t.gguf", "f32")
    folder = tmp_path / "from-gguf"
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="t.gguf")
    model.config.save_pretrained(folder)  # save_pretrained refuses a GGUF-loaded model
    save_file({k: v.contiguous() for k, v in model.state_dict().items()
               if k != "lm_head.weight" or not model.config.tie_word_embeddings},
              str(folder / "model.safetensors"), metadata={"format": "pt"})
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tiny / name).is_file():  # the model's own (transformers' GGUF one adds a token)
            shutil.copy(tiny / name, folder / name)
    assert json.loads((folder / "config.json").read_text())["quantization_config"][
        "quant_method"] == "gguf"
    _, run = train_chat(folder, tmp_path / "train", *TRAIN)
    out = tmp_path / "out" / "ft.gguf"
    capsys.readouterr()
    assert main(["export", str(run), "--format", "gguf", "--adapters", "--quant", "q8_0",
                 "--accept-loss", "--out", str(out)]) == 0, capsys.readouterr().err
    assert "retention, read back from what was written" in capsys.readouterr().out
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "ft.Modelfile", "ft.base.gguf", "ft.llama-server.sh", "ft.lora.gguf"]
