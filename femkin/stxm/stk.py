"""aXis2000 ``.stk`` binary stacks (big-endian).

Layout: three int32 ``nx, ny, ne``; float32 ``x (nx)``, ``y (ny)`` in micrometres, ``energies
(ne)`` in eV, ``dwell (ne)`` in milliseconds; then ``nx * ny * ne`` float32 values with x
varying fastest, then y, then energy, which is C order ``(E, Y, X)``. The file has no time stamp.
"""

from __future__ import annotations

import pathlib

import numpy as np

from femkin.errors import InputError
from femkin.stxm.stack import Stack, checked_stack

_MAX_DIM = 1 << 16


def read_stk(path: str | pathlib.Path) -> Stack:
    """Read an aXis2000 ``.stk`` stack.

    Raises:
        InputError: implausible dimensions or a file size that does not match them.
    """
    path = pathlib.Path(path)
    raw = path.read_bytes()
    if len(raw) < 12:
        raise InputError(
            path, "header", "12 bytes (nx, ny, ne as big-endian int32)", f"{len(raw)} bytes"
        )
    nx, ny, ne = (int(v) for v in np.frombuffer(raw, ">i4", 3))
    for name, n in (("nx", nx), ("ny", ny), ("ne", ne)):
        if not 0 < n < _MAX_DIM:
            raise InputError(path, name, f"a dimension in 1..{_MAX_DIM - 1} (big-endian int32)", n)
    n_axes = nx + ny + 2 * ne
    expected = 12 + 4 * (n_axes + nx * ny * ne)
    if len(raw) != expected:
        raise InputError(
            path,
            "size",
            f"{expected} bytes for nx={nx}, ny={ny}, ne={ne}",
            f"{len(raw)} bytes" + (" (truncated)" if len(raw) < expected else ""),
        )
    axes = np.frombuffer(raw, ">f4", n_axes, 12).astype(np.float64)
    x, y = axes[:nx], axes[nx : nx + ny]
    energies, dwell_ms = axes[nx + ny : nx + ny + ne], axes[nx + ny + ne :]
    counts = np.frombuffer(raw, ">f4", nx * ny * ne, 12 + 4 * n_axes).astype(np.float64)
    return checked_stack(
        Stack(
            energies=energies,
            x=x,
            y=y,
            counts=counts.reshape(ne, ny, nx),
            dwell=dwell_ms * 1e-3,
            timestamp=None,
            metadata={"format": "axis2000-stk"},
            source=str(path),
        )
    )


def write_stk(path: str | pathlib.Path, stack: Stack) -> None:
    """Write a stack as an aXis2000 ``.stk`` file (float32, big-endian)."""
    e, ny, nx = stack.counts.shape
    dwell_ms = np.where(np.isfinite(stack.dwell), stack.dwell * 1e3, 0.0)
    with open(path, "wb") as f:
        f.write(np.array([nx, ny, e], ">i4").tobytes())
        for arr in (stack.x, stack.y, stack.energies, dwell_ms, stack.counts.reshape(-1)):
            f.write(np.asarray(arr, ">f4").tobytes())
