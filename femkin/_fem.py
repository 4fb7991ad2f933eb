"""Import DOLFINx and PETSc in the right order.

The ``dolfinx-solver-real`` wheel must be imported before ``dolfinx``/``petsc4py`` so that its
bundled MPI/PETSc libraries are found; conda or Docker installs have no such module.
"""

from __future__ import annotations

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

__all__ = ["MPI", "PETSc", "dolfinx", "ufl"]
