"""The femkin exception hierarchy.

User-facing errors derive from :class:`FemkinError`; the CLI prints them as one line
(``femkin: error: ...``) and exits with code 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib


class FemkinError(Exception):
    """Base class of every error that is the user's to fix (bad input, bad case file)."""


class InputError(FemkinError):
    """Bad input data: a file, a field, a shape or a value that is not what was expected.

    The message names the file, the field, what was expected and what was found.
    """

    def __init__(self, file: object, field: str | None, expected: str, found: object):
        self.file = str(file)
        self.field = field
        self.expected = expected
        self.found = found
        where = f"{self.file}" + (f": field '{field}'" if field else "")
        super().__init__(f"{where}: expected {expected}, found {found}")


class CaseError(InputError):
    """A bad case file: unknown key, wrong type, missing key."""


class ConvergenceError(FemkinError):
    """A solver (Newton, TAO, eigensolver) did not converge."""


def raise_on_every_rank(comm, error: FemkinError | None, *, root: int = 0) -> None:
    """Raise ``root``'s user error on every rank of ``comm``; return if it had none.

    Collective: every rank calls it, with the error rank ``root`` caught (``None`` on the other
    ranks, or when ``root`` succeeded). The error travels by its fields, so every rank raises
    the same type with the same one-line message, and no rank is left waiting in a later
    collective call (DOLFINx's ``io/gmsh.py`` rule).
    """
    packed: tuple[type[FemkinError], tuple] | None = None
    if comm.rank == root and error is not None:
        if isinstance(error, InputError):
            packed = (type(error), (error.file, error.field, error.expected, error.found))
        else:
            packed = (type(error), (str(error),))
    packed = comm.bcast(packed, root=root)
    if packed is None:
        return
    if comm.rank == root and error is not None:
        raise error
    cls, args = packed
    raise cls(*args)


def run_on_root(comm, func, *args, root: int = 0, **kwargs):
    """Run ``func(*args, **kwargs)`` on rank ``root`` only; its user error is raised everywhere.

    Returns:
        ``func``'s result on ``root``, ``None`` on the other ranks.
    """
    result, error = None, None
    if comm.rank == root:
        try:
            result = func(*args, **kwargs)
        except FemkinError as err:
            error = err
    raise_on_every_rank(comm, error, root=root)
    return result


def close_match_hint(name: str, choices) -> str:
    """Return ``" (did you mean 'x'?)"`` for the closest of ``choices``, or ``""``."""
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""
