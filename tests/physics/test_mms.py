"""Manufactured-solution convergence of the ACR forward model (issue 2, section 7).

An exact pair (c, mu)(x, t) on the unit square, with zero normal derivative of c on the boundary,
is fed through :func:`femkin.physics.acr.residual`; the sources f_c and f_mu that make it an exact
solution are derived symbolically in UFL from the same model functions::

    f_c  = dc/dt - R(c, mu, mu_e)
    f_mu = mu - mu_h(c) + kappa lap(c) - B (c - cbar)

and enter as F_total = residual - f_c v dx - f_mu w dx. Two fitted slopes (np.polyfit on log-log
data, scikit-fem's tests/test_convergence.py style) are asserted within 0.2:

- space: one step whose source uses the discrete difference (c(t1) - c(t0)) / dt and the exact
  c(t0) as the old state, so that the time error vanishes; the L2 error of c on N = 8, 16, 32
  falls like h^2 (P1).
- time: backward Euler steps to a fixed end time with the continuous source dc/dt(t_{n+1}), the
  old state the computed one and cbar the computed mean of the previous step (as in the forward
  model), on a mesh fine enough that the spatial error is far below the time error; the L2 error
  at the end time falls like dt.
"""

from __future__ import annotations

import math

import basix.ufl
import numpy as np
import pytest

from femkin._fem import MPI, dolfinx, ufl  # dolfinx_solver first
from femkin.physics import acr

QUADRATURE = {"quadrature_degree": 6}
ERROR_QUADRATURE = {"quadrature_degree": 10}
PETSC_OPTIONS = {
    "snes_type": "newtonls",
    "snes_linesearch_type": "basic",
    "ksp_type": "preonly",
    "pc_type": "lu",
    "pc_factor_mat_solver_type": "mumps",
    "snes_rtol": 1e-12,
    "snes_atol": 1e-13,
}

# Model parameters (kT, um, s); B = 0.5 exercises the coherency term and cbar.
A_COEFFS = (1.0, -0.2)
B_COEFFS = (-0.3, 0.1)
P_EXP, Q_EXP = 0.5, 0.5
LN_K0 = math.log(1.5)
KAPPA = 0.05
COHERENCY = 0.5
ALPHA = 0.4


def _mean_c_exact(t: float) -> float:
    """Particle mean of the exact c: the cosine part integrates to zero on the unit square."""
    return 0.45 + 0.1 * math.sin(2.0 * t)


def _exact(x, t):
    """Exact (c, mu) in UFL; t is a UFL expression (a Constant) or a float.

    c stays in [0.25, 0.75] for all t and has zero normal derivative on the unit square.
    """
    c = (
        0.45
        + 0.1 * ufl.sin(2.0 * t)
        + 0.2 * ufl.cos(math.pi * x[0]) * ufl.cos(math.pi * x[1]) * ufl.cos(1.5 * t)
    )
    mu = 0.3 + 0.4 * ufl.sin(math.pi * x[0]) * ufl.cos(0.5 * math.pi * x[1]) * (1.0 + 0.5 * t)
    return c, mu


def _mu_e(t):
    """Reservoir chemical potential (kT), a smooth ramp."""
    return 0.2 + 0.3 * t


def _coefficients(mesh) -> acr.ACRCoefficients:
    """The model coefficients as mesh Constants plus a smooth log-rate field m(x)."""
    x = ufl.SpatialCoordinate(mesh)

    def const(value):
        return dolfinx.fem.Constant(mesh, dolfinx.default_scalar_type(value))

    return acr.ACRCoefficients(
        a=[const(a) for a in A_COEFFS],
        b=[const(b) for b in B_COEFFS],
        p=P_EXP,
        q=Q_EXP,
        ln_k0=const(LN_K0),
        m=0.2 * ufl.sin(math.pi * x[0]) * x[1],
        kappa=const(KAPPA),
        coherency=const(COHERENCY),
        alpha=ALPHA,
    )


def _sources(x, t, dcdt, cbar_exact, coeffs: acr.ACRCoefficients):
    """Manufactured sources (f_c, f_mu) at time t, with dc/dt given as a UFL expression."""
    c, mu = _exact(x, t)
    f_c = dcdt - acr.reaction_rate(c, mu, _mu_e(t), coeffs)
    f_mu = (
        mu
        - acr.mu_h(c, coeffs.a)
        + coeffs.kappa * ufl.div(ufl.grad(c))
        - coeffs.coherency * (c - cbar_exact)
    )
    return f_c, f_mu


class _Setup:
    """Mesh, mixed P1 x P1 space, state, measures and coefficients of one MMS run."""

    def __init__(self, comm, n: int):
        self.mesh = dolfinx.mesh.create_unit_square(comm, n, n, dolfinx.mesh.CellType.triangle)
        p1 = basix.ufl.element("Lagrange", self.mesh.basix_cell(), 1)
        self.W = dolfinx.fem.functionspace(self.mesh, basix.ufl.mixed_element([p1, p1]))
        self.u = dolfinx.fem.Function(self.W)
        self.tests = ufl.TestFunctions(self.W)
        self.x = ufl.SpatialCoordinate(self.mesh)
        self.dx = ufl.Measure("dx", domain=self.mesh, metadata=QUADRATURE)
        self.coeffs = _coefficients(self.mesh)

    def constant(self, value: float) -> dolfinx.fem.Constant:
        return dolfinx.fem.Constant(self.mesh, dolfinx.default_scalar_type(value))

    def set_exact(self, t: float) -> None:
        """Interpolate the exact (c, mu) at time t into the mixed state."""
        c, mu = _exact(self.x, t)
        for i, expr in enumerate((c, mu)):
            sub = self.W.sub(i)
            points = sub.element.interpolation_points
            self.u.sub(i).interpolate(dolfinx.fem.Expression(expr, points))
        self.u.x.scatter_forward()

    def problem(self, F, prefix: str):
        return dolfinx.fem.petsc.NonlinearProblem(
            F, self.u, petsc_options_prefix=prefix, petsc_options=PETSC_OPTIONS
        )

    def solve(self, problem) -> None:
        problem.solve()
        reason = problem.solver.getConvergedReason()
        assert reason > 0, f"Newton did not converge (reason {reason})"

    def c_error(self, t: float) -> float:
        """L2 norm of c_h - c_exact(t) over the whole mesh (all ranks)."""
        c_ex, _ = _exact(self.x, t)
        dx_err = ufl.Measure("dx", domain=self.mesh, metadata=ERROR_QUADRATURE)
        form = dolfinx.fem.form((self.u.sub(0) - c_ex) ** 2 * dx_err)
        local = dolfinx.fem.assemble_scalar(form)
        return math.sqrt(self.mesh.comm.allreduce(local, op=MPI.SUM))

    def mean_c(self) -> float:
        """Particle mean of the computed c (unit area)."""
        form = dolfinx.fem.form(self.u.sub(0) * self.dx)
        return self.mesh.comm.allreduce(dolfinx.fem.assemble_scalar(form), op=MPI.SUM)


def _spatial_error(comm, n: int, t0: float = 0.3, dt: float = 0.1) -> float:
    """L2 error of c after one step whose source carries the exact discrete time derivative."""
    s = _Setup(comm, n)
    t1 = t0 + dt
    c0, mu0 = _exact(s.x, t0)
    c1, _ = _exact(s.x, t1)
    cbar = s.constant(_mean_c_exact(t0))
    dt_c = s.constant(dt)
    f_c, f_mu = _sources(s.x, t1, (c1 - c0) / dt_c, cbar, s.coeffs)
    v, w = s.tests
    F = acr.residual(ufl.split(s.u), (c0, mu0), s.tests, dt_c, _mu_e(t1), cbar, s.coeffs, s.dx)
    F = F - f_c * v * s.dx - f_mu * w * s.dx
    s.set_exact(t1)
    # Start Newton away from the answer so that the solve does real work.
    s.u.x.array[:] *= 0.97
    s.solve(s.problem(F, f"femkin_mms_space{n}_"))
    return s.c_error(t1)


def _temporal_error(comm, n: int, n_steps: int, t_end: float) -> float:
    """L2 error of c at t_end after n_steps backward-Euler steps with the continuous source."""
    s = _Setup(comm, n)
    dt = t_end / n_steps
    t_new = s.constant(0.0)
    dt_c = s.constant(dt)
    cbar = s.constant(0.0)  # mean of the computed c at the previous step
    cbar_exact = s.constant(0.0)  # mean of the exact c at the new time (continuous PDE)
    c_old = dolfinx.fem.Function(s.W)
    t_var = ufl.variable(t_new)
    dcdt = ufl.diff(_exact(s.x, t_var)[0], t_var)
    f_c, f_mu = _sources(s.x, t_new, dcdt, cbar_exact, s.coeffs)
    v, w = s.tests
    F = acr.residual(
        ufl.split(s.u), ufl.split(c_old), s.tests, dt_c, _mu_e(t_new), cbar, s.coeffs, s.dx
    )
    F = F - f_c * v * s.dx - f_mu * w * s.dx
    problem = s.problem(F, f"femkin_mms_time{n}x{n_steps}_")
    s.set_exact(0.0)
    for step in range(1, n_steps + 1):
        c_old.x.array[:] = s.u.x.array
        cbar.value = s.mean_c()
        t = step * dt
        t_new.value = t
        cbar_exact.value = _mean_c_exact(t)
        s.solve(problem)
    return s.c_error(t_end)


def _slope(steps, errors) -> float:
    return float(np.polyfit(np.log(steps), np.log(errors), 1)[0])


@pytest.mark.mpi
def test_spatial_rate_p1(comm):
    """The L2 error of c on P1 falls like h^2 (fitted slope within 0.2 of 2)."""
    ns = [8, 16, 32]
    errors = np.array([_spatial_error(comm, n) for n in ns])
    slope = _slope(1.0 / np.array(ns), errors)
    assert errors[-1] < 1e-3, f"finest error {errors[-1]:.3g} too large"
    assert abs(slope - 2.0) < 0.2, f"observed spatial L2 rate {slope:.3f} (errors {errors})"


@pytest.mark.mpi
def test_temporal_rate_backward_euler(comm):
    """The L2 error of c at a fixed end time falls like dt (fitted slope within 0.2 of 1)."""
    t_end = 1.0
    steps = [4, 8, 16, 32]
    errors = np.array([_temporal_error(comm, 32, k, t_end) for k in steps])
    slope = _slope(t_end / np.array(steps), errors)
    assert abs(slope - 1.0) < 0.2, f"observed temporal L2 rate {slope:.3f} (errors {errors})"
