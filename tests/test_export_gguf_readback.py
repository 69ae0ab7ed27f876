"""Every GGUF the writer writes is read back (export/gguf_readback.py), so every GGUF export of
a run is judged from its file; one that does not read back is refused, never written unjudged.

The parametrization is the writer's own list of architectures: an architecture added to the
writer without a read-back fails here. An f32 file reads back as the folder it was written from,
bit for bit (a hybrid's to float32 round-off: A stored as -exp(A_log), Qwen3.5's norms as 1 + w); a q8_0 file as its own (rounded) values, which gguf-py dequantizes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hf_helpers import mlx_logits, save_tiny_model
from hybrid_families import save_tiny_hybrid
from mlxlab.export.gguf import ARCHITECTURES, GGUFExportError, write_gguf
from mlxlab.export.gguf_readback import read_written_gguf
from mlxlab.models.decoders.mlx_lm_decoder import MLXLMDecoder

IDS = np.array([[5, 17, 99, 3, 250, 31, 7, 8]])


# the hybrids' tiny folders (tests/hybrid_families.py); Nemotron-H as its MoE variant
HYBRIDS = {"mamba2": "mamba2", "granitemoehybrid": "granitemoehybrid",
           "nemotron_h": "nemotron_h_moe", "qwen3_5_text": "qwen3_5", "qwen3_next": "qwen3_next",
           "falcon_h1": "falcon_h1", "kimi_linear": "kimi_linear"}


@pytest.mark.parametrize("kind", sorted(ARCHITECTURES))
def test_every_written_architecture_reads_back_as_written(kind, tmp_path):
    import mlx.core as mx

    folder = (save_tiny_hybrid(HYBRIDS[kind], tmp_path / f"tiny-{kind}") if kind in HYBRIDS
              else save_tiny_model(kind, tmp_path / f"tiny-{kind}"))
    ours = mlx_logits(MLXLMDecoder(vocab_size=1, pretrained=str(folder)), IDS)
    write_gguf(folder, tmp_path / "f32.gguf", "f32")
    back = read_written_gguf(tmp_path / "f32.gguf", folder, tmp_path / "f32")
    written = mx.load(str(tmp_path / "f32" / "model.safetensors"))
    source = {k: v for f in folder.glob("*.safetensors") for k, v in mx.load(str(f)).items()}
    # the folder, bit for bit; a hybrid's to float32 round-off: the file holds -exp(A_log), and
    # 1 + w for a zero-centred norm, which its weights (drawn off zero here) do not come back from
    for name, w in written.items():
        if kind in HYBRIDS:
            np.testing.assert_allclose(np.array(w), np.array(source[name]), rtol=0, atol=1e-7)
        else:
            assert np.array_equal(np.array(w), np.array(source[name].astype(mx.float32))), name
    if kind in HYBRIDS:
        np.testing.assert_allclose(mlx_logits(back, IDS), ours, rtol=0, atol=1e-5)
    else:
        assert np.array_equal(mlx_logits(back, IDS), ours)
    write_gguf(folder, tmp_path / "q8.gguf", "q8_0")
    rounded = mlx_logits(read_written_gguf(tmp_path / "q8.gguf", folder, tmp_path / "q8"), IDS)
    assert 0 < np.abs(rounded - ours).max() < np.abs(ours).max()  # the file's own values


def test_a_file_that_does_not_read_back_is_an_error(tmp_path):
    """A truncated file (or one whose tensors are not the writer's) is one GGUFExportError: the
    export that wrote it is refused (export/judgement.py judge_gguf)."""
    folder = save_tiny_model("gemma2", tmp_path / "tiny")
    file = tmp_path / "x.gguf"
    write_gguf(folder, file, "q8_0")
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError):
        read_written_gguf(file, folder, tmp_path / "back")
    other = save_tiny_model("olmo2", tmp_path / "other")  # another architecture's folder
    write_gguf(folder, file, "q8_0")
    config = json.loads((other / "config.json").read_text())
    assert config["model_type"] == "olmo2"
    with pytest.raises(GGUFExportError, match="not read back|does not load|header"):
        read_written_gguf(file, other, tmp_path / "back2")


@pytest.mark.slow  # training a run (~10 s on a loaded box)
def test_a_run_of_an_architecture_mlxlabs_reader_lacked_is_judged_from_its_file(tmp_path):
    """OLMo 2 (which models/sources/gguf.py does not convert): its run's q8_0 GGUF is read
    back and judged (retention on the report), and its f32 file holds the fine-tune's logits."""
    from mlxlab.export import export_gguf
    from test_mlx_lm_decoders import train_chat

    folder = save_tiny_model("olmo2", tmp_path / "tiny-olmo2", chat="chatml")
    _, run = train_chat(folder, tmp_path)
    report = export_gguf(run, tmp_path / "ft.gguf", "q8_0", retention=None)
    assert report["retention"]["measures"] and report["file_check"]["status"] == "measured"
    exact = export_gguf(run, tmp_path / "f32.gguf", "f32")
    assert exact["file_check"]["status"] == "checked"
