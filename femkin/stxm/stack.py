"""The raw STXM stack: one object for every file format, and the reader that dispatches on it.

A :class:`Stack` holds one energy stack (or a single image, ``E = 1``) as recorded: transmitted
counts ``(E, Y, X)``, the photon energies, the scan axes in micrometres and the dwell per energy.
``read_stack`` picks the reader from the suffix (``.hdr``, ``.stk``, ``.h5/.hdf5/.nxs``) and, for
unknown suffixes, from the first bytes of the file (HDF5 signature).
"""

from __future__ import annotations

import datetime
import pathlib
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


def read_stack(path: str | pathlib.Path, **kwargs: Any) -> Stack:
    """Read a STXM stack or image from any supported format.

    Args:
        path: an ALS ``.hdr`` header (its ``.xim`` files next to it), a NeXus NXstxm HDF5 file
            (``.h5``, ``.hdf5``, ``.nxs``, ``.hdf``) or an aXis2000 ``.stk`` file.
        **kwargs: passed to the format reader (``channel`` for ``.hdr``, ``entry`` for NeXus).

    Returns:
        The stack, counts ``(E, Y, X)``.

    Raises:
        InputError: missing, unsupported, corrupt, truncated or inconsistent file.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise InputError(path, None, "an existing STXM file", "no such file")
    suffix = path.suffix.lower()
    if suffix == ".hdr":
        from femkin.stxm.als import read_hdr_stack

        return read_hdr_stack(path, **kwargs)
    if suffix == ".stk":
        from femkin.stxm.stk import read_stk

        return read_stk(path, **kwargs)
    with open(path, "rb") as f:
        head = f.read(8)
    if suffix in (".h5", ".hdf5", ".nxs", ".hdf", ".nx5") or head == HDF5_SIGNATURE:
        from femkin.stxm.nexus import read_nexus

        return read_nexus(path, **kwargs)
    raise InputError(
        path,
        None,
        "a .hdr (ALS), .stk (aXis2000) or NeXus NXstxm (.h5/.hdf5/.nxs) file",
        f"suffix '{path.suffix}'",
    )
