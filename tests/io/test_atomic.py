"""Atomic writes leave the old file (or none) when the writer fails, and no temporary file."""

from __future__ import annotations

import pytest

from femkin.io.atomic import atomic_write


@pytest.mark.parametrize("durable", [False, True])
def test_atomic_write(tmp_path, durable):
    path = tmp_path / "out.txt"
    assert atomic_write(path, lambda tmp: tmp.write_text("one"), durable=durable) == path
    assert path.read_text() == "one"

    def half(tmp):
        tmp.write_text("half a fi")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half, durable=durable)
    assert path.read_text() == "one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]
    atomic_write(path, lambda tmp: tmp.write_text("two"))
    assert path.read_text() == "two"
