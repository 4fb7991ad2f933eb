"""Forward model checks: the uniform-state ODE, equilibrium, frame times, failure, ranks.

A uniform initial state with a uniform rate field stays uniform (the gradient term vanishes and
the coherency term vanishes up to O(dt) with the semi-implicit particle mean), so the particle
mean of c must follow the scalar ODE dc/dt = k0 j0(c) [exp(-alpha eta) - exp((1-alpha) eta)],
eta = mu_h(c) - mu_e(t).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.integrate import solve_ivp

from femkin._fem import MPI, dolfinx
from femkin.driving import Driving
from femkin.errors import ConvergenceError
from femkin.forward import ModelParameters, ParticleModel, SolverOptions
from femkin.observation import build_observation
from femkin.physics import acr

PARAMS = ModelParameters(
    mu_h=(3.2, -0.4, 0.6),
    j0=(-0.6, 0.3),
    j0_prefactor=(0.5, 0.5),
    k0=2e-2,
    kappa=0.01,
    coherency=0.3,
    alpha=0.4,
)


def _unit_square(comm, n: int, length: float = 1.0):
    return dolfinx.mesh.create_rectangle(
        comm, [[0.0, 0.0], [length, length]], [n, n], dolfinx.mesh.CellType.triangle
    )


def _uniform(model: ParticleModel, value: float) -> np.ndarray:
    return np.full(model.V.dofmap.index_map.size_local + model.V.dofmap.index_map.num_ghosts, value)


def _mu_h(c: float, p: ModelParameters) -> float:
    return acr.mu_h(c, p.mu_h, log=math.log)


def _ode_rate(c: float, mu_e: float, p: ModelParameters) -> float:
    ln_j0 = acr.ln_j0(c, p.j0, p.j0_prefactor[0], p.j0_prefactor[1], log=math.log)
    eta = _mu_h(c, p) - mu_e
    return p.k0 * math.exp(ln_j0) * (math.exp(-p.alpha * eta) - math.exp((1 - p.alpha) * eta))


@pytest.mark.mpi
@pytest.mark.parametrize("scheme", ["bdf2", "euler"])
def test_uniform_state_follows_the_ode(comm, scheme):
    """The particle mean of a uniform state matches solve_ivp of the scalar ODE to 1e-3."""
    c0 = 0.25
    frames = np.linspace(0.0, 60.0, 7)
    mu0 = _mu_h(c0, PARAMS)
    # A ramp that drives lithiation faster, then slower: c moves from 0.25 to ~0.5.
    driving = Driving([0.0, 20.0, 60.0], [mu0 + 0.2, mu0 + 0.8, mu0 + 0.4])
    model = ParticleModel(
        _unit_square(comm, 4),
        PARAMS,
        solver=SolverOptions(scheme=scheme, dt_initial=0.05, dt_max=0.15, dc_max=5e-3),
    )
    traj = model.solve(frames, driving, _uniform(model, c0))
    mean = np.array([model.mean_c(traj.state(n)) for n in traj.frame_steps])
    sol = solve_ivp(
        lambda t, c: [_ode_rate(c[0], driving(t), PARAMS)],
        (frames[0], frames[-1]),
        [c0],
        t_eval=frames,
        rtol=1e-10,
        atol=1e-12,
        method="Radau",
    )
    assert sol.success
    assert mean[-1] - c0 > 0.2, f"the drive should move c appreciably, moved {mean[-1] - c0:.3g}"
    err = np.max(np.abs(mean - sol.y[0]))
    assert err < 1e-3, f"max |mean c - ODE| = {err:.3g} over frames ({traj.n_steps} steps)"
    # The state stays uniform (spread of c over the particle, all ranks).
    c_last = model.c_values(traj.state(traj.frame_steps[-1]))
    spread = comm.allreduce(float(np.ptp(c_last)) if c_last.size else 0.0, op=MPI.MAX)
    assert spread < 1e-8, f"uniform state lost uniformity: spread {spread:.3g}"


@pytest.mark.mpi
def test_equilibrium_state_stays_put(comm):
    """A uniform c0 with mu_e = mu_h(c0) does not move over many steps."""
    c0 = 0.37
    model = ParticleModel(
        _unit_square(comm, 6), PARAMS, solver=SolverOptions(dt_initial=0.5, dt_max=0.5)
    )
    driving = Driving([0.0], [_mu_h(c0, PARAMS)])
    traj = model.solve(np.linspace(0.0, 50.0, 6), driving, _uniform(model, c0))
    assert traj.n_steps >= 100
    dev = max(
        float(np.max(np.abs(model.c_values(traj.state(n)) - c0), initial=0.0))
        for n in range(traj.n_steps + 1)
    )
    dev = comm.allreduce(dev, op=MPI.MAX)
    assert dev < 1e-8, f"max |c - c0| = {dev:.3g} after {traj.n_steps} steps"


@pytest.mark.mpi
@pytest.mark.parametrize("scheme", ["bdf2", "euler"])
def test_frame_times_are_hit_exactly(comm, scheme):
    """Adaptive steps land exactly on every (irregular) frame time, also when replayed."""
    frames = np.array([0.0, 0.7, 1.3, 5.1, 5.15, 11.0 / 3.0 + 6.0])
    opts = SolverOptions(scheme=scheme, dt_initial=0.3, dc_max=0.01, time_tol=1e-4)
    model = ParticleModel(_unit_square(comm, 4), PARAMS, solver=opts)
    xV = model.V.tabulate_dof_coordinates()
    c0 = 0.3 + 0.1 * np.cos(np.pi * xV[:, 0]) * np.cos(np.pi * xV[:, 1])
    driving = Driving([0.0, 10.0], [-1.0, -3.0])
    traj = model.solve(frames, driving, c0)
    times = np.array(traj.times)
    assert len(traj.frame_steps) == frames.size
    assert traj.n_steps > frames.size  # more steps than frames: the landing logic is exercised
    np.testing.assert_array_equal(times[traj.frame_steps], frames)
    assert np.all(np.diff(times) > 0)
    replay = model.solve(frames, driving, c0, schedule=traj.times)
    np.testing.assert_array_equal(np.array(replay.times), times)
    assert replay.frame_steps == traj.frame_steps


@pytest.mark.mpi
def test_newton_failure_at_the_step_floor_raises(comm):
    """A violent drive with the step floor above the first step raises ConvergenceError."""
    p = ModelParameters(mu_h=(3.2,), j0=(), k0=1e4, kappa=0.01)
    model = ParticleModel(
        _unit_square(comm, 4),
        p,
        solver=SolverOptions(dt_initial=10.0, dt_min=100.0, newton_max_it=3),
        options_prefix="femkin_test_fail_",
    )
    driving = Driving([0.0], [60.0])
    with pytest.raises(ConvergenceError) as info:
        model.solve([0.0, 100.0], driving, _uniform(model, 0.05))
    msg = str(info.value)
    assert "t = 0 s" in msg, msg
    assert "step 10 s" in msg, msg
    assert "SNES reason" in msg and "dt_min = 100 s" in msg, msg


def _gathered_observations(comm, n_cells: int, frames, driving, scheme: str):
    mesh = _unit_square(comm, n_cells, length=0.6)
    model = ParticleModel(
        mesh,
        PARAMS,
        solver=SolverOptions(scheme=scheme, dc_max=0.01),
        options_prefix=f"femkin_test_ranks{comm.size}_",
    )
    xV = model.V.tabulate_dof_coordinates()
    c0 = 0.2 + 0.1 * np.sin(7 * xV[:, 0]) * np.cos(5 * xV[:, 1])
    model.set_m(0.3 * np.cos(4 * xV[:, 0] + 2 * xV[:, 1]))
    traj = model.solve(frames, driving, c0)
    obs = build_observation(model.W.sub(0), np.ones((12, 12), dtype=int), 1, 0.05)
    values = np.stack([obs.apply(traj.state(n)) for n in traj.frame_steps], axis=1)
    pixels = np.concatenate(comm.allgather(obs.pixels))
    values = np.concatenate(comm.allgather(values))
    order = np.argsort(pixels)
    return pixels[order], values[order], np.array(traj.times)


@pytest.mark.mpi
@pytest.mark.parametrize("scheme", ["bdf2", "euler"])
def test_observations_independent_of_rank_count(comm, scheme):
    """The same forward run on COMM_WORLD and on COMM_SELF gives the same pixel values."""
    frames = np.linspace(0.0, 200.0, 5)
    driving = Driving(frames, 0.5 + 0.5 * np.arange(5))
    pix, val, times = _gathered_observations(comm, 12, frames, driving, scheme)
    pix_ref, val_ref, times_ref = _gathered_observations(MPI.COMM_SELF, 12, frames, driving, scheme)
    np.testing.assert_array_equal(pix, pix_ref)
    assert pix.size == 144
    np.testing.assert_allclose(times, times_ref, rtol=1e-8)  # adaptive steps: roundoff only
    rel = np.max(np.abs(val - val_ref)) / np.max(np.abs(val_ref))
    assert rel < 1e-8, f"relative difference {rel:.3g} between {comm.size} ranks and 1"
    assert np.max(np.ptp(val_ref[:, 1:], axis=0)) > 0.1  # the evolved field is not uniform
