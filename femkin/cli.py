"""The ``femkin`` command line.

Each verb lives in ``femkin/commands/<verb>.py`` and defines ``register(subparsers)``, which adds
its parser and sets ``func`` to a callable taking the parsed arguments. User errors
(:class:`femkin.errors.FemkinError`) print one line and exit with code 2; ``--debug`` keeps the
traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Order is the order shown by ``femkin --help``.
VERBS = ("prepare", "mesh", "simulate", "verify", "invert", "uq", "sample", "run")


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
    from femkin.errors import FemkinError

    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    # PETSc options (-femkin_tao_type bnls ...) pass through to PETSc untouched.
    args, extra = parser.parse_known_args(argv)
    petsc_args = [a for a in extra if a.startswith("-") and not a.startswith("--")]
    unknown = [a for a in extra if a not in petsc_args and not _is_petsc_value(a, extra)]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.petsc_options = extra
    try:
        set_petsc_options(extra)
        rc = args.func(args)
    except FemkinError as err:
        if args.debug:
            raise
        print(f"femkin: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # pragma: no cover
        print("femkin: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


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
