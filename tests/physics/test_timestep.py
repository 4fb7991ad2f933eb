"""Temporal accuracy of the time stepping: BDF2 weights, observed orders, adaptive accuracy.

Orders are measured with fixed steps (the ``schedule`` argument of
:meth:`ParticleModel.solve`): on a spatially uniform state, where the model reduces to one
ODE, against scipy's Radau solution at tight tolerances; on spatially varying fields
(c0, k(x), coherency) against the same scheme with 16x smaller steps. The adaptive BDF2 run
at the default tolerance is compared with a run at a 10x tighter tolerance.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy.integrate import solve_ivp

from femkin._fem import MPI, dolfinx
from femkin.driving import Driving
from femkin.forward import ModelParameters, ParticleModel, SolverOptions
from femkin.physics import acr

PARAMS = ModelParameters(
    mu_h=(3.2, 0.0, 0.6), j0=(-0.6, 0.3), k0=1e-2, kappa=0.01, coherency=0.5
)
#: A solid solution (a_1 < 2): the uniform state follows mu_e(t) without running away.
PARAMS_ODE = dataclasses.replace(PARAMS, mu_h=(1.0, 0.0, 0.3))


def _model(
    n_cells: int, scheme: str, prefix: str, time_tol: float = 1e-3, params=PARAMS
) -> ParticleModel:
    mesh = dolfinx.mesh.create_rectangle(
        MPI.COMM_WORLD, [[0.0, 0.0], [0.6, 0.6]], [n_cells, n_cells], dolfinx.mesh.CellType.triangle
    )
    opts = SolverOptions(scheme=scheme, time_tol=time_tol, newton_rtol=1e-12, newton_atol=1e-13)
    return ParticleModel(mesh, params, solver=opts, options_prefix=prefix)


def _rate(steps, errors) -> float:
    return -float(np.polyfit(np.log(steps), np.log(errors), 1)[0])


def test_bdf2_weights_differentiate_quadratics_exactly():
    """(a0 c_n + a1 c_{n-1} + a2 c_{n-2}) / h = c'(t_n) for quadratic c, any step ratio."""
    for h, h_prev in ((1.0, 1.0), (0.3, 0.7), (2.0, 1.1)):
        (a0, a1, a2), (g1, g2) = acr.bdf2_weights(h, h_prev)
        t = np.array([-h - h_prev, -h, 0.0]) + 5.0
        c = 0.3 + 0.2 * t - 0.07 * t**2
        assert abs((a0 * c[2] + a1 * c[1] + a2 * c[0]) / h - (0.2 - 0.14 * t[2])) < 1e-12
        lin = 1.0 - 0.4 * t  # the mean is extrapolated exactly for linear data
        assert abs(g1 * lin[1] + g2 * lin[0] - lin[2]) < 1e-12


FRAMES = np.array([0.0, 100.0, 200.0])
MU_E = np.array([0.0, 2.0, -1.0])


def _reference_ode() -> np.ndarray:
    """c at the frame times of the uniform-state ODE dc/dt = R(c, mu_h(c), mu_e(t))."""
    driving = Driving(FRAMES, MU_E)
    p = PARAMS_ODE
    coeffs = acr.ACRCoefficients(
        a=p.mu_h, b=p.j0, p=0.5, q=0.5, ln_k0=np.log(p.k0), m=0.0, kappa=p.kappa,
        coherency=p.coherency, alpha=p.alpha,
    )

    def rhs(t, c):
        mu = acr.mu_h(c, p.mu_h, log=np.log)
        return acr.reaction_rate(c, mu, driving(t), coeffs, exp=np.exp, log=np.log)

    out = [0.2]
    for t0, t1 in zip(FRAMES[:-1], FRAMES[1:]):  # piecewise, so the kinks of mu_e are exact
        sol = solve_ivp(rhs, (t0, t1), [out[-1]], method="Radau", rtol=1e-13, atol=1e-14)
        out.append(float(sol.y[0, -1]))
    return np.array(out)


@pytest.mark.parametrize("scheme,lo,hi", [("bdf2", 1.9, 2.2), ("euler", 0.9, 1.1)])
def test_uniform_state_order(scheme, lo, hi):
    """Against scipy's Radau: BDF2 converges at order 2 (backward Euler at order 1)."""
    ref = _reference_ode()
    assert ref[-1] - ref[0] > 0.2  # the state moves: the test measures something
    model = _model(2, scheme, f"femkin_test_order_ode_{scheme}_", params=PARAMS_ODE)
    c0 = np.full(len(model.V.tabulate_dof_coordinates()), 0.2)
    steps, errors = [10, 20, 40, 80], []
    for n in steps:
        traj = model.solve(FRAMES, Driving(FRAMES, MU_E), c0, schedule=np.linspace(0, 200, n + 1))
        c = np.array([traj.cbar[i] for i in traj.frame_steps])
        errors.append(np.max(np.abs(c - ref)))
    rate = _rate(steps, errors)
    assert lo <= rate <= hi, f"{scheme}: observed order {rate:.3f}, errors {errors}"


def test_spatially_varying_order():
    """BDF2 with varying c0, k(x) and coherency: order 2 against 16x smaller steps."""
    model = _model(8, "bdf2", "femkin_test_order_field_")
    x = model.V.tabulate_dof_coordinates()
    c0 = 0.2 + 0.1 * np.sin(7 * x[:, 0]) * np.cos(5 * x[:, 1])
    model.set_m(0.5 * np.cos(4 * x[:, 0] + 2 * x[:, 1]))
    driving = Driving(FRAMES, np.array([0.3, 1.0, 0.0]))  # c from 0.1 to 0.95: a phase front

    def frames_c(n):
        traj = model.solve(FRAMES, driving, c0, schedule=np.linspace(0, 200, n + 1))
        return np.array([model.c_values(traj.state(i)) for i in traj.frame_steps])

    ref = frames_c(640)
    steps = [10, 20, 40]
    errors = []
    for n in steps:
        local = float(np.max(np.abs(frames_c(n) - ref)))
        errors.append(model.comm.allreduce(local, op=MPI.MAX))
    rate = _rate(steps, errors)
    assert rate >= 1.9, f"observed order {rate:.3f}, errors {errors}"
