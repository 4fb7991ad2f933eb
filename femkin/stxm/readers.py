"""``read_stack``: the STXM reader that picks the format.

The format comes from the suffix (``.hdr``, ``.stk``, ``.h5/.hdf5/.nxs``) and, for unknown
suffixes, from the first bytes of the file (HDF5 signature). Kept apart from
:mod:`femkin.stxm.stack`, which the format readers import, so that imports point one way.
"""

from __future__ import annotations

import pathlib
from typing import Any

from femkin.errors import InputError
from femkin.stxm.als import read_hdr_stack
from femkin.stxm.nexus import read_nexus
from femkin.stxm.stack import HDF5_SIGNATURE, Stack
from femkin.stxm.stk import read_stk


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
        return read_hdr_stack(path, **kwargs)
    if suffix == ".stk":
        return read_stk(path, **kwargs)
    with open(path, "rb") as f:
        head = f.read(8)
    if suffix in (".h5", ".hdf5", ".nxs", ".hdf", ".nx5") or head == HDF5_SIGNATURE:
        return read_nexus(path, **kwargs)
    raise InputError(
        path,
        None,
        "a .hdr (ALS), .stk (aXis2000) or NeXus NXstxm (.h5/.hdf5/.nxs) file",
        f"suffix '{path.suffix}'",
    )
