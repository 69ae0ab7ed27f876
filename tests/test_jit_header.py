"""MLX's CPU kernels on a machine's first run: the header they read is precompiled once into
MLX's kernel folder, and g++ takes it when MLX compiles a kernel (real g++, real MLX)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from conftest import PYTHON
from mlxlab.runtime.compute import jit_header

needs_gxx = pytest.mark.skipif(shutil.which("g++") is None,
                               reason="MLX compiles CPU kernels with g++")

# A fresh machine's first compiled step, in a process of its own: the header is built, then
# MLX compiles a kernel of its own into the same folder.
FIRST_STEP = """
import json, sys
import mlx.core as mx
from mlxlab.runtime.compute import jit_header

header = jit_header.build_header()
step = mx.compile(lambda x, y: mx.tanh(x) * y - 0.25)
out = step(mx.full((8,), 2.0), mx.full((8,), 3.0))
print(json.dumps({"header": str(header), "folder": str(jit_header.kernel_folder()),
                  "out": out.tolist()}))
"""


@needs_gxx
def test_a_fresh_kernel_folder_gets_a_header_that_mlxs_kernel_compiles_take(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in jit_header.TEMP_VARIABLES}
    done = subprocess.run([PYTHON, "-c", FIRST_STEP], env={**env, "TMPDIR": str(tmp_path)},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.splitlines()[-1])
    folder = tmp_path / "mlx" / jit_header.mx.__version__ / "cpu"
    assert found["folder"] == str(folder)
    assert found["header"] == str(folder / "mlx/backend/cpu/compiled_preamble.h.gch")
    assert found["out"] == pytest.approx([float(jit_header.mx.tanh(2.0)) * 3 - 0.25] * 8)
    [source] = [p for p in folder.glob("*.cpp")]  # the kernel MLX generated and compiled
    assert (folder / f"lib{source.stem}.so").is_file()
    # compiled again as MLX compiles it, g++ takes the precompiled header ("!" in -H's list)
    again = subprocess.run(["g++", *jit_header.MLX_FLAGS, "-shared", "-I",
                            str(jit_header.include_folder()), "-H", str(source), "-o",
                            str(tmp_path / "again.so")], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"! {folder}/mlx/backend/cpu/compiled_preamble.h.gch" in again.stderr.splitlines()
    assert jit_header.build_header(folder) == folder / "mlx/backend/cpu/compiled_preamble.h.gch"


def test_no_header_where_none_can_be_built_and_nothing_fails(tmp_path, monkeypatch):
    """A kernel folder that cannot be made (a file in its way), or no g++ on PATH: no header,
    no error, nothing left behind (MLX's compiles read the real header as before)."""
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the folder would go")
    assert jit_header.build_header(blocked / "mlx" / "cpu") is None
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert jit_header.build_header(tmp_path / "folder") is None
    assert not (tmp_path / "folder").exists()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "run"))
    assert jit_header.kernel_folder() == tmp_path / "run" / "mlx" / jit_header.mx.__version__ / "cpu"


@needs_gxx
def test_a_header_gxx_would_not_take_is_not_kept_nor_built_again(tmp_path, monkeypatch):
    """MLX built with AVX2 compiles its kernels with -mavx2 -mfma -mf16c, and g++ does not take
    a header built without them: none is put in place, and a mark keeps later runs from
    building it again."""
    takes = jit_header.takes_header
    monkeypatch.setattr(jit_header, "takes_header", lambda folder, flags: takes(
        folder, [*flags, "-mavx2", "-mfma", "-mf16c"]))
    folder = tmp_path / "cpu"
    assert jit_header.build_header(folder) is None
    assert not jit_header.header_path(folder).exists() and jit_header.settled(folder)
    assert [p.name for p in folder.iterdir()] == ["mlx"]  # the build's own folder is gone
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # settled: g++ is not asked again
    assert jit_header.build_header(folder) is None
