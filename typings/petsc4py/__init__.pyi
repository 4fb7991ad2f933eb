# Read by mypy instead of the package's own stubs (see [tool.mypy] in pyproject.toml): those
# stubs type parts of the API narrower than it behaves (``Options`` item assignment, reasons
# returned as ints, mpi4py communicators accepted), so calls into it are left unchecked.
from typing import Any

def __getattr__(name: str) -> Any: ...
