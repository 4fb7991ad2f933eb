"""The femkin exception hierarchy and how the command line reports an exception.

User-facing errors derive from :class:`FemkinError`; the CLI prints them as one line
(``femkin: error: ...``) and exits with code 2. :func:`describe` maps any exception to that line
and an exit code, looking through the chain of causes (an exception raised inside a PETSc
callback arrives as ``PETSc.Error`` or :class:`ConvergenceError` with the original as its cause):

=====  =======================================================================================
code   meaning
=====  =======================================================================================
2      a user error (:class:`FemkinError`) or an environment error (:class:`OSError`: a read-only
       directory, a full disk, a missing file; ``MemoryError``)
130    interrupted (Ctrl-C, SIGINT); 143: terminated (SIGTERM, e.g. a cluster's wall-time limit)
1      anything else: a bug (``--debug`` shows the traceback)
=====  =======================================================================================
"""

from __future__ import annotations

import difflib
import errno


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


class SystemDependencyError(FemkinError):
    """A system library, the C compiler or a writable folder that femkin needs is missing.

    The installation is at fault, not the data: the message names what is missing and how to
    install it (see :mod:`femkin.sysdeps`).
    """


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


class Interrupted(KeyboardInterrupt):
    """A signal that ends the run (SIGINT, SIGTERM); the CLI exits with 128 + ``signum``."""

    def __init__(self, signum: int = 2, name: str = "interrupted"):
        super().__init__(name)
        self.signum = signum
        self.name = name


def causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and its chain of causes (``__cause__``, else ``__context__``), outermost first."""
    chain, seen = [], set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        chain.append(cur)
        seen.add(id(cur))
        cur = cur.__cause__ if cur.__cause__ is not None else cur.__context__
    return chain


def describe(exc: BaseException) -> tuple[int, str]:
    """The exit code and the one-line message (without ``femkin: ``) of an exception.

    An interrupt anywhere in the chain wins; an exception raised inside a PETSc callback (the
    cause petsc4py attaches to its ``PETSc.Error``) is the real cause of whatever wraps it: a TAO
    failure caused by a full disk reports the disk, not TAO.
    """
    chain = causes(exc)
    for e in chain:
        if isinstance(e, KeyboardInterrupt):
            signum = getattr(e, "signum", 2)
            return 128 + signum, getattr(e, "name", "interrupted")
    for e in chain:
        if type(e).__module__.startswith("petsc4py") and e.__cause__ is not None:
            return describe(e.__cause__)
    top = chain[0]
    if isinstance(top, FemkinError):
        return 2, f"error: {_one_line(str(top))}"
    from femkin.sysdeps import diagnose  # a missing library or C compiler, not a bug

    if (problem := diagnose(top)) is not None:
        return 2, f"error: {_one_line(str(problem))}"
    for e in chain:
        if isinstance(e, OSError):
            return 2, f"error: {os_error_message(e)}"
        if isinstance(e, MemoryError):
            return 2, "error: out of memory (MemoryError); use more ranks or a coarser mesh"
    return 1, (
        f"internal error: {type(top).__name__}: {_one_line(str(top))} "
        "(a bug in femkin: rerun with --debug for the traceback and report it)"
    )


def os_error_message(err: OSError) -> str:
    """One line naming the file and the operating system's reason, e.g. a full disk."""
    where = err.filename if err.filename is not None else None
    reason = err.strerror or str(err) or type(err).__name__
    code = errno.errorcode.get(err.errno, "") if err.errno is not None else ""
    hint = {
        errno.ENOSPC: " (the disk is full: free space and rerun; checkpoints are kept)",
        errno.EDQUOT: " (disk quota exceeded: free space and rerun; checkpoints are kept)",
        errno.EROFS: " (a read-only file system: copy the case to a writable place)",
        errno.EACCES: " (no permission: make the case directory writable)",
    }.get(err.errno or 0, "")
    text = f"{reason}" + (f" [{code}]" if code else "") + hint
    return _one_line(f"{where}: {text}" if where else text)


def _one_line(text: str) -> str:
    return " ".join(text.split())
