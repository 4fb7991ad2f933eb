"""The lagged forward Jacobian (`[solver] jacobian = "lagged"`): same answer, fewer LU factors.

A lagged solve must converge to the same residual tolerance as exact Newton (checked here by
re-assembling the residual of every stored step, independently of what SNES reported), so
its states differ from exact Newton's only by what that tolerance allows: the difference
shrinks with the tolerance. A lagged solve that fails is redone with exact Newton, and when
that fails too the step is cut as before.
"""

from __future__ import annotations

import numpy as np
import pytest

from femkin._fem import MPI, PETSc, dolfinx
from femkin.adjoint import ParticleDerivatives
from femkin.driving import Driving
from femkin.errors import ConvergenceError
from femkin.forward import ModelParameters, ParticleModel, SolverOptions

PARAMS = ModelParameters(
    mu_h=(3.2, -0.4, 0.6),
    j0=(-0.6, 0.3),
    j0_prefactor=(0.5, 0.5),
    k0=2e-2,
    kappa=0.01,
    coherency=0.3,
    alpha=0.4,
)
FRAMES = np.linspace(0.0, 100.0, 3)
DRIVING = Driving(FRAMES, 0.5 + 0.75 * np.arange(3))


def _model(comm, jacobian: str, prefix: str, **opts) -> tuple[ParticleModel, np.ndarray]:
    mesh = dolfinx.mesh.create_rectangle(
        comm, [[0.0, 0.0], [0.6, 0.6]], [12, 12], dolfinx.mesh.CellType.triangle
    )
    model = ParticleModel(
        mesh,
        PARAMS,
        solver=SolverOptions(jacobian=jacobian, **opts),
        options_prefix=f"femkin_test_lag_{prefix}_",
    )
    x = model.V.tabulate_dof_coordinates()
    model.set_m(0.3 * np.cos(4 * x[:, 0] + 2 * x[:, 1]))
    c0 = 0.2 + 0.1 * np.sin(7 * x[:, 0]) * np.cos(5 * x[:, 1])
    return model, c0


def _residual_norms(model: ParticleModel, traj) -> np.ndarray:
    """||F_n(u_n)|| of every stored step, re-assembled from the trajectory."""
    der = ParticleDerivatives(model)
    out = []
    for n in range(1, traj.n_steps + 1):
        der.set_step(traj, n)
        b = dolfinx.fem.petsc.assemble_vector(model.F)
        b.ghostUpdate(PETSc.InsertMode.ADD, PETSc.ScatterMode.REVERSE)
        out.append(b.norm())
        b.destroy()
    return np.array(out)


def _max_difference(model: ParticleModel, a, b) -> float:
    n_own = model.W.dofmap.index_map.size_local * model.W.dofmap.index_map_bs
    d = max(float(np.max(np.abs(a.state(n)[:n_own] - b.state(n)[:n_own]))) for n in a.frame_steps)
    return model.comm.allreduce(d, op=MPI.MAX)


@pytest.mark.mpi
def test_lagged_jacobian_matches_exact_newton_within_the_tolerance(comm):
    """Every step residual below newton_atol; the error against a tightly converged run
    shrinks with the tolerance (it is the tolerance, not a bias); far fewer factorisations.
    """
    exact_model, c0 = _model(comm, "exact", "exact")
    exact = exact_model.solve(FRAMES, DRIVING, c0)
    # Exact Newton: one assembly and factorisation per iteration.
    assert exact.factorisations == exact.newton_total > 0
    schedule = exact.times  # replayed: the differences are the Newton solves' alone
    tight = {"newton_atol": 1e-14, "newton_rtol": 1e-16}  # rtol off: atol decides
    ref_model, _ = _model(comm, "exact", "ref", **tight)
    ref = ref_model.solve(FRAMES, DRIVING, c0, schedule=schedule)
    assert _residual_norms(ref_model, ref).max() <= 1e-14
    errors = {}
    for atol in (1e-11, 1e-14):
        model, _ = _model(comm, "lagged", f"lagged{atol:.0e}", newton_atol=atol, newton_rtol=1e-16)
        traj = model.solve(FRAMES, DRIVING, c0, schedule=schedule)
        assert traj.jacobian_fallbacks == 0
        # The factorisations are reused: fewer than half as many as exact Newton's.
        assert 0 < traj.factorisations < 0.5 * exact.factorisations, (
            traj.factorisations,
            exact.factorisations,
        )
        assert traj.newton_total > traj.factorisations
        res = _residual_norms(model, traj)
        assert res.max() <= atol, f"largest step residual {res.max():.3g} > newton_atol {atol:g}"
        errors[atol] = _max_difference(model, traj, ref)
    assert errors[1e-14] < 1e-10, errors
    assert errors[1e-11] > 100.0 * errors[1e-14], errors  # error ~ tolerance
    # At the default tolerance, lagged and exact Newton agree to what it allows.
    assert _max_difference(exact_model, exact, ref) < errors[1e-11] < 1e-6, errors


@pytest.mark.mpi
def test_failed_lagged_solves_fall_back_to_exact_newton(comm):
    """A kept J that is never refreshed stalls; those steps are redone with exact Newton."""
    exact_model, c0 = _model(comm, "exact", "fb_exact")
    exact = exact_model.solve(FRAMES, DRIVING, c0)
    model, _ = _model(comm, "lagged", "fb_lagged", newton_max_it=6)
    model.LAG_MAX_RATE = np.inf  # keep J whatever the contraction ...
    model.LAG_MAX_GAMMA_CHANGE = np.inf  # ... and whatever the step
    traj = model.solve(FRAMES, DRIVING, c0, schedule=exact.times)
    assert traj.jacobian_fallbacks >= 2, traj.jacobian_fallbacks
    assert traj.jacobian_fallbacks == model.jacobian_fallbacks
    assert traj.rejected == 0  # the exact Newton solves converged
    assert _residual_norms(model, traj).max() <= model.solver_options.newton_atol
    assert _max_difference(model, traj, exact) < 1e-6


@pytest.mark.mpi
def test_lagged_then_exact_failure_cuts_the_step_and_raises_at_the_floor(comm):
    """Both the lagged and the exact solve fail: the step floor is reached, as without lagging."""
    p = ModelParameters(mu_h=(3.2,), j0=(), k0=1e4, kappa=0.01)
    mesh = dolfinx.mesh.create_rectangle(
        comm, [[0.0, 0.0], [1.0, 1.0]], [4, 4], dolfinx.mesh.CellType.triangle
    )
    model = ParticleModel(
        mesh,
        p,
        solver=SolverOptions(jacobian="lagged", dt_initial=10.0, dt_min=100.0, newton_max_it=3),
        options_prefix="femkin_test_lag_fail_",
    )
    n = model.V.dofmap.index_map.size_local + model.V.dofmap.index_map.num_ghosts
    with pytest.raises(ConvergenceError, match="dt_min = 100 s"):
        model.solve([0.0, 100.0], Driving([0.0], [60.0]), np.full(n, 0.05))
    assert model.jacobian_fallbacks == 1


def test_backward_euler_keeps_exact_newton(comm):
    """Euler's step growth counts Newton iterations: lagging would change its schedule."""
    model, c0 = _model(comm, "lagged", "euler", scheme="euler")
    traj = model.solve(FRAMES[:2], DRIVING, c0)
    assert traj.factorisations == traj.newton_total > 0


def test_unknown_jacobian_option_is_refused():
    mesh = dolfinx.mesh.create_unit_square(MPI.COMM_SELF, 2, 2)
    with pytest.raises(ValueError, match='jacobian must be "exact" or "lagged"'):
        ParticleModel(mesh, PARAMS, solver=SolverOptions(jacobian="chord"))


def test_case_file_selects_the_jacobian(tmp_path):
    """``[solver] jacobian`` reaches the model's options; a wrong value is one clear error."""
    from femkin.case import load_case
    from femkin.errors import CaseError
    from femkin.study import solver_options

    path = tmp_path / "case.toml"
    path.write_text('[data]\nvideo = "v.npz"\n[solver]\njacobian = "lagged"\n')
    assert solver_options(load_case(path).solver).jacobian == "lagged"
    path.write_text('[data]\nvideo = "v.npz"\n')
    assert solver_options(load_case(path).solver).jacobian == SolverOptions().jacobian
    path.write_text('[data]\nvideo = "v.npz"\n[solver]\njacobian = "chord"\n')
    with pytest.raises(CaseError) as info:
        load_case(path)
    assert info.value.field == "solver.jacobian" and "'lagged'" in str(info.value)
