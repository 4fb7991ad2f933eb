"""Atomic checkpoints of an inversion, for ``--resume``.

A checkpoint is one ``.npz`` file: the parameter blocks from
:meth:`~femkin.parameters.ParameterSpace.to_global_dict` (partition independent, so a run on
N ranks resumes on M), and a JSON ``state``: everything that decides the optimiser's next step
(iteration counter, history, ``|g_0|`` of the forcing term, counters, the frozen step
schedules), the :func:`fingerprint` of the inputs the fit belongs to and its ``case_hash``.
Rank 0 writes a temporary file, flushes it to disk and renames it over ``path``
(:func:`femkin.io.atomic.atomic_write`), so a crash at any moment
leaves the previous checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import zipfile
from typing import Any

import numpy as np

from femkin._fem import PETSc
from femkin.errors import InputError, raise_on_every_rank, run_on_root
from femkin.io.atomic import atomic_write
from femkin.parameters import ParameterSpace

_STATE = "__state__"

#: Case sections / keys that change the inverse problem, as fingerprint parts.
_PROBLEM_KEYS = {
    "[mesh]": ("mesh", None),
    "[model]": ("model", None),
    "[solver]": ("solver", None),
    "[driving]": ("driving", None),
    "[data] sigma": ("data", "sigma"),
    "[inversion] learn": ("inversion", "learn"),
    "[inversion] hessian": ("inversion", "hessian"),
    "[inversion] method": ("inversion", "method"),
    "[inversion.prior]": ("inversion", "prior"),
}

#: Environment variable of the kill/resume tests: exit hard (as SIGKILL would) right after
#: the checkpoint of this iteration is on disk.
EXIT_AFTER_CHECKPOINT = "FEMKIN_TEST_EXIT_AFTER_CHECKPOINT"


def _digest(obj) -> str:
    h = hashlib.sha256()
    if isinstance(obj, np.ndarray):
        h.update(str((obj.dtype.str, obj.shape)).encode())
        h.update(np.ascontiguousarray(obj).tobytes())
    else:
        h.update(json.dumps(obj, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def fingerprint(case, video) -> dict[str, str]:
    """Hashes of the inputs a fit depends on.

    The video's arrays and the case keys that change the problem; not budgets or tolerances,
    which a resumed run may change.

    Args:
        case: the :class:`~femkin.case.Case`.
        video: the :class:`~femkin.io.video.Video` fitted.
    """
    parts = {
        "video": _digest(
            [
                _digest(np.asarray(video.c, dtype=float)),
                _digest(np.asarray(video.mask)),
                _digest(np.asarray(video.t, dtype=float)),
                float(video.pixel_size),
                None if video.mu_e is None else _digest(np.asarray(video.mu_e, dtype=float)),
                None if video.sigma is None else _digest(np.asarray(video.sigma, dtype=float)),
            ]
        )
    }
    for name, (section, key) in _PROBLEM_KEYS.items():
        table = getattr(case, section)
        parts[name] = _digest(table if key is None else table.get(key))
    if case.data.get("psf_fwhm") is not None:  # absent: the fingerprints of older runs hold
        parts["[data] psf_fwhm"] = _digest(case.data["psf_fwhm"])
    return parts


def fingerprint_changes(saved: dict | None, current: dict[str, str]) -> list[str]:
    """The names of the fingerprint parts that differ (all of them when none was saved)."""
    if not isinstance(saved, dict):
        return list(current)
    return [name for name in current if saved.get(name) != current[name]]


def peek_state(path, comm) -> dict | None:
    """The JSON state of a checkpoint without loading its vectors (``None`` when absent).

    Collective: rank 0 reads, every rank gets the state or raises the same error.
    """
    path = pathlib.Path(path)
    result: tuple[str, Any] | None = None
    if comm.rank == 0:
        if not path.exists():
            result = ("absent", None)
        else:
            try:
                with np.load(path) as data:
                    result = ("ok", json.loads(str(data[_STATE])))
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
                result = ("error", f"{type(exc).__name__}: {exc}")
    kind, info = comm.bcast(result, root=0)
    if kind == "error":
        raise InputError(path, None, "a femkin checkpoint (.npz)", info)
    return info if kind == "ok" else None


def exit_after_checkpoint_hook(iteration: int, comm) -> None:
    """Test hook: end the process hard after checkpoint ``iteration``.

    See :data:`EXIT_AFTER_CHECKPOINT`; every rank exits, leaving only what a SIGKILL would.
    """
    target = os.environ.get(EXIT_AFTER_CHECKPOINT)
    if target is not None and int(target) == iteration:
        comm.barrier()
        os._exit(137)


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
        bad = [k for k, v in blocks.items() if not np.all(np.isfinite(v))]
        if bad:
            raise InputError(path, bad[0], "finite parameter values", "NaN/Inf")
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
