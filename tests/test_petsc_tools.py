"""The shared shell Mat and mass-matrix CG."""

from __future__ import annotations

import numpy as np
import pytest

from femkin._fem import MPI, dolfinx
from femkin.petsc_tools import mass_matrix, mass_solver, shell_mat, solved


@pytest.mark.mpi
def test_shell_mat_and_mass_cg():
    comm = MPI.COMM_WORLD
    mesh = dolfinx.mesh.create_unit_square(comm, 6, 5)
    V = dolfinx.fem.functionspace(mesh, ("Lagrange", 1))
    M = mass_matrix(V)
    x, y = M.createVecs()
    x.setArray(np.cos(V.tabulate_dof_coordinates()[: x.getLocalSize(), 0]))
    # a shell wrapping M acts like M; a mass matrix of the unit square sums to its area
    S = shell_mat(x.getSizes(), comm, apply=M.mult, symmetric=True)
    S.mult(x, y)
    z = y.duplicate()
    M.mult(x, z)
    z.axpy(-1.0, y)
    assert z.norm() == 0.0
    assert S.isSymmetricKnown() == (True, True)
    ones = x.duplicate()
    ones.set(1.0)
    M.mult(ones, y)
    assert y.sum() == pytest.approx(1.0, rel=1e-12)
    # CG on M inverts it to its tolerance
    ksp = mass_solver(M)
    back = x.duplicate()
    M.mult(x, y)
    assert solved(ksp, y, back)
    back.axpy(-1.0, x)
    assert back.norm() <= 1e-10 * x.norm()
    with pytest.raises(ValueError, match="exactly one"):
        shell_mat(x.getSizes(), comm)
    for obj in (M, S, ksp, x, y, z, ones, back):
        obj.destroy()
