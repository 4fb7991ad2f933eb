"""Run the femkin CLI with a fault injected on one rank (used by the robustness tests).

``python tests/robustness/inject.py RANK TARGET KIND -- femkin arguments...`` replaces the
function ``TARGET`` (``module:attribute``) on rank ``RANK`` (``all`` for every rank) by one that
raises ``KIND``: ``IndexError``, ``ENOSPC`` (OSError: no space left on device), ``EROFS``,
``interrupt`` (SIGINT to this process) or ``hang`` (sleeps, as a rank stuck in a computation).
The other ranks run the real code, so a fault on one rank tests that the job still ends.
"""

from __future__ import annotations

import errno
import importlib
import os
import signal
import sys
import time


def _fault(kind: str, target: str):
    def fail(*args, **kwargs):
        if kind == "IndexError":
            raise IndexError(f"injected fault in {target}")
        if kind in ("ENOSPC", "EROFS"):
            code = getattr(errno, kind)
            raise OSError(code, os.strerror(code), f"<injected {target}>")
        if kind == "interrupt":
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        if kind == "hang":
            time.sleep(3600)
        raise ValueError(f"unknown fault kind {kind}")

    return fail


def main() -> int:
    rank_spec, target, kind = sys.argv[1:4]
    argv = sys.argv[sys.argv.index("--") + 1 :]
    from femkin._fem import MPI

    if rank_spec == "all" or int(rank_spec) == MPI.COMM_WORLD.rank:
        module_name, path = target.split(":")
        owner = importlib.import_module(module_name)
        *parents, attr = path.split(".")
        for name in parents:
            owner = getattr(owner, name)
        setattr(owner, attr, _fault(kind, target))
    from femkin.cli import main as femkin_main

    return femkin_main(argv)


if __name__ == "__main__":
    sys.exit(main())
