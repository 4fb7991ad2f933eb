"""Atomic writers of result files (JSON, CSV): a temporary file, then a rename.

What is written where is :mod:`femkin.report`'s business; these are its primitives.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np


def atomic_write(path: Path, writer) -> None:
    """Call ``writer(tmp_path)`` then rename onto ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    writer(tmp)
    os.replace(tmp, path)


def write_csv(path: Path, columns: dict[str, np.ndarray]) -> None:
    names = list(columns)
    data = np.column_stack([columns[n] for n in names])
    atomic_write(
        path,
        lambda tmp: np.savetxt(
            tmp, data, delimiter=",", header=",".join(names), comments="", fmt="%.10g"
        ),
    )


def write_json(path: Path, obj) -> None:
    def w(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)

    atomic_write(path, w)
