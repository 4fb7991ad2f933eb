"""Fill the image's DOLFINx JIT cache at build time by running ``cases/stacks`` once.

Run by ``docker/Dockerfile`` with ``XDG_CACHE_HOME`` pointing at the image's cache. The case runs
in a temporary copy (nothing is left in the source tree); it compiles the meshing, forward,
adjoint, Hessian and posterior-sampling forms of that case's model, so a first run of a case
with the same model settings starts without compiling, also where the image is read-only
(Apptainer). Other model settings (another number of mu_h or j0 coefficients) compile on first
use into the same cache, which is writable by every user of the container.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    """Run the case in a temporary copy; the forms land in the JIT cache."""
    with tempfile.TemporaryDirectory(prefix="femkin-precompile-") as tmp:
        case = Path(tmp) / "stacks"
        shutil.copytree(ROOT / "cases" / "stacks", case, ignore=shutil.ignore_patterns("data"))
        start = time.perf_counter()
        subprocess.run(["femkin", "run", str(case), "--quiet"], check=True)
        print(f"precompiled the forms of cases/stacks in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
