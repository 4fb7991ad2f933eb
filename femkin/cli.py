"""The ``femkin`` command line.

Each verb lives in ``femkin/commands/<verb>.py`` and defines ``register(subparsers)``, which adds
its parser and sets ``func`` to a callable taking the parsed arguments.

Every exception ends the run with one line on stderr and an exit code
(:func:`femkin.errors.describe`): 2 for user and environment errors, 130 for Ctrl-C, 143 for
SIGTERM, 1 for bugs; ``--debug`` prints the traceback first.

Under MPI a rank that fails waits up to :data:`MPI_ERROR_WAIT` seconds (environment variable
``FEMKIN_MPI_ERROR_WAIT``) for the other ranks to fail too (a user error found collectively);
then rank 0 prints the line and every rank exits with the code. If they do not (an error on one
rank only, while the others wait in a collective call), the failing rank prints the line and
calls ``MPI_Abort``, which ends the whole job: an error never leaves a job hanging.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import time
import traceback

#: Seconds a failing rank waits for the others before it aborts the job (FEMKIN_MPI_ERROR_WAIT).
MPI_ERROR_WAIT = 3.0

# Order is the order shown by ``femkin --help``.
VERBS = (
    "init",
    "prepare",
    "mesh",
    "simulate",
    "verify",
    "invert",
    "uq",
    "sample",
    "run",
    "compare",
)


def build_parser() -> argparse.ArgumentParser:
    """Return the top-level parser with one subparser per verb."""
    parser = argparse.ArgumentParser(
        prog="femkin",
        description="Learn reaction kinetics of battery particles from STXM videos "
        "(ACR phase-field model, DOLFINx, adjoints, PETSc TAO, Laplace posteriors).",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True
    for verb in VERBS:
        try:
            module = importlib.import_module(f"femkin.commands.{verb}")
        except ModuleNotFoundError as err:
            if err.name != f"femkin.commands.{verb}":
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``femkin`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    # PETSc options (-femkin_tao_type bnls ...) pass through to PETSc untouched.
    args, extra = parser.parse_known_args(argv)
    petsc_args = [a for a in extra if a.startswith("-") and not a.startswith("--")]
    unknown = [a for a in extra if a not in petsc_args and not _is_petsc_value(a, extra)]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.petsc_options = extra
    from femkin._fem import MPI  # PETSc first: its signal handlers are replaced below

    world = MPI.COMM_WORLD
    errors = world.Dup() if world.size > 1 else None
    _install_signal_handlers()
    try:
        set_petsc_options(extra)
        rc = args.func(args)
    except SystemExit:
        raise
    except BaseException as err:  # noqa: BLE001 - every failure ends with one line and a code
        rc = _failed(err, world, errors, debug=args.debug)  # returns when every rank failed
    if errors is not None:
        errors.Free()  # collective: every rank is here (or the job was aborted)
    return int(rc or 0)


def _install_signal_handlers() -> None:
    """SIGTERM (a scheduler's wall-time kill) ends the run like Ctrl-C does."""
    from femkin.errors import Interrupted

    def terminated(signum, frame):
        raise Interrupted(signum, "terminated")

    def interrupted(signum, frame):
        raise Interrupted(signum, "interrupted")

    signal.signal(signal.SIGTERM, terminated)
    signal.signal(signal.SIGINT, interrupted)


def _failed(err: BaseException, world, errors, *, debug: bool) -> int:
    """Report a failure and return its exit code; end all ranks if it is not collective."""
    from femkin.errors import describe

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the report
    code, message = describe(err)
    if debug:
        traceback.print_exception(err, file=sys.stderr)
    if errors is None:
        print(f"femkin: {message}", file=sys.stderr, flush=True)
        return code
    if _all_failed(errors, float(os.environ.get("FEMKIN_MPI_ERROR_WAIT", MPI_ERROR_WAIT))):
        reports = errors.allgather((code, message))
        code, message = min(reports, key=lambda r: (r[0] < 128, r[0] != 2))
        if world.rank == 0:
            print(f"femkin: {message}", file=sys.stderr, flush=True)
        return code
    print(
        f"femkin: {message} [rank {world.rank} of {world.size}; ending all ranks]",
        file=sys.stderr,
        flush=True,
    )
    sys.stdout.flush()
    world.Abort(code)
    return code  # pragma: no cover - Abort does not return


def _all_failed(errors, wait: float) -> bool:
    """True when every rank reaches this point within ``wait`` seconds (a collective error).

    A non-blocking barrier on the dedicated error communicator: ranks still busy in their own
    collective calls are not disturbed, and nothing blocks.
    """
    request = errors.Ibarrier()
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if request.Test():
            return True
        time.sleep(0.01)
    return bool(request.Test())


def set_petsc_options(argv: list[str]) -> None:
    """Put command-line PETSc options into the PETSc options database.

    ``-femkin_tao_monitor``, ``-femkin_tao_type bnls``: every solver's ``setFromOptions``
    reads them there.
    """
    if not argv:
        return
    from femkin._fem import PETSc

    opts = PETSc.Options()
    i = 0
    while i < len(argv):
        key = argv[i].lstrip("-")
        if i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            opts[key] = argv[i + 1]
            i += 2
        else:
            opts[key] = ""
            i += 1


def _is_petsc_value(arg: str, extra: list[str]) -> bool:
    i = extra.index(arg)
    return i > 0 and extra[i - 1].startswith("-") and not extra[i - 1].startswith("--")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
