"""Atomic writers of result files (JSON, CSV): a temporary file, then a rename.

What is written where is :mod:`femkin.report`'s business; these are its primitives (built on
:func:`femkin.io.atomic.atomic_write`, re-exported here).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from femkin.io.atomic import atomic_write

__all__ = ["atomic_write", "write_csv", "write_json"]


def write_csv(path: Path, columns: dict[str, np.ndarray]) -> None:
    """Write equal-length columns as a CSV with a header line, atomically."""
    names = list(columns)
    data = np.column_stack([columns[n] for n in names])
    atomic_write(
        path,
        lambda tmp: np.savetxt(
            tmp, data, delimiter=",", header=",".join(names), comments="", fmt="%.10g"
        ),
    )


def write_json(path: Path, obj) -> None:
    """Write ``obj`` as indented JSON, atomically."""

    def w(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)

    atomic_write(path, w)
