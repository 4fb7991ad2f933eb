"""Atomic checkpoints of an inversion, for ``--resume``.

A checkpoint is one ``.npz`` file: the parameter blocks from
:meth:`~femkin.parameters.ParameterSpace.to_global_dict` (partition independent, so a run on
N ranks resumes on M), and a JSON ``state`` (iteration, objective history, TAO settings, ...)
with the ``case_hash`` of the case inputs. Rank 0 writes a temporary file, flushes it to disk
and renames it over ``path`` (:func:`femkin.io.atomic.atomic_write`), so a crash at any moment
leaves the previous checkpoint.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import numpy as np

from femkin._fem import PETSc
from femkin.errors import InputError, raise_on_every_rank, run_on_root
from femkin.io.atomic import atomic_write
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
            arrays: dict[str, Any] = {_STATE: np.array(payload), **(blocks or {})}

            def savez(tmp):
                with open(tmp, "wb") as f:
                    np.savez(f, **arrays)

            atomic_write(path, savez, durable=True)
        except (OSError, TypeError, ValueError) as exc:
            error = InputError(
                path,
                None,
                "a writable checkpoint with a JSON-serialisable state",
                f"{type(exc).__name__}: {exc}",
            )
    raise_on_every_rank(space.comm, error)


def read_checkpoint(
    path, space: ParameterSpace, x: PETSc.Vec, case_hash: str | None = None
) -> dict | None:
    """Load a checkpoint into ``x`` (any number of ranks) and return its state.

    Returns ``None`` (on every rank) when ``path`` does not exist.

    Raises:
        InputError: unreadable file, or its ``case_hash`` differs from ``case_hash``.
    """
    path = pathlib.Path(path)

    def load() -> tuple[dict, dict] | None:
        if not path.exists():
            return None
        try:
            with np.load(path) as data:
                state = json.loads(str(data[_STATE]))
                blocks = {k: data[k] for k in data.files if k != _STATE}
        except Exception as exc:  # noqa: BLE001 - zipfile, pickle, JSON: all unreadable
            raise InputError(
                path, None, "a femkin checkpoint (.npz)", f"{type(exc).__name__}: {exc}"
            ) from None
        found = state.get("case_hash")
        if case_hash is not None and found != case_hash:
            raise InputError(
                path,
                "case_hash",
                f"a checkpoint of the current case settings (hash {case_hash})",
                f"one written with other settings (hash {found}); remove it or run "
                "without --resume",
            )
        return state, blocks

    loaded = run_on_root(space.comm, load)
    state = space.comm.bcast(None if loaded is None else loaded[0], root=0)
    if state is None:
        return None
    space.from_global_dict(None if loaded is None else loaded[1], x, source=str(path))
    return state
