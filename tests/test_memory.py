"""runtime/memory/allocator.py: with freed memory kept in the heap, a loop that allocates and frees the
same large arrays (what every training step does) stops faulting pages in; MLXLAB_MALLOC=default
leaves glibc as it is."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="the setting is glibc's",
)

# Steps of 64 MB of intermediates (logits-sized arrays and larger), page faults counted after
# two warm-up steps.
SNIPPET = """
import resource
import mlx.core as mx
from mlxlab.runtime.memory.allocator import keep_freed_memory
kept = keep_freed_memory()
x = mx.random.normal((2048, 4096))
def step():
    y = mx.exp(x) * 2
    z = (y + x).sum()
    mx.eval(z)
for _ in range(2):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(kept, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 5)
"""


def faults_per_step(malloc: str) -> tuple[str, int]:
    env = {**os.environ, "MLXLAB_MALLOC": malloc}
    out = subprocess.run([sys.executable, "-c", SNIPPET], env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    return out[0], int(out[1])


def test_kept_memory_stops_the_page_faults_of_repeated_steps():
    kept, faults = faults_per_step("keep")
    default, default_faults = faults_per_step("default")
    assert (kept, default) == ("True", "False")
    assert default_faults > 5000  # glibc unmaps the 32 MB blocks: ~16k fresh pages a step
    assert faults < default_faults / 20
