"""Every decoder mlx-lm loads, on mlxlab's loop: tiny random llama, mistral, qwen2, qwen3,
gemma3_text, phi3, qwen3_moe (MoE) and olmo2 (post-norm, not Llama-shaped) folders written by
transformers 5 (config.json in the hub's keys) each train LoRA steps on chats in their own template
through the real training entry, score a multiple-choice task, export, and load in transformers with
mlxlab's logits to 1e-4. A 4-bit `mlx_lm.convert -q` folder trains QLoRA with the base still packed
and its adapters load in mlx-lm on the base shipped bit for bit, decoding the run's greedy
text; DoRA, model.quantize, full fine-tuning and gradient checkpointing
train; folders mlx-lm cannot load are one line."""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from hf_helpers import mlx_logits, save_tiny_model, torch_logits
from mlxlab.config import asset_path
from mlxlab.errors import ConfigError
from mlxlab.evaluation.results import read_scores
from mlxlab.export import export_run
from mlxlab.models import num_parameters
from mlxlab.models.adapters.lora import AdapterLayer, LoRALinear
from mlxlab.models.decoders.mlx_lm_decoder import MLXLMDecoder
from mlxlab.runs import load_run_model
from mlxlab.runs.generate import plain_prompt_ids
from mlxlab.runs.inference import load_run, sample_ids
from mlxlab.tracking.csv_files import read_metrics

IDS = np.random.default_rng(5).integers(0, 500, size=(2, 24))
# model_type -> the chat style its template is written in (scripts/tiny_hf_model.py CHAT_STYLES)
ARCHS = {"llama": "llama3", "mistral": "mistral", "qwen2": "qwen2.5", "qwen3": "chatml",
         "gemma3_text": "gemma", "phi3": "phi3", "qwen3_moe": "chatml", "olmo2": "chatml"}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def chats(n: int, system: bool = True) -> list[dict]:
    """The shipped chats (a system turn on every third); Mistral's template refuses system."""
    rows = [json.loads(line) for line in
            Path(asset_path("tinystories/chats.jsonl")).read_text().splitlines()[:n]]
    if not system:
        rows = [{"messages": [m for m in r["messages"] if m["role"] != "system"]} for r in rows]
    return rows


def mc_task(path: Path) -> Path:
    words = ["red", "blue", "green", "yellow"]
    return write_jsonl(path, [{"id": f"q{i}", "prompt": f"Ball {i} is", "choices": words,
                               "answer": i % 4} for i in range(8)])


def train_chat(folder: Path, root: Path, *overrides: str) -> tuple[dict, Path]:
    """experiment=finetune_chat on 16 chats for 3 steps, scoring a multiple-choice task; the run
    folder is root/outputs/run."""
    from hydra.core.global_hydra import GlobalHydra

    from conftest import compose_cfg
    from mlxlab.train import train

    root.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(root / "chats.jsonl", chats(16, system="mistral" not in folder.name))
    cfg = compose_cfg(root, ["experiment=finetune_chat", f"model.pretrained={folder}",
                   f"data.train_file={data}", "data.val_fraction=0.25", "data.max_length=96",
                   "trainer.max_steps=3", "trainer.eval_every_steps=3", "trainer.batch_size=4",
                   "optimizer.learning_rate=1e-2", "tracking=csv",
                   "callbacks.progress.enabled=false", f"eval.tasks=[{mc_task(root / 'mc.jsonl')}]",
                   *overrides])
    try:
        return train(cfg), Path(cfg.paths.output_dir)
    finally:
        GlobalHydra.instance().clear()


@pytest.mark.parametrize("kind", list(ARCHS))  # 1-2 s each on 2 cores (the first: imports)
def test_each_architecture_trains_scores_and_exports(kind, tmp_path):
    from transformers import AutoModelForCausalLM

    folder = save_tiny_model(kind, tmp_path / f"tiny-{kind}", chat=ARCHS[kind])
    metrics, run = train_chat(folder, tmp_path)
    assert np.isfinite(metrics["val/loss"])
    logged = read_metrics(run / "tracking")  # the task scored at the evaluation, 8 questions
    assert [s for s, _ in logged["eval/mc/acc"]] == [3]
    assert len(read_scores(run / "eval_tasks" / "last")["mc"].rows) == 8
    model, state = load_run_model(run)
    assert isinstance(model, MLXLMDecoder) and model.architecture["model_type"] == kind
    adapters = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert adapters and any(mx.abs(m.lora_b).max().item() > 0 for m in adapters)  # trained
    tuned = mlx_logits(model, IDS)
    out = tmp_path / "hf"
    export_run(run, out, "hf", "float32", lora="fuse")
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__.lower().startswith(kind.split("_")[0].replace("3", "").replace(
        "2", "")[:4])
    assert np.abs(torch_logits(hf, IDS) - tuned).max() <= 1e-4  # the fine-tune, in transformers
    base = mlx_logits(MLXLMDecoder(vocab_size=1, pretrained=str(folder)), IDS)
    assert np.abs(base - tuned).max() > 1e-3  # the adapters changed the model


@pytest.fixture(scope="module")
def q4_folder(tmp_path_factory) -> Path:
    """A tiny Qwen3 (ChatML) converted to 4 bits by mlx-lm's own convert (group size 32)."""
    from mlx_lm.convert import convert

    root = tmp_path_factory.mktemp("q4")
    folder = save_tiny_model("qwen3", root / "qwen3", chat="chatml")
    convert(str(folder), str(root / "qwen3-4bit"), quantize=True, q_bits=4, q_group_size=32,
            dtype="float32")
    return root / "qwen3-4bit"


def test_a_4bit_folder_trains_qlora_and_its_adapters_load_in_mlx_lm(q4_folder, tmp_path, caplog):
    import mlx_lm

    with caplog.at_level("INFO", logger="mlxlab.models.decoders.mlx_lm_decoder"):
        metrics, run = train_chat(q4_folder, tmp_path)
    assert np.isfinite(metrics["val/loss"])
    said = [r.getMessage() for r in caplog.records if "trainable" in r.getMessage()]
    model, _ = load_run_model(run)
    # the base stayed packed: every projection and the embedding are 4-bit, the adapters float
    block = model.lm.model.layers[0]
    assert isinstance(block.self_attn.q_proj, LoRALinear)
    assert isinstance(block.self_attn.q_proj.linear, nn.QuantizedLinear)
    assert block.self_attn.q_proj.linear.bits == 4
    # ... and on the CPU multiplies through the fused dequantize + GEMM
    # (models/quantized/quantized_cpu.py)
    assert type(block.self_attn.q_proj.linear).__name__ == "CpuQuantizedLinear"
    assert isinstance(block.mlp.gate_proj, nn.QuantizedLinear)
    assert isinstance(model.lm.model.embed_tokens, nn.QuantizedEmbedding)
    assert block.self_attn.q_proj.lora_a.dtype == mx.float32
    trainable = num_parameters(model, trainable_only=True)
    adapters = sum(v.size for n, v in tree_flatten(model.parameters())
                   if n.endswith((".lora_a", ".lora_b")))
    assert trainable == adapters > 0
    assert said == [f"qwen3 decoder: trains lora adapters (rank 8, float32) on the frozen 4-bit "
                    f"quantized base; {trainable:,} trainable / {num_parameters(model):,} total "
                    "parameters"]
    # the checkpoint holds the adapters; the packed base is the folder's (test_adapter_checkpoints)
    saved = mx.load(str(next((run / "checkpoints").glob("step_*")) / "model.safetensors"))
    assert saved and all(n.endswith((".lora_a", ".lora_b")) for n in saved)
    # the adapter folder (and the fused one, still 4-bit) in mlx-lm give mlxlab's logits
    out = tmp_path / "adapters"
    export_run(run, out, "mlx-lm", "float32", lora="adapters")
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 4
    theirs, tokenizer = mlx_lm.load(str(out), adapter_path=str(out / "adapters"))
    ours = mlx_logits(model, IDS)
    assert np.abs(np.array(theirs(mx.array(IDS))) - ours).max() <= 1e-4
    # the 4-bit base ships untouched: the folder's packed weights, scales and biases, bit for bit
    shipped, source = mx.load(str(out / "model.safetensors")), mx.load(str(q4_folder / "model.safetensors"))
    assert shipped.keys() == source.keys()
    assert all(mx.array_equal(shipped[k], source[k]).item() for k in source)
    # mlx-lm's own greedy generation (mlx_lm.generate's, token by token) on base + adapters
    # decodes the tokens `mlxlab generate --temperature 0` decodes for the run (the texts then
    # differ only in mlx-lm's detokenizer dropping a leading space)
    loaded = load_run(run)
    for prompt in ("Once upon a time", "The little dog", "She said"):
        ids = plain_prompt_ids(loaded.tokenizer, loaded.tokenizer_path.parent,
                               loaded.model.hf_config, prompt)
        ours_ids = list(sample_ids(loaded, prompt, 16, 0.0, 0, 1.0))
        theirs_ids = [r.token for r in mlx_lm.stream_generate(theirs, tokenizer, ids,
                                                               max_tokens=16)]
        assert theirs_ids[:len(ours_ids)] == ours_ids and len(ours_ids) > 4
        assert tokenizer.decode(theirs_ids[:len(ours_ids)]) == loaded.tokenizer.decode(ours_ids)
    fused = tmp_path / "fused"
    export_run(run, fused, "mlx-lm", "float32", lora="fuse")
    fused_model, _ = mlx_lm.load(str(fused))
    assert isinstance(fused_model.model.layers[0].self_attn.q_proj, nn.QuantizedLinear)


def test_quantize_at_load_dora_and_the_refusals(q4_folder):
    """model.quantize=4 packs a float folder at load; DoRA wraps the packed base and starts as
    the base; full fine-tuning of a quantized base and quantizing a packed one are one line each
    (unknown model types: test_hf_decoder.py)."""
    import mlx_lm

    float_folder = q4_folder.parent / "qwen3"
    packed = MLXLMDecoder(vocab_size=1, pretrained=str(float_folder), quantize=4,
                          lora={"rank": 4, "targets": ["query", "value"], "kind": "dora"})
    q = packed.lm.model.layers[0].self_attn.q_proj
    assert type(q).__name__ == "DoRALinear" and isinstance(q, AdapterLayer)
    assert isinstance(q.linear, nn.QuantizedLinear)
    assert packed.hf_config["quantization"]["bits"] == 4
    assert num_parameters(packed, trainable_only=True) == sum(
        v.size for n, v in tree_flatten(packed.parameters()) if n.endswith((".lora_a", ".lora_b",
                                                                             ".m")))
    plain = MLXLMDecoder(vocab_size=1, pretrained=str(float_folder), quantize=4)
    assert np.abs(mlx_logits(packed, IDS) - mlx_logits(plain, IDS)).max() <= 1e-4  # B = 0
    reference, _ = mlx_lm.load(str(q4_folder))
    loaded = MLXLMDecoder(vocab_size=1, pretrained=str(q4_folder))
    # (to float32 rounding: on the CPU the packed layers multiply through mlxlab's fused
    # dequantize + GEMM, models/quantized/quantized_cpu.py, summing in another order than MLX's)
    theirs = np.array(reference(mx.array(IDS)))
    assert np.abs(mlx_logits(loaded, IDS) - theirs).max() <= 1e-5 * np.abs(theirs).max()
    with pytest.raises(ConfigError, match=r"needs a float base and this one is quantized"):
        MLXLMDecoder(vocab_size=1, pretrained=str(q4_folder), lora={"rank": 0})
    with pytest.raises(ConfigError, match="already quantized"):
        MLXLMDecoder(vocab_size=1, pretrained=str(q4_folder), quantize=8)


def test_full_fine_tuning_grad_checkpoint_and_dora(q4_folder, tmp_path, caplog):
    """Rank 0 trains every float parameter; trainer.grad_checkpoint=true recomputes the blocks
    in the backward and gives the same losses (to float rounding); a DoRA run's adapter folder
    loads in mlx-lm with mlxlab's logits."""
    import mlx_lm

    folder = q4_folder.parent / "qwen3"
    plain, _ = train_chat(folder, tmp_path / "a", "model.lora.rank=0", "eval.tasks=[]")
    with caplog.at_level("INFO", logger="mlxlab.training.loop"):
        recomputed, run = train_chat(folder, tmp_path / "b", "model.lora.rank=0",
                                     "eval.tasks=[]", "trainer.grad_checkpoint=true")
    assert "gradient checkpointing: 2 blocks recompute their activations in the backward" in \
        caplog.messages
    assert recomputed["val/loss"] == pytest.approx(plain["val/loss"], rel=1e-4)
    model, _ = load_run_model(run)
    assert num_parameters(model) == num_parameters(MLXLMDecoder(1, pretrained=str(folder)))
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())
    _, run = train_chat(folder, tmp_path / "c", "model.lora.kind=dora", "eval.tasks=[]")
    export_run(run, tmp_path / "dora", "mlx-lm", "float32", lora="adapters")
    config = json.loads((tmp_path / "dora" / "adapters" / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "dora"
    theirs, _ = mlx_lm.load(str(tmp_path / "dora"), adapter_path=str(tmp_path / "dora" / "adapters"))
    model, _ = load_run_model(run)
    assert np.abs(np.array(theirs(mx.array(IDS))) - mlx_logits(model, IDS)).max() <= 1e-4


@pytest.mark.slow
def test_a_qwen3_moe_run_sigkilled_mid_run_resumes_bitwise(tmp_path, cli_env):
    """A MoE decoder (qwen3_moe: router, stacked experts, q/k norms) LoRA-trained on chats,
    SIGKILLed after its step-4 checkpoint, resumed: weights and the whole metric history are
    bitwise those of an uninterrupted run."""
    folder = save_tiny_model("qwen3_moe", tmp_path / "tiny-moe", chat="chatml")
    resumes_bitwise(folder, tmp_path, cli_env)


def resumes_bitwise(folder: Path, tmp_path: Path, cli_env: dict, *overrides: str) -> None:
    """A qwen3_moe run of 10 steps SIGKILLed after its step-4 checkpoint and resumed: its
    weights and metric history are bitwise the uninterrupted run's."""
    from run_helpers import committed_steps, kill_when, run, start
    from test_resume import assert_same_history, assert_same_weights, run_id_of

    data = write_jsonl(tmp_path / "chats.jsonl", chats(24))
    args = ["experiment=finetune_chat", f"model.pretrained={folder}", f"data.train_file={data}",
            "data.val_fraction=0.25", "data.max_length=64", "trainer.batch_size=4",
            "trainer.max_steps=10", "trainer.eval_every_steps=5", "trainer.log_every_steps=1",
            "optimizer.learning_rate=1e-2", "callbacks.progress.enabled=false",
            "checkpoint.save_every_steps=2", "checkpoint.save_every_minutes=null", *overrides]
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    reference = tmp_path / "reference"
    run(args, reference, cli_env)
    killed = tmp_path / "killed"
    proc = start(args, killed, cli_env)
    kill_when(proc, lambda: any(s >= 4 for s in committed_steps(killed)))
    assert max(committed_steps(killed)) < max(committed_steps(reference))
    resumed = tmp_path / "resumed"
    run([*args, f"resume={killed}"], resumed, cli_env)
    assert_same_weights(reference, resumed, "qwen3_moe")
    assert run_id_of(resumed) == run_id_of(killed)
    assert_same_history(uri, reference, resumed, "qwen3_moe")


def test_grad_checkpoint_keeps_the_gradients_and_refuses_a_model_without_blocks():
    """A from-scratch Transformer's blocks recomputed in the backward give the same gradients;
    only these instances change class (a second model of the class is untouched); a model
    without decoder blocks is one line."""
    from mlxlab.models.decoders.transformer import Transformer
    from mlxlab.models.encoders.bert import BertClassifier
    from mlxlab.models.layers.grad_checkpoint import checkpoint_blocks

    def grads(model):
        ids = mx.array(IDS[:, :16] % 64)
        loss = lambda m: nn.losses.cross_entropy(m(ids)[:, :-1], ids[:, 1:]).mean()  # noqa: E731
        return dict(tree_flatten(nn.value_and_grad(model, loss)(model)[1]))

    mx.random.seed(0)
    plain = Transformer(vocab_size=64, dim=32, num_layers=2, num_heads=2, max_seq_len=32)
    mx.random.seed(0)
    wrapped = Transformer(vocab_size=64, dim=32, num_layers=2, num_heads=2, max_seq_len=32)
    assert checkpoint_blocks(wrapped) == 2
    assert type(wrapped.layers[0]).__name__ == "CheckpointedDecoderBlock"
    assert type(plain.layers[0]).__name__ == "DecoderBlock"
    expected, got = grads(plain), grads(wrapped)
    assert expected.keys() == got.keys()
    assert all(np.allclose(np.array(expected[k]), np.array(got[k]), atol=1e-6) for k in expected)
    with pytest.raises(ConfigError, match="has no decoder blocks to recompute"):
        checkpoint_blocks(BertClassifier(vocab_size=64, num_labels=2, hidden_size=32,
                                         num_layers=1, num_heads=2))


def _cut_at_stop(raw: list[int], stops: set[int]) -> tuple[list[int], int | None]:
    """The ids before the first stop id and that stop (None: no stop among them)."""
    cut = next((i for i, t in enumerate(raw) if t in stops), len(raw))
    return raw[:cut], raw[cut] if cut < len(raw) else None


def test_a_gemma_run_generates_and_exports_to_its_own_end_tokens(tmp_path, capsys):
    """A Gemma 3 run (<eos> and <end_of_turn>, on no fixed list; its folder without a
    generation_config.json) generates with `mlxlab generate`, stopping before <end_of_turn> or
    <eos> (high temperature: both occur among a few seeds); its HF export's
    generation_config.json names both, and transformers' generate stops at either."""
    import torch
    from transformers import AutoModelForCausalLM

    from mlxlab.cli.main import main
    from mlxlab.decoding.generation import generate_tokens
    from mlxlab.runs.inference import complete, load_run, sample_ids

    folder = save_tiny_model("gemma3_text", tmp_path / "tiny-gemma3_text", chat="gemma")
    (folder / "generation_config.json").unlink()  # the run must name the stops itself
    _, run_dir = train_chat(folder, tmp_path)
    capsys.readouterr()
    run = load_run(run_dir)
    tok = run.tokenizer
    turn, eos = tok.token_to_id("<end_of_turn>"), tok.token_to_id("<eos>")
    prompt = "Tim and Sue"
    prompt_ids = [tok.token_to_id("<bos>"), *tok.encode(prompt, add_special_tokens=False).ids]
    stopped = set()
    for seed in range(80):  # until both stops occurred (within 30 tokens: about 1 seed in 8)
        if {turn, eos} <= stopped:
            break
        ids = list(sample_ids(run, prompt, 30, 50.0, 0, 1.0, seed))
        if len(ids) < 30:  # it stopped: before the first stop id of the raw samples
            raw = list(islice(generate_tokens(run.model, prompt_ids, 50.0, 0, 1.0, seed),
                              len(ids) + 1))
            assert raw[:-1] == ids and raw[-1] in (turn, eos)
            assert not {turn, eos} & set(ids)
            stopped.add(raw[-1])
    assert {turn, eos} <= stopped  # both end a generation
    args = ["--prompt", prompt, "--max-tokens", "30", "--temperature", "50", "--top-k", "0",
            "--top-p", "1", "--seed", "0"]
    assert main(["generate", str(run_dir), *args]) in (0, None)
    assert capsys.readouterr().out.rstrip("\n") == prompt + complete(run, prompt, 30, 50.0, 0,
                                                                     1.0, 0)

    out = tmp_path / "hf"
    export_run(run_dir, out, "hf", "float32")
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [turn, eos]  # the template's end of turn, then EOS
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    for end in (turn, eos):  # a strong bias makes the next token `end`: generation ends there
        new = hf.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=4,
                          sequence_bias={(end,): 1e4})[0, len(prompt_ids):].tolist()
        assert new == [end]


def test_a_folder_saved_by_transformers_5_loads_with_its_rotary_base(tmp_path):
    """A model fine-tuned in transformers 5 and saved by its save_pretrained has
    `rope_parameters` and no top-level `rope_theta`, which mlx-lm's llama reads (default
    10000): the folder loads with its own base (1e5 here), its logits equal transformers' to
    1e-4, and the config a checkpoint rebuilds it from carries the base."""
    from transformers import AutoModelForCausalLM

    folder = save_tiny_model("llama", tmp_path / "tiny", rope_theta=100000.0)
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    hf.save_pretrained(folder)  # what a fine-tune in transformers leaves
    config = json.loads((folder / "config.json").read_text())
    assert "rope_theta" not in config and config["rope_parameters"]["rope_theta"] == 100000.0
    model = MLXLMDecoder(vocab_size=1, pretrained=str(folder))
    assert np.abs(torch_logits(hf, IDS) - mlx_logits(model, IDS)).max() <= 1e-4
    assert model.hf_config["rope_theta"] == 100000.0


@pytest.mark.parametrize("tied", [True, False])
def test_freeze_embeddings_trains_the_blocks_and_keeps_the_vocabulary_table(tied, tmp_path):
    """model.freeze_embeddings=true (a draft's): a full fine-tuning step moves every block and
    the final norm and leaves the token embeddings and the output head, tied or not, to the
    bit; under LoRA, where nothing would change, and as a non-bool it is one line."""
    import mlx.optimizers as optim

    folder = save_tiny_model("llama", tmp_path / "llama", seed=3, tie_word_embeddings=tied)
    model = MLXLMDecoder(vocab_size=1, pretrained=str(folder), lora={"rank": 0},
                         freeze_embeddings=True)
    trainable = {n for n, _ in tree_flatten(model.trainable_parameters())}
    frozen = {n for n, _ in tree_flatten(model.parameters())} - trainable
    assert frozen == ({"lm.model.embed_tokens.weight"} if tied else
                      {"lm.model.embed_tokens.weight", "lm.lm_head.weight"})
    before = {n: np.array(v) for n, v in tree_flatten(model.parameters())}
    ids = mx.array(IDS)

    def loss(m):
        return nn.losses.cross_entropy(m(ids[:, :-1]), ids[:, 1:]).mean()

    _, grads = nn.value_and_grad(model, loss)(model)
    optim.Adam(learning_rate=1e-2).update(model, grads)
    after = dict(tree_flatten(model.parameters()))
    moved = {n for n in before if not np.array_equal(before[n], np.array(after[n]))}
    assert moved == trainable and len(trainable) == 9 * 2 + 1  # 2 blocks of 9, the norm
    with pytest.raises(ConfigError, match="applies to full fine-tuning"):
        MLXLMDecoder.check_config({"pretrained": str(folder), "freeze_embeddings": True,
                                   "lora": {"rank": 8}})
    with pytest.raises(ConfigError, match="true or false"):
        MLXLMDecoder.check_config({"pretrained": str(folder), "freeze_embeddings": "yes",
                                   "lora": {"rank": 0}})
