"""The raw STXM stack: one object for every file format.

A :class:`Stack` holds one energy stack (or a single image, ``E = 1``) as recorded: transmitted
counts ``(E, Y, X)``, the photon energies, the scan axes in micrometres and the dwell per energy.
The format readers (:mod:`~femkin.stxm.als`, :mod:`~femkin.stxm.stk`, :mod:`~femkin.stxm.nexus`)
build it; :func:`femkin.stxm.readers.read_stack` dispatches between them, so this module imports
none of them.
"""

from __future__ import annotations

import datetime
from typing import Any, NamedTuple

import numpy as np

from femkin.errors import InputError


class Stack(NamedTuple):
    """One STXM energy stack as read from disk.

    Attributes:
        energies: ``(E,)`` photon energies in eV.
        x: ``(X,)`` sample x positions in micrometres (columns of ``counts``).
        y: ``(Y,)`` sample y positions in micrometres (rows of ``counts``).
        counts: ``(E, Y, X)`` float64 transmitted intensity (counts or count rate).
        dwell: ``(E,)`` dwell time per pixel in seconds (NaN where the file does not say).
        timestamp: start time of the scan, or ``None`` when the file has none.
        metadata: format-specific extras (layout, scan type, channel, per-image times, ...).
        source: the path it was read from.
    """

    energies: np.ndarray
    x: np.ndarray
    y: np.ndarray
    counts: np.ndarray
    dwell: np.ndarray
    timestamp: datetime.datetime | None
    metadata: dict[str, Any]
    source: str

    @property
    def pixel_size(self) -> float:
        """Mean |step| of the x axis in micrometres (NaN for a single column)."""
        return float(np.mean(np.abs(np.diff(self.x)))) if self.x.size > 1 else float("nan")


HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def checked_stack(stack: Stack) -> Stack:
    """Validate shapes and values of a freshly read stack; raise InputError on mismatch."""
    e, y, x = stack.energies.size, stack.y.size, stack.x.size
    if stack.counts.ndim != 3:
        raise InputError(stack.source, "counts", "a 3-d (E, Y, X) array", f"{stack.counts.ndim}-d")
    if stack.counts.shape != (e, y, x):
        raise InputError(
            stack.source,
            "counts",
            f"shape (E, Y, X) = {(e, y, x)} from the axes",
            f"{stack.counts.shape}",
        )
    if stack.dwell.shape != (e,):
        raise InputError(stack.source, "dwell", f"{e} values (one per energy)", stack.dwell.size)
    for name, axis in (("energies", stack.energies), ("x", stack.x), ("y", stack.y)):
        if not np.all(np.isfinite(axis)):
            raise InputError(stack.source, name, "finite values", axis)
    if e == 0 or x == 0 or y == 0:
        raise InputError(stack.source, "counts", "a non-empty image", stack.counts.shape)
    return stack
