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


class SystemDependencyError(FemkinError):
    """A system library, the C compiler or a writable folder that femkin needs is missing.

    The installation is at fault, not the data: the message names what is missing and how to
    install it (see :mod:`femkin.sysdeps`).
    """


class ConvergenceError(FemkinError):
    """A solver (Newton, TAO, eigensolver) did not converge."""


def close_match_hint(name: str, choices) -> str:
    """Return ``" (did you mean 'x'?)"`` for the closest of ``choices``, or ``""``."""
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""
