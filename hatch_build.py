"""Build hook: compile mlxlab's fused CPU kernels while pip installs mlxlab, so that the first
`mlxlab-train` on a new machine does not wait ~20 s for the build (issue 24).

It runs in pip's isolated build environment, which holds the same MLX and nanobind releases that
the install resolves (build-system.requires mirrors the runtime pins), and writes into the
per-machine kernel cache that mlxlab.kernels.build reads (~/.cache/mlxlab/kernels, or
$MLXLAB_KERNELS_CACHE). When the build environment's MLX differs from the installed one (an
older MLX already in the environment), the cache key differs and the first run builds as before.
Nothing here can fail an install: any problem is one printed line, and the kernels build on first
use instead. MLXLAB_SKIP_KERNEL_BUILD=1 skips it (e.g. for a wheel built on another machine).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


class KernelPrebuildHook(BuildHookInterface):
    PLUGIN_NAME = "mlxlab-kernels"

    def initialize(self, version: str, build_data: dict) -> None:
        if self.target_name != "wheel" or os.environ.get("MLXLAB_SKIP_KERNEL_BUILD") == "1":
            return
        try:
            path = Path(self.root) / "src" / "mlxlab" / "kernels" / "build.py"
            spec = importlib.util.spec_from_file_location("_mlxlab_kernel_build", path)
            build = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(build)
            if build.unsupported_reason() is None:
                print(f"mlxlab: fused CPU kernels ready in {build.build(print, rpath=False)}", file=sys.stderr)
        except Exception as exc:  # noqa: BLE001  (never fail an install over an optional speed-up)
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            print(f"mlxlab: fused CPU kernels not prebuilt ({first}); they build on first use",
                  file=sys.stderr)
