"""A linear-Gaussian toy inverse problem for the optimisation tests.

Parameters: a P1 field ``m`` on the unit square (label 1) and two global coefficients ``c``.
Observation: the whole smoothed field ``u = S^{-1} M m + c_0 + c_1 x`` with ``S = M + alpha K``,
misfit ``0.5 / sigma^2 (u - d)^T M (u - d)``; BiLaplacian prior on ``m``, N(0, 1) on ``c``.
The objective is quadratic, so its minimiser solves ``H x = -g(0)`` exactly.
"""

from __future__ import annotations

import numpy as np

from femkin._fem import PETSc, dolfinx, ufl
from femkin.parameters import FieldBlock, ParameterSpace, ScalarBlock
from femkin.prior import BiLaplacianPrior, GaussianScalarPrior, Prior

SIGMA, ALPHA = 0.05, 0.01


class ToyProblem:
    """The toy reduced functional (implements ``ReducedFunctional``)."""

    def __init__(self, comm, n: int, prior_std: float = 1.0, prior_length: float = 0.3):
        mesh = dolfinx.mesh.create_unit_square(comm, n, n)
        self.V = V = dolfinx.fem.functionspace(mesh, ("Lagrange", 1))
        self.space = ParameterSpace(comm, [ScalarBlock("c", 2)], [FieldBlock("m", 1, V)])
        self.prior = Prior(
            self.space,
            {
                ("c", None): GaussianScalarPrior([0.0, 0.0], 1.0),
                ("m", 1): BiLaplacianPrior(V, prior_std, prior_length),
            },
        )
        u, v = ufl.TrialFunction(V), ufl.TestFunction(V)
        self.M = dolfinx.fem.petsc.assemble_matrix(dolfinx.fem.form(u * v * ufl.dx))
        self.M.assemble()
        S = u * v * ufl.dx + ALPHA * ufl.inner(ufl.grad(u), ufl.grad(v)) * ufl.dx
        self.S = dolfinx.fem.petsc.assemble_matrix(dolfinx.fem.form(S))
        self.S.assemble()
        self.solver = PETSc.KSP().create(mesh.comm)
        self.solver.setOperators(self.S)
        self.solver.setType("preonly")
        self.solver.getPC().setType("lu")
        self.solver.getPC().setFactorSolverType("mumps")
        self.phi = [self.M.createVecs()[0] for _ in range(2)]
        X = V.tabulate_dof_coordinates()[: V.dofmap.index_map.size_local]
        self.phi[0].set(1.0)
        self.phi[1].getArray()[:] = X[:, 0]
        truth = self.space.create_vector()
        self.space.field_view(truth, "m", 1)[:] = np.sin(np.pi * X[:, 0]) * np.cos(2 * X[:, 1])
        self.space.set_scalars(truth, "c", [0.3, -0.2])
        self.truth = truth
        self.d = self.M.createVecs()[0]
        self.d.set(0.0)
        self.d = self._linear(truth)
        self.d.getArray()[:] += 0.02 * np.cos(17 * X[:, 0] + 5 * X[:, 1])

    def _linear(self, x):
        """``J x`` (the observation of ``x``, no data subtracted)."""
        m = self.space.field_vec(x, "m", 1, readonly=True)
        w, u = self.M.createVecs()
        self.M.mult(m, w)
        self.solver.solve(w, u)
        c = self.space.get_scalars(x, "c")
        u.axpy(c[0], self.phi[0])
        u.axpy(c[1], self.phi[1])
        w.destroy()
        return u

    def _adjoint(self, r, g):
        """``g = J^T M r / sigma^2`` into a dual parameter vector; returns ``Mr``."""
        Mr, w = self.M.createVecs()
        self.M.mult(r, Mr)
        Mr.scale(1.0 / SIGMA**2)
        self.solver.solve(Mr, w)
        gm = self.space.field_vec(g, "m", 1)
        self.M.mult(w, gm)
        self.space.set_scalars(g, "c", [Mr.dot(self.phi[0]), Mr.dot(self.phi[1])])
        w.destroy()
        return Mr

    def value(self, x):
        g = x.duplicate()
        value = self.value_gradient(x, g)
        g.destroy()
        return value

    def value_gradient(self, x, g):
        r = self._linear(x)
        r.axpy(-1.0, self.d)
        Mr = self._adjoint(r, g)
        misfit = 0.5 * r.dot(Mr)
        gp = g.duplicate()
        value = misfit + self.prior.cost_gradient(x, gp)
        g.axpy(1.0, gp)
        gp.destroy()
        return value

    def hessian_mult(self, x, v, out):
        Jv = self._linear(v)
        self._adjoint(Jv, out)
        p = out.duplicate()
        self.prior.precision_mult(v, p)
        out.axpy(1.0, p)
        p.destroy()

    def dense_map(self) -> np.ndarray:
        """The exact minimiser by a dense solve of ``H x = -g(0)`` (serial spaces only)."""
        n = self.space.global_size
        H = np.zeros((n, n))
        e, col = self.space.create_vector(), self.space.create_vector()
        for i in range(n):
            e.set(0.0)
            e.setValue(i, 1.0)
            e.assemble()
            self.hessian_mult(e, e, col)
            H[:, i] = col.getArray()
        g0 = self.space.create_vector()
        self.value_gradient(self.space.create_vector(), g0)
        return np.linalg.solve(0.5 * (H + H.T), -g0.getArray())
