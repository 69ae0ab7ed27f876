"""Keys mlxlab reads no more (config/retired.py) are one line naming what to write instead,
typed on the command line or set in a config file, and refused before anything is created."""

from __future__ import annotations

import re
import subprocess

import pytest

from conftest import PYTHON, compose_cfg
from mlxlab.config import validate
from mlxlab.errors import ConfigError
from mlxlab.launch.argv import check_group_choices

RETIRED = [
    ("trainer.memory_budget_mb=8000", "trainer.memory_budget_mb is retired: write "
     "trainer.micro_batch=auto (the largest micro-batch whose step fits trainer.memory_limit"),
    ("sweep.skip_finished=true", "sweep.skip_finished is retired: write nothing (a grid run "
     "again continues its sweep by itself"),
    ("callbacks.checkpoint.keep_last_n=5", "callbacks.checkpoint.keep_last_n is "
     "checkpoint.keep_last_n now: write checkpoint.keep_last_n=5 (the checkpoint policy is a "
     "group of its own)"),
]


@pytest.mark.parametrize(("override", "message"), RETIRED)
def test_a_retired_key_on_the_command_line_names_its_replacement(override, message):
    for typed in (override, f"+{override}"):
        with pytest.raises(ConfigError, match=f"^{re.escape(message)}"):
            check_group_choices(["tracking=none", typed])


@pytest.mark.parametrize(("override", "message"), RETIRED)
def test_a_retired_key_in_a_config_file_names_its_replacement(tmp_path, override, message):
    cfg = compose_cfg(tmp_path, [f"+{override}"])  # what a file of the user's composes
    with pytest.raises(ConfigError, match=f"^{re.escape(message.split(': write ')[0])}: write "):
        validate(cfg)


def test_a_config_file_setting_the_memory_budget_exits_2_and_creates_nothing(tmp_path, cli_env):
    """`--config-dir` with an experiment of the user's that still sets trainer.memory_budget_mb:
    one line, exit 2, no run folder and no store."""
    mine = tmp_path / "my_conf" / "experiment"
    mine.mkdir(parents=True)
    (mine / "old.yaml").write_text("# @package _global_\ntrainer:\n  memory_budget_mb: 8000\n")
    out = subprocess.run([PYTHON, "-m", "mlxlab.train", "--config-dir", str(tmp_path / "my_conf"),
                          "experiment=old", "tracking=none"], cwd=tmp_path, env=cli_env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [f"mlxlab: error: {RETIRED[0][1]}; grad_accum "
                                               "follows)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my_conf"]
