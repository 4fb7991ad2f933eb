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

PARAMS = ModelParameters(mu_h=(3.2, 0.0, 0.6), j0=(-0.6, 0.3), k0=1e-2, kappa=0.01, coherency=0.5)
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
        a=p.mu_h,
        b=p.j0,
        p=0.5,
        q=0.5,
        ln_k0=np.log(p.k0),
        m=0.0,
        kappa=p.kappa,
        coherency=p.coherency,
        alpha=p.alpha,
    )

    def rhs(t, c):
        mu = acr.mu_h(c, p.mu_h, log=np.log)
        return acr.reaction_rate(c, mu, driving(t), coeffs, exp=np.exp, log=np.log)

    out = [0.2]
    for t0, t1 in zip(
        FRAMES[:-1], FRAMES[1:], strict=True
    ):  # piecewise, so the kinks of mu_e are exact
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


@pytest.mark.mpi
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


#: A full lithiation/delithiation cycle of a demo-like particle (the demo's truth model):
#: the particle mean goes 0.1 -> 0.99 -> 0.02 over 25 frames.
CYCLE_FRAMES = np.linspace(0.0, 3000.0, 25)
CYCLE_DRIVING = Driving([0.0, 1000.0, 1500.0, 2500.0, 3000.0], [1.0, 2.5, 0.0, -2.0, -2.0])
DEMO_TRUTH = ModelParameters(mu_h=(3.2, 0.0, 0.6), j0=(-0.6, 0.3), k0=1.5e-3, kappa=0.005)


def cycle_errors(mask: np.ndarray, size: float, time_tol: float) -> tuple[float, float, int]:
    """(largest particle-average error, largest pixel error, steps) of adaptive BDF2 at
    ``time_tol`` against BDF2 at ``time_tol / 10`` over :data:`CYCLE_FRAMES`.
    """
    from femkin.meshing import mesh_particle
    from femkin.observation import build_observation

    comm = MPI.COMM_WORLD
    mesh = mesh_particle(mask, 1, 0.05, comm, size=size).mesh
    runs = []
    for tol in (time_tol, time_tol / 10):
        opts = SolverOptions(time_tol=tol)
        model = ParticleModel(mesh, DEMO_TRUTH, solver=opts, options_prefix="femkin_test_cycle_")
        obs = build_observation(model.W.sub(0), mask, 1, 0.05)
        x = model.V.tabulate_dof_coordinates()
        model.set_m(0.5 * np.sin(6 * x[:, 0] + 1.0) * np.cos(5 * x[:, 1]))
        c0 = 0.1 + 0.03 * np.sin(9 * x[:, 0]) * np.cos(7 * x[:, 1])
        traj = model.solve(CYCLE_FRAMES, CYCLE_DRIVING, c0)
        avg = np.array([traj.cbar[n] for n in traj.frame_steps])
        pix = np.array([obs.apply(traj.state(n)) for n in traj.frame_steps])
        runs.append((avg, pix, traj.n_steps))
    (avg, pix, steps), (avg_ref, pix_ref, _) = runs
    assert avg_ref.max() > 0.9 and avg_ref[-1] < 0.1  # a full cycle
    pix_err = comm.allreduce(float(np.max(np.abs(pix - pix_ref), initial=0.0)), op=MPI.MAX)
    return float(np.max(np.abs(avg - avg_ref))), pix_err, steps


def _ellipse(width: int, height: int) -> np.ndarray:
    rows, cols = np.mgrid[0 : height + 4, 0 : width + 4]
    r = ((cols - (width + 3) / 2) / (width / 2)) ** 2 + (
        (rows - (height + 3) / 2) / (height / 2)
    ) ** 2
    return (r <= 1.0).astype(int)


def test_default_tolerance_accuracy_small_particle():
    """Default tolerance on a 16 x 10 pixel platelet over a full cycle: the particle average
    within 0.005 and every pixel within 0.02 of a 10x tighter run."""
    avg_err, pix_err, steps = cycle_errors(_ellipse(16, 10), 1.5, SolverOptions().time_tol)
    assert avg_err < 0.005 and pix_err < 0.02, (avg_err, pix_err, steps)
    assert avg_err > 1e-5  # the tolerance is not so tight that the test is vacuous


@pytest.mark.slow
def test_default_tolerance_accuracy_demo_particle():
    """The same on the demo particle (1200 pixels at the demo's fitting mesh, 1.5 px)."""
    import pathlib

    video = pathlib.Path(__file__).resolve().parents[2] / "cases" / "demo" / "data" / "video.npz"
    if video.is_file():
        with np.load(video) as z:
            mask = (np.asarray(z["mask"]) == 1).astype(int)
    else:
        mask = _ellipse(40, 24)
    avg_err, pix_err, steps = cycle_errors(mask, 1.5, SolverOptions().time_tol)
    assert avg_err < 0.005 and pix_err < 0.02, (avg_err, pix_err, steps)
