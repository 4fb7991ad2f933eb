"""Newton–CG (femkin.inversion.newton) on the linear-Gaussian toy problem and small operators."""

from __future__ import annotations

import math

import numpy as np
import pytest

from femkin._fem import MPI, PETSc
from femkin.errors import ConvergenceError, InputError
from femkin.inversion.newton import CONVERGED, REASON_TEXT, newton_cg, steihaug_cg

from .test_tao import problem, relative_error, serial_map


@pytest.mark.mpi
def test_converges_to_exact_map(comm):
    """The MAP point of the quadratic toy to 1e-7, on any number of ranks, by the decrement."""
    p = problem(comm, 12)
    r = newton_cg(p, p.space.create_vector(), prior=p.prior, decrement_tol=1e-12, gttol=0.0)
    assert r.reason == "CONVERGED_DECREMENT" and r.converged
    assert 0 <= r.decrement < 1e-12
    ref = serial_map(12)
    d = p.space.to_global_dict(r.x)  # collective
    err = relative_error(d, ref) if comm.rank == 0 else 0.0
    assert comm.bcast(err, root=0) < 1e-7
    # every accepted step decreased J; the decrement of the step from x_k predicts J_k - J_{k+1}
    # exactly on a quadratic with a full step
    h = r.history
    assert all(b["objective"] < a["objective"] for a, b in zip(h, h[1:], strict=False))
    for a, b in zip(h, h[1:], strict=False):
        assert a["step_length"] == 1.0
        assert a["objective"] - b["objective"] == pytest.approx(a["decrement"], rel=1e-8)
    assert r.counters["hessian_actions"] == sum(x.get("cg_iterations", 0) for x in h)


def test_mesh_independent_iterations():
    """Newton and CG iteration counts stay flat as the mesh is refined 4x (prior-preconditioned)."""
    its, cgs = [], []
    for n in (8, 16, 32):
        p = problem(MPI.COMM_WORLD, n)
        r = newton_cg(p, p.space.create_vector(), prior=p.prior, decrement_tol=1e-9, gttol=0.0)
        assert r.converged
        its.append(r.iterations)
        cgs.append(r.counters["cg_iterations"])
    assert max(its) - min(its) <= 1, its
    assert max(cgs) <= 1.2 * min(cgs), cgs  # measured 43, 44, 45


def test_forcing_term_tightens():
    """hIPPYlib's forcing term: 0.5 at first, then sqrt of the best relative gradient."""
    p = problem(MPI.COMM_WORLD, 12)
    r = newton_cg(p, p.space.create_vector(), prior=p.prior, decrement_tol=1e-10, gttol=0.0)
    h = r.history
    g0 = h[0]["gradient_norm_prior"]
    for k, rec in enumerate(h):
        if "forcing" in rec:
            best = min(x["gradient_norm_prior"] for x in h[: k + 1])
            assert rec["forcing"] == pytest.approx(min(0.5, math.sqrt(best / g0)))
    forcing = [rec["forcing"] for rec in h if "forcing" in rec]
    assert forcing[0] == 0.5 and forcing[-1] < 0.01
    assert all(b <= a for a, b in zip(forcing, forcing[1:], strict=False))


def test_iteration_cap_is_not_convergence():
    p = problem(MPI.COMM_WORLD, 12)
    r = newton_cg(p, p.space.create_vector(), prior=p.prior, max_iterations=2, decrement_tol=0)
    assert r.iterations == 2 and r.reason == "DIVERGED_MAXITS" and not r.converged
    assert "NOT converged" in REASON_TEXT[r.reason]
    assert "DIVERGED_MAXITS" not in CONVERGED


def test_resume_from_any_iterate_repeats_the_steps():
    """Restarting from the state saved after iterate k gives the same iterates bit for bit."""
    p = problem(MPI.COMM_WORLD, 12)
    saved = []

    def keep(rec, x, state):
        saved.append((x.copy(), state))

    full = newton_cg(
        p, p.space.create_vector(), prior=p.prior, decrement_tol=1e-10, on_iteration=keep
    )
    assert full.iterations >= 4
    for k in (1, 3):
        x_k, state = saved[k]
        assert state["iteration"] == k
        r = newton_cg(p, x_k, prior=p.prior, decrement_tol=1e-10, state=state)
        assert r.iterations == full.iterations and r.reason == full.reason
        diff = r.x.copy()
        diff.axpy(-1.0, full.x)
        assert diff.norm() <= 1e-12 * full.x.norm()
        assert [h["objective"] for h in r.history] == [h["objective"] for h in full.history]
        assert r.counters["hessian_actions"] == full.counters["hessian_actions"]


def test_gradient_tolerances():
    p = problem(MPI.COMM_WORLD, 12)
    r = newton_cg(p, p.space.create_vector(), prior=p.prior, decrement_tol=0, gttol=1e-3)
    assert r.reason == "CONVERGED_GTTOL" and r.relative_gradient <= 1e-3
    r = newton_cg(p, p.space.create_vector(), prior=p.prior, decrement_tol=0, gttol=0, gatol=1.0)
    assert r.reason == "CONVERGED_GATOL" and r.gradient_norm <= 1.0
    with pytest.raises(InputError, match="max_iterations"):
        newton_cg(p, p.space.create_vector(), prior=p.prior, max_iterations=0)


# --- small explicit operators -----------------------------------------------------------------


def _vec(values):
    v = PETSc.Vec().createSeq(len(values), comm=MPI.COMM_SELF)
    v.getArray()[:] = values
    return v


def _apply(matrix):
    def f(x, y):
        y.getArray()[:] = matrix @ x.getArray(readonly=True)

    return f


@pytest.mark.parametrize("first", [True, False])
def test_steihaug_negative_curvature(first):
    """An indefinite H: CG stops at negative curvature with a descent direction."""
    if first:  # the gradient sees the negative eigenvalue at once: the step is -C g
        H = np.diag([-1.0, 2.0, 3.0])
        g = _vec([1.0, 0.0, 0.0])
    else:
        H = np.array([[4.0, 1.0, 0.0], [1.0, 3.0, 0.0], [0.0, 0.0, -2.0]])
        g = _vec([1.0, 1.0, 0.1])
    C = np.diag([0.5, 1.0, 2.0])
    p = g.duplicate()
    cg = steihaug_cg(_apply(H), _apply(C), g, p, rtol=1e-12, max_iterations=10)
    assert cg.reason == "negative_curvature"
    step = p.getArray()
    assert g.dot(p) < 0
    if first:
        np.testing.assert_allclose(step, -C @ g.getArray())
        assert cg.iterations == 1
    model = -(g.getArray() @ step) - 0.5 * step @ H @ step
    assert cg.decrement == pytest.approx(model)


def test_steihaug_spd_solves():
    rng = np.random.default_rng(0)
    A = rng.standard_normal((6, 6))
    H = A @ A.T + 6 * np.eye(6)
    C = np.diag(rng.uniform(0.5, 2.0, 6))
    g = _vec(rng.standard_normal(6))
    p = g.duplicate()
    cg = steihaug_cg(_apply(H), _apply(C), g, p, rtol=1e-12, max_iterations=6)
    assert cg.reason == "forcing"
    exact = np.linalg.solve(H, -g.getArray())
    np.testing.assert_allclose(p.getArray(), exact, rtol=1e-9)
    assert cg.decrement == pytest.approx(0.5 * g.getArray() @ np.linalg.solve(H, g.getArray()))


class _Uphill:
    """A functional whose 'gradient' points the wrong way: no step decreases it."""

    def __init__(self, p):
        self.p, self.space = p, p.space

    def value_gradient(self, x, g):
        value = self.p.value_gradient(x, g)
        g.scale(-1.0)
        return value

    def hessian_mult(self, x, v, out):
        self.p.hessian_mult(x, v, out)


def test_line_search_failure_is_reported():
    p = problem(MPI.COMM_WORLD, 12)
    x0 = p.space.create_vector()
    r = newton_cg(_Uphill(p), x0, prior=p.prior, max_backtracks=3)
    assert r.reason == "DIVERGED_LINE_SEARCH" and not r.converged and r.iterations == 0
    assert r.counters["backtracks"] == 4
    assert r.x.equal(x0)


class _Rescheduling:
    """The toy functional plus a constant that jumps (once) when a trial point first lies
    beyond ``radius`` of the start: a frozen step schedule re-adapted there, a different
    discretisation of the same problem (the minimiser does not move)."""

    def __init__(self, p, x0, radius, jump, counts=True):
        self.p, self.space, self.x0 = p, p.space, x0
        self.radius, self.jump, self.counts = radius, jump, counts
        self.schedule = 0
        self.schedule_changes = 0

    def value_gradient(self, x, g):
        d = x.copy()
        d.axpy(-1.0, self.x0)
        if self.schedule == 0 and d.norm() > self.radius:
            self.schedule = 1
            self.schedule_changes += 1 if self.counts else 0
        return self.p.value_gradient(x, g) + self.jump * self.schedule

    def hessian_mult(self, x, v, out):
        self.p.hessian_mult(x, v, out)


@pytest.mark.mpi
def test_line_search_restarts_on_a_readapted_schedule(comm):
    """A trial point that changes the schedule restarts the step from x_k evaluated anew; an
    Armijo test against f(x_k) of the old schedule would fail at every halving."""
    p = problem(comm, 12)
    x0 = p.space.create_vector()
    g = x0.duplicate()
    jump = 10.0 * abs(p.value_gradient(x0, g)) + 1e3  # more than any decrease
    stale = newton_cg(
        _Rescheduling(p, x0, 1e-3, jump, counts=False), x0, prior=p.prior, decrement_tol=1e-12
    )
    assert stale.reason == "DIVERGED_LINE_SEARCH" and stale.iterations == 0
    rf = _Rescheduling(p, x0, 1e-3, jump)
    r = newton_cg(rf, x0, prior=p.prior, decrement_tol=1e-12, gttol=0.0)
    assert r.converged and r.counters["reschedules"] == 1 and r.counters["backtracks"] == 0
    assert r.history[0]["objective"] > jump  # the start's record: on the new schedule
    d = p.space.to_global_dict(r.x)
    err = relative_error(d, serial_map(12)) if comm.rank == 0 else 0.0
    assert comm.bcast(err, root=0) < 1e-7
    plain = newton_cg(p, x0, prior=p.prior, decrement_tol=1e-12, gttol=0.0)
    assert r.iterations == plain.iterations and plain.counters["reschedules"] == 0


class _Failing:
    def __init__(self, p, error):
        self.space, self.error = p.space, error

    def value_gradient(self, x, g):
        if self.error is not None:
            raise self.error
        g.set(0.0)
        return float("nan")


def test_errors_come_out_as_they_are():
    p = problem(MPI.COMM_WORLD, 12)
    with pytest.raises(OSError, match="disk full"):
        newton_cg(_Failing(p, OSError("disk full")), p.space.create_vector(), prior=p.prior)
    with pytest.raises(ConvergenceError, match="not finite at the starting point"):
        newton_cg(_Failing(p, None), p.space.create_vector(), prior=p.prior)
