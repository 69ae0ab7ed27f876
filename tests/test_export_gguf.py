"""`mlxlab export --format gguf`: one file that llama.cpp, Ollama and LM Studio read.

Checked against independent readers, never against our own writer: transformers' GGUF loader
(`from_pretrained(..., gguf_file=)`, which undoes llama.cpp's layout) gives the logits of the
model the file came from; MLX's own GGUF reader (`mx.load`) gives each quantized tensor as the
`gguf` package dequantizes it; transformers' GGUF tokenizer encodes text to the ids of the
model's own tokenizer; llama.cpp itself (the xllamacpp wheel) picks the transformers model's
next tokens at its probabilities.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from hydra.core.global_hydra import GlobalHydra

from conftest import PYTHON, compose_cfg
from hf_helpers import mlx_logits, tiny
from mlxlab.config import asset_path
from mlxlab.export.gguf import write_gguf
from mlxlab.runs import load_run_model
from mlxlab.train import train

KINDS = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3", "gemma2", "starcoder2")
# Sizes transformers' GGUF loader can read back: it takes head_dim from hidden/heads for Qwen3
# (real Qwen3 checkpoints have head_dim 128) and Gemma 3's query scale from its default 256.
EXTRA = {
    "llama": {},
    "mistral": {"sliding_window": None},
    "qwen2": {"tie_word_embeddings": True},
    "qwen3": {"head_dim": 128},
    "gemma3_text": {"head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 128,
                    "tie_word_embeddings": True},
    "phi3": {"pad_token_id": 0},
    # its soft-capping at transformers' defaults (the GGUF loader reads neither back)
    "gemma2": {"head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 128,
               "tie_word_embeddings": True},
    "starcoder2": {"tie_word_embeddings": True},  # LayerNorm with biases, a plain GELU MLP
}
IDS = np.array([[5, 17, 99, 3, 250, 31, 7, 8, 64, 120, 11, 2]])


def save_tiny(kind: str, path: Path):
    """A tiny random decoder of `kind` saved by transformers, with a ChatML byte-level BPE."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    tok = tiny.tiny_tokenizer("qwen2" if kind.startswith("qwen") else "llama", chat="chatml")
    config = AutoConfig.for_model(kind, **{
        "vocab_size": tok.get_vocab_size(), "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "tie_word_embeddings": False, **EXTRA[kind]})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():  # norms away from their init, so a norm stored wrongly shows
        for p in model.parameters():
            p.normal_(0.0, 0.2) if p.dim() > 1 else p.normal_(
                0.0 if kind.startswith("gemma") else 1.0, 0.1)
    model.save_pretrained(path)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|im_end|>",
                            chat_template=tiny.CHATML).save_pretrained(path)
    return model


def logits(model, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


def from_gguf(file: Path):
    """transformers' model from the GGUF alone (a folder holding nothing else, so neither the
    config nor the tokenizer comes from the source folder's files)."""
    import torch
    from transformers import AutoModelForCausalLM

    alone = Path(tempfile.mkdtemp(prefix="gguf-alone-"))
    (alone / file.name).write_bytes(file.read_bytes())
    return AutoModelForCausalLM.from_pretrained(alone, gguf_file=file.name,
                                                dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("gguf")
    return {kind: (root / kind, save_tiny(kind, root / kind)) for kind in KINDS}


@pytest.mark.parametrize("kind", KINDS)
def test_f32_and_f16_load_in_transformers_with_the_same_logits(models, kind):
    import torch

    folder, model = models[kind]
    # transformers reads a "llama" file whose general.name says Mistral as model_type mistral,
    # which its GGUF loader then does not know: a neutral name
    write_gguf(folder, folder / "f32.gguf", "f32", name="tiny")
    assert np.abs(logits(from_gguf(folder / "f32.gguf"), IDS) - logits(model, IDS)).max() <= 1e-4
    write_gguf(folder, folder / "f16.gguf", "f16", name="tiny")
    # the same model with its matrices rounded to f16, as the file stores them
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(p.half().float())
    assert np.abs(logits(from_gguf(folder / "f16.gguf"), IDS) - logits(model, IDS)).max() <= 1e-3


@pytest.mark.parametrize("quant", ["q8_0", "q4_0", "q4_1"])
def test_quantized_tensors_load_in_mlx_as_the_package_dequantizes_them(models, quant):
    import gguf

    folder, _ = models["qwen3"]
    file = folder / f"{quant}.gguf"
    report = write_gguf(folder, file, quant)
    assert report["tensor_types"][quant.upper()] == 16  # 7 a layer, the embedding, the output
    loaded = mx.load(str(file))
    reader = gguf.GGUFReader(file)
    checked = 0
    for t in reader.tensors:
        if t.tensor_type.name != quant.upper():
            continue
        reference = gguf.quants.dequantize(t.data, t.tensor_type)
        base = t.name.removesuffix(".weight")
        ours = mx.dequantize(loaded[t.name], loaded[base + ".scales"], loaded[base + ".biases"],
                             group_size=32, bits=8 if quant == "q8_0" else 4)
        # MLX keeps the file's f16 block scales and rebuilds w = scale * q + bias in f16: the
        # product (up to the block's range, <= 2B for B its largest |w|) and the sum (<= B) each
        # round by half an f16 ulp: at most 3 * 2**-11 * B
        blocks = np.abs(reference).reshape(-1, 32).max(axis=1, keepdims=True)
        error = np.abs(np.array(ours.astype(mx.float32)) - reference).reshape(-1, 32)
        assert (error <= 3 * 2**-11 * blocks + 1e-7).all()
        checked += 1
    assert checked == 16


LLAMA_CPP_EXTRA = {  # what each has that a Llama has not, switched on
    "gemma2": EXTRA["gemma2"],  # soft-capping, four norms a layer stored as 1 + w
    "granite": {"embedding_multiplier": 12.0, "logits_scaling": 8.0,
                "residual_multiplier": 0.22, "attention_multiplier": 0.0625},
    "olmo2": {},  # norms after attention and MLP, q/k norms over all heads
    "starcoder2": EXTRA["starcoder2"],
}


@pytest.mark.parametrize("kind", sorted(LLAMA_CPP_EXTRA))
def test_llama_cpp_runs_the_export_with_transformers_probabilities(kind, tmp_path):
    """llama.cpp itself (the xllamacpp wheel) loads the f32 file and picks the next token after
    each prefix of a prompt: the transformers model's greedy pick, with its top-3
    log-probabilities within 5e-3 (measured: 2.7e-3 at most, the GELU models;
    ggml's GELU reads an f16 table)."""
    xl = pytest.importorskip("xllamacpp", reason="llama.cpp's prebuilt wheel (dev extra)")
    EXTRA.setdefault(kind, LLAMA_CPP_EXTRA[kind])
    model = save_tiny(kind, tmp_path / kind)
    write_gguf(tmp_path / kind, tmp_path / "f32.gguf", "f32", name="tiny")
    params = xl.CommonParams()
    params.model.path = str(tmp_path / "f32.gguf")
    params.n_ctx = 64
    params.cpuparams.n_threads = 1  # a tiny model; more threads only wait on each other
    server, ids = xl.Server(params), IDS[0].tolist()
    theirs = torch_log_softmax(logits(model, IDS)[0])
    compared = 0
    for end in range(1, len(ids) + 1):  # the next token after each prefix of the prompt
        answer = server.handle_completions({
            "prompt": ids[:end], "n_predict": 1, "temperature": 0, "n_probs": 3,
            "cache_prompt": False})
        logprobs = answer["choices"][0]["logprobs"]
        if not logprobs:  # its pick ends mid-character (one byte of one): nothing to read
            continue
        step = logprobs["content"][0]
        assert step["id"] == int(theirs[end - 1].argmax())  # the same greedy pick
        for t in step["top_logprobs"]:
            assert abs(t["logprob"] - theirs[end - 1, t["id"]]) <= 5e-3, (end, t)
        compared += 1
    assert compared >= len(ids) // 2


def torch_log_softmax(x: np.ndarray) -> np.ndarray:
    import torch

    return torch.log_softmax(torch.tensor(x), dim=-1).numpy()


def test_the_vocabulary_encodes_as_the_models_tokenizer(models):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    folder, _ = models["qwen2"]
    alone = Path(tempfile.mkdtemp(prefix="gguf-tok-"))
    write_gguf(folder, alone / "tok.gguf", "q8_0")
    theirs = AutoTokenizer.from_pretrained(alone, gguf_file="tok.gguf")
    ours = Tokenizer.from_file(str(folder / "tokenizer.json"))
    stories = Path(asset_path("tinystories/sample.txt")).read_text().split("\n\n")[400:650]
    texts = stories + ["<|im_start|>user\nHi there!<|im_end|>\n<|im_start|>assistant\n",
                       "naïve café — 42 + 7 = 49\t\n  spaces", "<|im_end|><|im_start|>"]
    assert len(texts) > 250
    for text in texts:
        assert theirs.encode(text, add_special_tokens=False) == \
            ours.encode(text, add_special_tokens=False).ids, text


def spm_style_tokenizer():
    """A sentencepiece-style BPE as Llama 2's, Mistral's and Gemma's tokenizer.json are: "▁" for
    the space (Metaspace), byte fallback to <0xNN> tokens, <unk> <s> </s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first",
                                                 split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    stories = Path(asset_path("tinystories/sample.txt")).read_text().split("\n\n")[:400]
    tok.train_from_iterator(stories, trainers.BpeTrainer(vocab_size=600, special_tokens=specials))
    return tok


def test_a_sentencepiece_style_vocabulary_encodes_as_the_models_tokenizer(tmp_path):
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        LlamaConfig,
        PreTrainedTokenizerFast,
    )

    tok = spm_style_tokenizer()
    folder = tmp_path / "spm"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=600, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, bos_token_id=1, eos_token_id=2)).save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(folder)
    alone = Path(tempfile.mkdtemp(prefix="gguf-spm-"))
    report = write_gguf(folder, alone / "spm.gguf", "f16")
    assert report["vocab"]["model"] == "llama"
    theirs = AutoTokenizer.from_pretrained(alone, gguf_file="spm.gguf")
    stories = Path(asset_path("tinystories/sample.txt")).read_text().split("\n\n")[400:600]
    for text in stories + ["naïve café 😀", "two  spaces\n\nnewlines"]:
        assert theirs.encode(text, add_special_tokens=False) == \
            tok.encode(text, add_special_tokens=False).ids, text


def test_the_file_carries_the_chat_template_and_special_tokens(models):
    import gguf

    folder, _ = models["llama"]
    write_gguf(folder, folder / "meta.gguf", "f16", description="scores")
    fields = gguf.GGUFReader(folder / "meta.gguf").fields

    def value(key):
        field = fields[key]
        return field.contents()

    tok = json.loads((folder / "tokenizer.json").read_text())
    im_end = next(t["id"] for t in tok["added_tokens"] if t["content"] == "<|im_end|>")
    assert value("tokenizer.chat_template") == tiny.CHATML
    assert value("tokenizer.ggml.eos_token_id") == im_end
    assert value("general.description") == "scores"
    assert value("llama.rope.dimension_count") == 16 and value("general.architecture") == "llama"


# --- a run trained here, through the command line ---------------------------------------------

LM = [
    "experiment=tinystories_nano", "tracking=none", "callbacks.progress.enabled=false",
    "model.dim=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
    "model.max_seq_len=64", "data.packing.seq_len=64", "data.tokenizer.max_vocab=512",
    "data.tokenizer_sample=300", "data.splits.val_examples=20", "trainer.batch_size=8",
    "trainer.max_steps=10", "trainer.eval_every_steps=10", "trainer.schedule.warmup_steps=2",
]


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory) -> Path:
    cfg = compose_cfg(tmp_path_factory.mktemp("lm"), LM)
    train(cfg)
    GlobalHydra.instance().clear()
    return Path(cfg.paths.output_dir)


def export(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "mlxlab.cli.main", "export", *args],
                          capture_output=True, text=True)


def test_a_run_exports_to_gguf_with_mlxlabs_logits_and_a_modelfile(lm_run, tmp_path):
    out = tmp_path / "run.gguf"
    done = export(str(lm_run), "--format", "gguf", "--quant", "f32", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert f"-> {out} (llama, f32" in done.stdout
    model, _ = load_run_model(lm_run)
    ids = np.random.default_rng(1).integers(0, model.vocab_size, size=(2, 40))
    theirs = logits(from_gguf(out), ids)
    assert np.abs(theirs - mlx_logits(model, ids)).max() <= 1e-3
    modelfile = (tmp_path / "run.Modelfile").read_text()
    assert modelfile.startswith("FROM ./run.gguf\n")


def test_a_chatml_model_gets_ollamas_chatml_template_and_stop(models, tmp_path, capsys):
    """The verb's main in this process (the test above runs `mlxlab export` as a process)."""
    from mlxlab.cli.main import main

    folder, _ = models["qwen3"]
    out = tmp_path / "chat.gguf"
    capsys.readouterr()
    assert main(["export", str(folder), "--format", "gguf", "--quant", "q4_0", "--out",
                 str(out)]) == 0
    modelfile = (tmp_path / "chat.Modelfile").read_text()
    assert "TEMPLATE \"\"\"{{- range .Messages }}<|im_start|>{{ .Role }}" in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile
    assert "(chat template: chatml)" in capsys.readouterr().out


def test_exports_into_one_folder_each_keep_their_own_modelfile(models, tmp_path):
    """Each GGUF export's Modelfile is named after it (FROM it), so a second export into the
    folder leaves the first one's; a Modelfile that is there already is not overwritten."""
    from mlxlab.export import export_gguf
    from mlxlab.export.gguf import GGUFExportError

    llama, qwen = models["llama"][0], models["qwen3"][0]
    export_gguf(llama, tmp_path / "a.gguf", "q8_0")
    export_gguf(qwen, tmp_path / "b.gguf", "q8_0")
    assert (tmp_path / "a.Modelfile").read_text().startswith("FROM ./a.gguf\n")
    assert (tmp_path / "b.Modelfile").read_text().startswith("FROM ./b.gguf\n")
    assert not (tmp_path / "Modelfile").exists()
    (tmp_path / "a.gguf").unlink()
    with pytest.raises(GGUFExportError, match="a.Modelfile exists"):
        export_gguf(qwen, tmp_path / "a.gguf", "q8_0")
    assert (tmp_path / "a.Modelfile").read_text().startswith("FROM ./a.gguf\n")
    assert not (tmp_path / "a.gguf").exists()


# SmolLM2-Instruct's chat template, verbatim: a default system turn in every chat without one
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.mark.parametrize("template, system", [
    (SMOLLM2, "You are a helpful AI assistant named SmolLM, trained by Hugging Face"),
    (tiny.QWEN25, "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."),
    (tiny.CHATML, None),  # no default system turn: no SYSTEM line
])
def test_the_modelfile_carries_the_templates_default_system_turn(template, system, tmp_path):
    """A template that writes a system turn into every chat without one trained the model on
    it: the Modelfile's SYSTEM carries that text (Ollama's Go template writes only the system
    turn it is given)."""
    from mlxlab.export.ollama import write_modelfile

    tok = tiny.tiny_tokenizer("qwen2", chat="chatml")
    folder = tmp_path / "chat"
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                            chat_template=template).save_pretrained(folder)
    report = write_modelfile(folder, tmp_path / "m.gguf")
    text = (tmp_path / "m.Modelfile").read_text()
    assert report["chat_style"] == "chatml" and report["system"] == system
    assert text.startswith('FROM ./m.gguf\n\nTEMPLATE """') and "No TEMPLATE" not in text
    if system is None:
        assert "SYSTEM" not in text
    else:
        assert f'SYSTEM """{system}"""\n' in text


@pytest.mark.parametrize("case", ["classifier", "unknown_arch", "k_quant", "dtype"])
def test_bad_requests_are_one_line_exit_2_and_leave_no_file(case, models, tmp_path, capsys):
    from mlxlab.cli.export import main

    folder, _ = models["llama"]
    out = tmp_path / "x.gguf"
    if case == "classifier":  # a BERT folder: no decoder
        bert = tmp_path / "bert"
        bert.mkdir()
        (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
        mx.save_safetensors(str(bert / "model.safetensors"), {"w": mx.zeros((2, 2))})
        args, expect = [str(bert)], "model_type='bert' has no GGUF export here"
    elif case == "unknown_arch":
        other = tmp_path / "other"
        other.mkdir()
        for f in folder.iterdir():
            (other / f.name).write_bytes(f.read_bytes())
        config = json.loads((other / "config.json").read_text())
        (other / "config.json").write_text(json.dumps({**config, "model_type": "qwen2_moe"}))
        args, expect = [str(other)], "model_type='qwen2_moe' has no GGUF export here"
    elif case == "k_quant":
        args, expect = [str(folder), "--quant", "q4_k"], "--quant 'q4_k'"
    else:
        args, expect = [str(folder), "--dtype", "float16"], "--dtype do not apply to --format gguf"
    if case == "dtype":  # the real command line once
        done = export(*args, "--format", "gguf", "--out", str(out))
        code, err = done.returncode, done.stderr
    else:
        code, err = main([*args, "--format", "gguf", "--out", str(out)]), capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0], err
    assert not out.exists() and not list(tmp_path.glob("*.partial"))


@pytest.fixture(scope="module")
def q4_folder(models, tmp_path_factory) -> Path:
    """mlx_lm.convert's 4-bit folder (group size 32, f16 scales) of the tiny llama."""
    from mlx_lm.convert import convert

    out = tmp_path_factory.mktemp("q4") / "llama-q4"
    convert(str(models["llama"][0]), str(out), quantize=True, q_group_size=32, q_bits=4,
            dtype="float16")
    return out


def test_an_mlx_lm_4bit_folder_goes_to_q4_1_without_a_float_round_trip(q4_folder, tmp_path):
    import gguf

    report = write_gguf(q4_folder, tmp_path / "q.gguf", "q4_1")
    assert report["tensor_types"]["Q4_1 (direct)"] == 16  # every matrix, embedding included
    source = mx.load(str(q4_folder / "model.safetensors"))
    config = json.loads((q4_folder / "config.json").read_text())
    from mlxlab.export.gguf import _permute_rotary

    for t in gguf.GGUFReader(tmp_path / "q.gguf").tensors:
        if t.name != "blk.1.attn_q.weight" and t.name != "blk.0.ffn_down.weight":
            continue
        hf = {"blk.1.attn_q.weight": "model.layers.1.self_attn.q_proj",
              "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj"}[t.name]
        # the folder's own nibbles, f16 scales and biases, computed in float32 as gguf does
        ours = np.array(mx.dequantize(source[hf + ".weight"],
                                      source[hf + ".scales"].astype(mx.float32),
                                      source[hf + ".biases"].astype(mx.float32),
                                      group_size=32, bits=4))
        if "attn_q" in t.name:
            ours = _permute_rotary(ours, config["num_attention_heads"])
        # the same nibbles, scales and minimums: equal up to a fused multiply-add's last bit
        assert np.allclose(gguf.quants.dequantize(t.data, t.tensor_type), ours, rtol=1e-6,
                           atol=1e-7)


def test_an_mlx_lm_4bit_folder_loads_in_transformers(q4_folder, tmp_path):
    import mlx_lm

    write_gguf(q4_folder, tmp_path / "q.gguf", "q4_1")
    theirs = logits(from_gguf(tmp_path / "q.gguf"), IDS)
    model, _ = mlx_lm.load(str(q4_folder))
    model.set_dtype(mx.float32)  # the same dequantized weights, computed in float32
    ours = np.array(model(mx.array(IDS)).astype(mx.float32))
    assert np.abs(theirs - ours).max() <= 2e-3


@pytest.mark.slow
def test_llama_cpp_scores_an_f16_export_as_mlxlab_does(lm_run, tmp_path):
    """llama.cpp itself (llama-cpp-python, a source build: not in the dev extra)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import mlx.core as mx

    out = tmp_path / "m.gguf"
    assert export(str(lm_run), "--format", "gguf", "--quant", "f16", "--out", str(out)).returncode == 0
    model, _ = load_run_model(lm_run)
    ids = [int(i) for i in np.random.default_rng(3).integers(0, model.vocab_size, size=40)]
    llm = llama_cpp.Llama(str(out), n_ctx=64, logits_all=True, n_threads=2, verbose=False)
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)])
    assert np.abs(theirs - mlx_logits(model, np.array([ids]))[0]).max() <= 1e-2
    assert int(np.argmax(theirs[-1])) == int(mx.argmax(model(mx.array([ids]))[0, -1]))


def test_a_k_quant_of_a_run_says_what_its_importance_matrix_weighted(lm_run, tmp_path, capsys):
    """`mlxlab export RUN --format gguf --quant q4_k_m` (the verb's main in this process): one
    line counts the training rows of the run's importance matrix and the tensors llama.cpp
    quantized that it weighted, and names the token embedding as the one it did not; the
    report's counts are the file's (tests/test_export_gguf_imatrix.py: the vectors)."""
    import gguf

    from mlxlab.cli.main import main

    out = tmp_path / "k.gguf"
    capsys.readouterr()
    assert main(["export", str(lm_run), "--format", "gguf", "--quant", "q4_k_m", "--out",
                 str(out)]) == 0
    [line] = [x for x in capsys.readouterr().out.splitlines() if "importance matrix" in x]
    quantized = [t for t in gguf.GGUFReader(str(out)).tensors
                 if t.tensor_type.name not in ("F32", "F16")]
    expected = (f"training rows: weighted {len(quantized) - 1} of the {len(quantized)} tensors "
                f"llama.cpp quantized; unweighted: token_embd.weight")
    assert line.startswith("importance matrix on ") and line.endswith(expected), line
