"""Atomic checkpoints of an inversion, for ``--resume``.

A checkpoint is one ``.npz`` file: the parameter blocks from
:meth:`~femkin.parameters.ParameterSpace.to_global_dict` (partition independent, so a run on
N ranks resumes on M), and a JSON ``state`` (iteration, objective history, TAO settings, ...)
with the ``case_hash`` of the case inputs. Rank 0 writes ``path.tmp`` and renames it over
``path`` (``os.replace`` is atomic), so a crash at any moment leaves the previous checkpoint.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import numpy as np

from femkin._fem import PETSc
from femkin.errors import InputError
from femkin.parameters import ParameterSpace

_STATE = "__state__"


def write_checkpoint(path, space: ParameterSpace, x: PETSc.Vec, state: dict) -> None:
    """Write ``x`` and ``state`` (JSON-serialisable, with ``case_hash``) atomically.

    Collective on ``space.comm``; rank 0 writes.
    """
    path = pathlib.Path(path)
    blocks = space.to_global_dict(x)
    error = None
    if space.comm.rank == 0:
        try:
            payload = json.dumps(state)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            with open(tmp, "wb") as f:
                arrays: dict[str, Any] = {_STATE: np.array(payload), **(blocks or {})}
                np.savez(f, **arrays)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except (OSError, TypeError, ValueError) as exc:
            error = f"{type(exc).__name__}: {exc}"
    error = space.comm.bcast(error, root=0)
    if error is not None:
        raise InputError(path, None, "a writable checkpoint with a JSON-serialisable state", error)


def read_checkpoint(
    path, space: ParameterSpace, x: PETSc.Vec, case_hash: str | None = None
) -> dict | None:
    """Load a checkpoint into ``x`` (any number of ranks) and return its state.

    Returns ``None`` (on every rank) when ``path`` does not exist.

    Raises:
        InputError: unreadable file, or its ``case_hash`` differs from ``case_hash``.
    """
    path = pathlib.Path(path)
    result: tuple[str, Any, dict | None] | None = None
    if space.comm.rank == 0:
        if not path.exists():
            result = ("absent", None, None)
        else:
            try:
                with np.load(path) as data:
                    state = json.loads(str(data[_STATE]))
                    blocks = {k: data[k] for k in data.files if k != _STATE}
                found = state.get("case_hash")
                if case_hash is not None and found != case_hash:
                    result = (
                        "error",
                        (
                            "case_hash",
                            f"a checkpoint of the current case settings (hash {case_hash})",
                            f"one written with other "
                            f"settings (hash {found}); remove it or run "
                            "without --resume",
                        ),
                        None,
                    )
                else:
                    result = ("ok", state, blocks)
            except (OSError, ValueError, KeyError) as exc:
                result = (
                    "error",
                    (None, "a femkin checkpoint (.npz)", f"{type(exc).__name__}: {exc}"),
                    None,
                )
    kind, info = space.comm.bcast(result[:2] if result else None, root=0)
    if kind == "absent":
        return None
    if kind == "error":
        raise InputError(path, *info)
    space.from_global_dict(result[2] if result is not None else None, x, source=str(path))
    return info
