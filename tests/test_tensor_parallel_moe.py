"""trainer.distributed.mode=tensor on a MoE with routed experts (mlx-lm's SwitchLinear): mlx-lm's
`shard` slices the stacked experts in place, keeping their type, so the checkpoint layout would
write rank 0's slice under the whole name and the gradient clip would count each slice once.
The run is refused in one line before any run folder (the model built lazily from its
config.json); a dense decoder still passes the check."""

from __future__ import annotations

import pytest

from conftest import config_refusal
from hf_helpers import save_tiny_model


def checked(tmp_path, folder, mode: str = "tensor") -> str | None:
    return config_refusal(tmp_path, ["experiment=finetune_chat", f"model.pretrained={folder}",
                                     f"trainer.distributed.mode={mode}"])


@pytest.mark.parametrize("kind, extra", [("qwen3_moe", {}),
                                         ("deepseek_v3", {"n_routed_experts": 8, "n_group": 2,
                                                          "topk_group": 1})])
def test_tensor_parallel_refuses_routed_experts_before_a_run_folder(tmp_path, kind, extra):
    folder = save_tiny_model(kind, tmp_path / kind, chat="chatml", **extra)
    line = checked(tmp_path, folder)
    assert line is not None and f"this {kind} model's routed experts" in line, line
    assert "trainer.distributed.mode=fsdp" in line
    assert checked(tmp_path, folder, "fsdp") is None


def test_a_dense_decoder_passes_the_tensor_parallel_check(tmp_path):
    folder = save_tiny_model("qwen3", tmp_path / "qwen3", chat="chatml")
    assert checked(tmp_path, folder) is None
