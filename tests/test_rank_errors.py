"""User errors found on one rank are raised on every rank, with the same one-line message."""

from __future__ import annotations

import pytest

from femkin._fem import MPI
from femkin.errors import CaseError, ConvergenceError, InputError, raise_on_every_rank, run_on_root


@pytest.mark.mpi
@pytest.mark.parametrize(
    "error",
    [
        InputError("a.npz", "mask", "an integer array", "float64"),
        CaseError("case.toml", "mesh.size", "a positive number", "0"),
        ConvergenceError("Newton failed at t = 3 s"),
    ],
)
def test_root_error_raised_everywhere(error):
    comm = MPI.COMM_WORLD
    with pytest.raises(type(error)) as caught:
        raise_on_every_rank(comm, error if comm.rank == 0 else None)
    assert str(caught.value) == str(error)
    if isinstance(error, InputError):
        assert (caught.value.file, caught.value.field) == (error.file, error.field)


@pytest.mark.mpi
def test_run_on_root():
    comm = MPI.COMM_WORLD
    calls = []

    def work(x, *, scale):
        calls.append(comm.rank)
        return x * scale

    assert run_on_root(comm, work, 3, scale=2) == (6 if comm.rank == 0 else None)
    assert calls == ([0] if comm.rank == 0 else [])

    def fails():
        raise InputError("f.h5", None, "an HDF5 file", "a text file")

    with pytest.raises(InputError, match="f.h5: expected an HDF5 file, found a text file"):
        run_on_root(comm, fails)
    raise_on_every_rank(comm, None)  # no error: returns on every rank
