"""`python -m mlxlab.kernels build`: compile the fused CPU kernels now (e.g. in a Docker image)
and print where they are; `python -m mlxlab.kernels status`: say whether they load here."""

from __future__ import annotations

import argparse
import logging
import sys

from mlxlab import kernels
from mlxlab.kernels.build import KernelBuildError, build
from mlxlab.runtime import settings


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m mlxlab.kernels", description=__doc__)
    parser.add_argument("command", choices=["build", "status"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "build":
        try:
            print(build(settings.current().kernels_cache, kernels.isa_level(),
                        logging.getLogger("mlxlab.kernels").info))
        except KernelBuildError as exc:
            print(f"mlxlab.kernels: build failed: {exc}", file=sys.stderr)
            return 1
        return 0
    print(kernels.status())
    return 0


if __name__ == "__main__":
    sys.exit(main())
