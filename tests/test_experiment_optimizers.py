"""Every experiment composes with every optimizer group: `experiment=X optimizer=Y` never sets a
key optimizer Y does not take (`experiment=finetune_chat optimizer=adam` exited 2: the
experiment sets optimizer.weight_decay, which mlx's Adam has no argument for)."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_class
from omegaconf import OmegaConf, open_dict

from conftest import cross_encoder_stub, model_folder_stub
from mlxlab.config import config_dir, group_options, instantiate, validate
from mlxlab.training.optim import LRSchedule, build_optimizer

EXPERIMENTS = group_options("experiment")
OPTIMIZERS = group_options("optimizer")


def composed(root, pairs: list[tuple[str, str]]):
    """Each (experiment, optimizer) composed through Hydra's compose API as the CLI composes
    it, a model folder given where the experiment asks for one."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        for experiment, optimizer in pairs:
            cfg = compose("train", overrides=[f"experiment={experiment}",
                                              f"optimizer={optimizer}",
                                              f"paths.root_dir={root}"],
                          return_hydra_config=True)
            HydraConfig.instance().set_config(cfg)
            with open_dict(cfg):
                del cfg["hydra"]
                if OmegaConf.is_missing(cfg.model, "pretrained"):
                    stub = {"rerank": cross_encoder_stub,
                            "embed_retrieval": embedder_folder}.get(experiment, model_folder_stub)
                    cfg.model.pretrained = str(stub(root))
                if experiment == "finetune_vision":  # a vision-language folder, built once
                    from vision_models import tiny_vlm

                    vlm = root / "vlm"
                    cfg.model.pretrained = str(vlm if vlm.is_dir() else tiny_vlm("smolvlm", vlm))
                    cfg.optimized_metric = "val/loss"
                if cfg.data.get("train_file", "") is None:  # the user's own rows (draft_model)
                    rows = root / "rows.jsonl"
                    rows.write_text('{"prompt": "1+1=", "completion": "2"}\n' * 4)
                    cfg.data.train_file = str(rows)
                    cfg.model.keep_layers = 1  # the stub's 2 blocks: a draft keeps fewer
                if "teachers" in cfg.objective and not cfg.objective.teachers:  # the user's
                    (root / "teacher").mkdir(exist_ok=True)  # a tokenizer the checks read
                    (root / "teacher" / "tokenizer.json").write_text("{}")
                    cfg.objective.teachers = [str(root / "teacher")]
            yield experiment, optimizer, cfg


def embedder_folder(root: Path) -> Path:
    """The tiny sentence-transformers folder (embedder_fixtures), written once under `root`."""
    from embedder_fixtures import write_tiny_folder

    folder = root / "st"
    return folder if folder.is_dir() else write_tiny_folder(folder)


def check(cfg) -> None:
    """validate() passes and the optimizer node builds a real optimizer that takes a step."""
    import mlx.core as mx

    validate(cfg)
    opt = build_optimizer(instantiate(cfg.optimizer), LRSchedule(), 10)
    params = {"w": mx.ones((4, 4))}
    out = opt.apply_gradients({"w": mx.full((4, 4), 0.5)}, params)
    mx.eval(out)
    assert float((out["w"] - params["w"]).abs().sum()) > 0


def test_every_key_an_experiment_sets_every_optimizer_takes():
    """The experiments' optimizer keys (read from their files) against each optimizer's
    arguments: the static half of the product below, fast."""
    keys = set()
    for name in EXPERIMENTS:
        node = OmegaConf.load(f"{config_dir()}/experiment/{name}.yaml").get("optimizer") or {}
        keys |= set(node)
    assert "weight_decay" in keys and "learning_rate" in keys
    for name in OPTIMIZERS:
        target = OmegaConf.load(f"{config_dir()}/optimizer/{name}.yaml")["_target_"]
        takes = set(inspect.signature(get_class(target)).parameters)
        assert keys <= takes, f"optimizer={name} ({target}) does not take {keys - takes}"


def test_finetune_chat_with_adam(tmp_path):
    """The pair the report met, composed and validated; adam's decay is PyTorch's L2."""
    [(_, _, cfg)] = composed(tmp_path, [("finetune_chat", "adam")])
    assert cfg.optimizer.weight_decay == 0.0
    check(cfg)


@pytest.mark.slow
def test_every_experiment_composes_with_every_optimizer(tmp_path):
    """The whole product (13 x 5 composes: a minute on a loaded 2-core box)."""
    pairs = [(e, o) for e in EXPERIMENTS for o in OPTIMIZERS]
    seen = 0
    for experiment, optimizer, cfg in composed(tmp_path, pairs):
        try:
            check(cfg)
        except Exception as err:
            raise AssertionError(f"experiment={experiment} optimizer={optimizer}: {err}") from err
        seen += 1
    assert seen == len(pairs) >= 60
