"""Checkpoint round trips, crash safety and resuming on another number of ranks."""

from __future__ import annotations

import pytest

from femkin._fem import MPI
from femkin.errors import InputError
from femkin.inversion.checkpoint import read_checkpoint, write_checkpoint

from .toy import ToyProblem


def make_space(comm):
    return ToyProblem(comm, 6).space, None


STATE = {"iteration": 7, "history": [3.0, 2.0, 1.5], "tao": {"type": "bnls"}, "case_hash": "ab"}


@pytest.mark.mpi
def test_roundtrip(comm, mpi_tmp_path):
    space, _ = make_space(comm)
    x = space.random_normal(seed=4)
    path = mpi_tmp_path / "checkpoint.npz"
    assert read_checkpoint(path, space, space.create_vector()) is None
    write_checkpoint(path, space, x, STATE)
    y = space.create_vector()
    assert read_checkpoint(path, space, y, case_hash="ab") == STATE
    y.axpy(-1.0, x)
    assert y.norm() == 0.0
    with pytest.raises(InputError, match="case_hash"):
        read_checkpoint(path, space, y, case_hash="other")


@pytest.mark.mpi
def test_crash_before_rename_keeps_old(comm, mpi_tmp_path):
    space, _ = make_space(comm)
    path = mpi_tmp_path / "checkpoint.npz"
    old = space.random_normal(seed=1)
    write_checkpoint(path, space, old, STATE)
    if comm.rank == 0:  # a crash after writing the temporary file, before the rename
        (path.parent / (path.name + ".tmp")).write_bytes(b"half a file")
    comm.barrier()
    y = space.create_vector()
    assert read_checkpoint(path, space, y)["iteration"] == 7
    y.axpy(-1.0, old)
    assert y.norm() == 0.0
    # The next write replaces the stale temporary file.
    write_checkpoint(path, space, space.random_normal(seed=2), dict(STATE, iteration=8))
    assert read_checkpoint(path, space, y)["iteration"] == 8


@pytest.mark.mpi
def test_written_by_one_rank_read_by_all(comm, mpi_tmp_path):
    path = mpi_tmp_path / "serial.npz"
    if comm.rank == 0:
        sspace, _ = make_space(MPI.COMM_SELF)
        write_checkpoint(path, sspace, sspace.random_normal(seed=6), STATE)
    comm.barrier()
    space, _ = make_space(comm)
    y = space.create_vector()
    assert read_checkpoint(path, space, y)["history"] == [3.0, 2.0, 1.5]
    y.axpy(-1.0, space.random_normal(seed=6))
    assert y.norm() == 0.0


@pytest.mark.mpi
def test_corrupt_file(comm, mpi_tmp_path):
    space, _ = make_space(comm)
    path = mpi_tmp_path / "bad.npz"
    if comm.rank == 0:
        path.write_bytes(b"not a checkpoint")
    comm.barrier()
    with pytest.raises(InputError, match="checkpoint"):
        read_checkpoint(path, space, space.create_vector())
