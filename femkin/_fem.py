"""Import DOLFINx and PETSc in the right order.

The ``dolfinx-solver-real`` wheel must be imported before ``dolfinx``/``petsc4py`` so that its
bundled MPI/PETSc libraries are found; conda or Docker installs have no such module.

BLAS runs on one thread per process unless the environment says otherwise
(``OPENBLAS_NUM_THREADS``, ``OMP_NUM_THREADS``): parallelism comes from MPI ranks, and on the
small sparse factorisations of 2-D particle meshes threaded BLAS inside MUMPS was measured 2x
slower (threads oversubscribe the cores that other ranks use). Where a BLAS library was
loaded before this module (numpy imported first), ``threadpoolctl`` limits it at run time.
"""

from __future__ import annotations

import os

_BLAS_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
_USER_THREADS = any(v in os.environ for v in _BLAS_VARS)
for _var in _BLAS_VARS:
    os.environ.setdefault(_var, "1")

try:  # pragma: no cover - depends on how DOLFINx was installed
    import dolfinx_solver  # noqa: F401
except ImportError:  # pragma: no cover
    pass

import dolfinx  # noqa: E402
import dolfinx.fem  # noqa: E402
import dolfinx.fem.petsc  # noqa: E402
import dolfinx.geometry  # noqa: E402
import dolfinx.mesh  # noqa: E402
import ufl  # noqa: E402
from mpi4py import MPI  # noqa: E402
from petsc4py import PETSc  # noqa: E402

if not _USER_THREADS:
    # Idle BLAS worker threads spin and take the core from the next factorisation.
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1)

__all__ = ["MPI", "PETSc", "dolfinx", "ufl"]
