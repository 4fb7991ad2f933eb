"""Shared fixtures: an MPI-safe temporary directory and collective-safe teardown.

Tests run serially and under ``mpirun -n 2``; a test marked ``mpi`` is parallel-relevant.
Long tests are marked ``slow`` and run only when ``FEMKIN_SLOW=1``.
"""

from __future__ import annotations

import gc
import os
import pathlib
import shutil
import tempfile

import pytest

from femkin._fem import MPI

SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared"
STXM_SAMPLES = SHARED / "data" / "stxm-samples"
REPO = pathlib.Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    if os.environ.get("FEMKIN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow test: set FEMKIN_SLOW=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def comm():
    return MPI.COMM_WORLD


@pytest.fixture
def mpi_tmp_path(request):
    """A temporary directory shared by all ranks, created on rank 0 and removed after the test."""
    comm = MPI.COMM_WORLD
    path = tempfile.mkdtemp(prefix="femkin-") if comm.rank == 0 else None
    path = pathlib.Path(comm.bcast(path, root=0))
    yield path
    comm.barrier()
    if comm.rank == 0:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(autouse=True)
def _collective_teardown():
    """Run collective destructors (PETSc objects) on every rank together."""
    yield
    gc.collect()
    MPI.COMM_WORLD.barrier()


@pytest.fixture
def stxm_samples():
    if not STXM_SAMPLES.is_dir():
        pytest.skip(f"real STXM samples not found at {STXM_SAMPLES} (the shared/ folder is absent)")
    return STXM_SAMPLES
