"""The GGUF conversion cache (src/mlxlab/models/sources/conversions.py) and `mlxlab cache
list|clear` (src/mlxlab/cli/cache.py): keyed by the file's content, a conversion killed with
SIGKILL leaves a temporary the next conversion removes (a live writer's is kept), and the cache
lists and clears what it holds."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import MLXLAB, PYTHON
from gguf_files import rewrite_gguf, tiny_llama_gguf
from mlxlab.cli.cache import main as cache_main
from mlxlab.models import sources
from mlxlab.models.sources import resolve
from mlxlab.models.sources.conversions import UNRECORDED_STALE_S, WRITER, conversions_root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_llama_gguf(tmp_path_factory.mktemp("conversions"))


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("MLXLAB_CACHE_DIR", str(root))
    sources._resolved.clear()
    yield root
    sources._resolved.clear()


def test_a_copy_under_another_name_reuses_the_conversion(tiny, cache, tmp_path):
    first = resolve(str(tiny))
    stamp = (first.folder / "model.safetensors").stat().st_mtime_ns
    copy = tmp_path / "elsewhere" / "renamed-model.gguf"
    copy.parent.mkdir()
    shutil.copy(tiny, copy)
    second = resolve(str(copy))
    assert second.folder == first.folder
    assert (second.folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert second.provenance["file"] == str(copy.resolve())  # the run names its own file
    assert second.provenance["sha256"] == first.provenance["sha256"]
    assert [p.name for p in conversions_root().iterdir()] == [first.folder.name]


# a conversion killed as it verifies its output: weights and tokenizer written, not yet kept
KILLED = """
import os, signal, sys
from mlxlab.models.sources import gguf, resolve

def killed(tmp, path):
    os.kill(os.getpid(), signal.SIGKILL)

gguf._verify = killed
resolve(sys.argv[1])
"""
LIVE = """
import time
from mlxlab.models.sources.conversions import conversion_folder, new_temporary

print(new_temporary(conversion_folder("f" * 64)), flush=True)
time.sleep(300)
"""


def test_a_killed_conversions_temporary_is_removed_by_the_next_and_a_live_ones_kept(
        tiny, cache, tmp_path):
    env = {**os.environ, "MLXLAB_CACHE_DIR": str(cache)}
    done = subprocess.run([PYTHON, "-c", KILLED, str(tiny)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    (dead,) = [p for p in conversions_root().iterdir() if p.name.startswith(".")]
    assert (dead / "model.safetensors").is_file() and (dead / WRITER).is_file()
    assert not [p for p in conversions_root().iterdir() if not p.name.startswith(".")]
    live = subprocess.Popen([PYTHON, "-c", LIVE], env=env, stdout=subprocess.PIPE, text=True)
    try:
        alive = Path(live.stdout.readline().strip())
        assert (alive / WRITER).is_file()
        other_host = conversions_root() / ".abcdef0123456789-other"
        other_host.mkdir()
        (other_host / WRITER).write_text(json.dumps({"host": "another-host", "pid": "1"}))
        unrecorded = conversions_root() / ".0123456789abcdef-old"  # an older mlxlab's
        unrecorded.mkdir()
        long_ago = time.time() - UNRECORDED_STALE_S - 60
        os.utime(unrecorded, (long_ago, long_ago))

        listed = _list_json()
        busy = {e["entry"]: e["busy"] for e in listed if e["kind"] == "unfinished GGUF conversion"}
        assert busy[f"models/gguf/{dead.name}"] == "" and busy[f"models/gguf/{alive.name}"]
        assert cache_main(["clear", f"models/gguf/{alive.name}"]) == 0 and alive.is_dir()

        source = resolve(str(tiny))  # the next conversion: the same file, converted whole
        assert (source.folder / ".complete").is_file()
        assert not dead.exists() and not unrecorded.exists()
        assert alive.is_dir() and other_host.is_dir()
    finally:
        live.kill()
        live.wait()
    sources._resolved.clear()
    other = rewrite_gguf(tiny, tmp_path / "other.gguf", {"general.name": "other"})
    resolve(str(other))  # any later conversion removes the writer that died since
    assert not alive.exists() and other_host.is_dir()


def _list_json() -> list[dict]:
    out = subprocess.run([MLXLAB, "cache", "list", "--json"], capture_output=True, text=True,
                         env=dict(os.environ), timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_cache_list_and_clear(tiny, cache, tmp_path, capsys, monkeypatch):
    """`cache list` names each entry, its kind, size, the file that made it and when; `cache
    clear ENTRY` removes it; `--all` removes all but the kernels this install loads."""
    first = resolve(str(tiny)).folder
    other = resolve(str(rewrite_gguf(tiny, tmp_path / "other.gguf", {"general.name": "o"}))).folder
    kernels = _kernel_build_in(cache, monkeypatch)

    assert cache_main(["list"]) == 0
    text = capsys.readouterr().out
    assert f"cache {cache}: {3 if kernels else 2} entries" in text
    for folder, file in ((first, tiny), (other, tmp_path / "other.gguf")):
        (line,) = [row for row in text.splitlines() if row.startswith(f"models/gguf/{folder.name}")]
        assert "GGUF conversion" in line and "KiB" in line and line.endswith(str(file.resolve()))
    listed = {e["entry"]: e for e in _list_json()}
    entry = listed[f"models/gguf/{first.name}"]
    size = sum(p.stat().st_size for p in first.rglob("*") if p.is_file())
    assert entry["bytes"] == size and abs(entry["when"] - time.time()) < 600

    assert cache_main(["clear", f"models/gguf/{first.name}"]) == 0
    assert not first.exists() and other.is_dir()
    assert f"removed models/gguf/{first.name} (GGUF conversion" in capsys.readouterr().out
    assert cache_main(["clear", "models/gguf/nothing-like-it"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no cache entry 'models/gguf/nothing-like-it'" in err[0]
    with pytest.raises(SystemExit):  # list or clear, nothing else
        cache_main(["prune"])
    assert cache_main(["clear"]) == 2 and "or --all" in capsys.readouterr().err

    assert cache_main(["clear", "--all"]) == 0
    assert not other.exists()
    if kernels:
        assert kernels.is_dir() and "this install loads it" in capsys.readouterr().out
    sources._resolved.clear()
    assert resolve(str(tiny)).folder == first and (first / ".complete").is_file()


def _kernel_build_in(cache: Path, monkeypatch) -> Path | None:
    """The fused kernels this install loads, copied into the test's cache (kernels/ under the
    root, as by default), or None where there is no build here."""
    from mlxlab.kernels.build import build_key
    from mlxlab.runtime import settings
    from mlxlab.runtime.compute.cpu import isa_level

    level = isa_level()
    build = settings.current().kernels_cache / build_key(level) if level else None
    if build is None or not any(build.glob("*.so")):
        return None
    shutil.copytree(build, cache / "kernels" / build.name)
    monkeypatch.setenv("MLXLAB_KERNELS_CACHE", str(cache / "kernels"))
    return cache / "kernels" / build.name
