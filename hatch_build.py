"""Build hook: compile mlxlab's fused CPU kernels while pip installs mlxlab, so that the first
`mlxlab-train` on a new machine does not wait ~20 s for the build.

It runs in pip's isolated build environment, which holds the same MLX and nanobind releases that
the install resolves (build-system.requires mirrors the runtime pins), and writes into the
kernel cache (one build per ISA level) that mlxlab.kernels.build reads (~/.cache/mlxlab/kernels, or
$MLXLAB_KERNELS_CACHE; src/mlxlab/runtime/settings.py reads the environment, here as at run
time). When the build environment's MLX differs from the installed one (an older MLX already in
the environment), the cache key differs and the first run builds as before.
Nothing here can fail an install: any problem is one printed line, and the kernels build on first
use instead. MLXLAB_SKIP_KERNEL_BUILD=1 skips it (e.g. for a wheel built on another machine).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


class KernelPrebuildHook(BuildHookInterface):
    PLUGIN_NAME = "mlxlab-kernels"

    def initialize(self, version: str, build_data: dict) -> None:
        if self.target_name != "wheel":
            return
        try:
            # mlxlab is not importable here: its environment settings and the kernel build are
            # files that import nothing of it, loaded on their own.
            source = Path(self.root) / "src" / "mlxlab"
            settings = _load("_mlxlab_settings", source / "runtime" / "settings.py").read()
            if settings.skip_kernel_build:  # MLXLAB_SKIP_KERNEL_BUILD=1
                return
            build = _load("_mlxlab_kernel_build", source / "kernels" / "build.py")
            cpu = _load("_mlxlab_cpu", source / "runtime" / "compute" / "cpu.py")
            level = cpu.isa_level()  # the fixed level the kernels are built for (None: below it)
            if level is None:
                print(f"mlxlab: fused CPU kernels not built ({cpu.below_level_reason()}); MLX's "
                      "own ops run instead", file=sys.stderr)
            elif build.unsupported_reason() is None:
                built = build.build(settings.kernels_cache, level, print, rpath=False)
                print(f"mlxlab: fused CPU kernels ready in {built}", file=sys.stderr)
        except Exception as exc:  # noqa: BLE001  (never fail an install over an optional speed-up)
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            print(f"mlxlab: fused CPU kernels not prebuilt ({first}); they build on first use",
                  file=sys.stderr)


def _load(name: str, path: Path) -> ModuleType:
    """The module in the file `path`, loaded under `name` (registered first: dataclasses look
    their module up while the class is made)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
