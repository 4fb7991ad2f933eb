"""Kept Jacobian factorisations and batched derivative solves give the same numbers.

A tangent run factorises J_n at every step and keeps it (``[solver] factor_cache_mb``); the adjoint
of the same Hessian action and every later action at the same point then only solve. Batched tangent
and adjoint runs (``tangent_many``/``adjoint_many``) share each step's factorisation between
directions. Both are pure reorganisations: every result must match the refactorising, one-at-a-time
path to roundoff, the memory budget must bound what is kept, and a parameter change must invalidate
the kept factorisations. Runs serially (PETSc LU kept) and on 2 ranks (MUMPS kept).
"""

from __future__ import annotations

import numpy as np
import pytest
from test_taylor import BLOCKS, PARAMS, Problem, _direction

from femkin._fem import MPI

pytestmark = pytest.mark.mpi


@pytest.fixture(scope="module")
def problem():
    return Problem(MPI.COMM_WORLD)


def _flat(problem, sens) -> np.ndarray:
    """All sensitivities of one result, gathered on every rank, as one vector."""
    local = np.concatenate([sens.m, sens.c0])
    parts = np.concatenate(problem.comm.allgather(local))
    return np.concatenate([*(sens.scalars[k] for k in sorted(sens.scalars)), sens.mu_e, parts])


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _gauss_newton(problem, d):
    return problem.hessian(d, gauss_newton=True)


def test_kept_factorisations_reproduce_refactorising(problem):
    der, opts = problem.der, problem.model.solver_options
    d = _direction(problem, BLOCKS, seed=0.7)
    opts.factor_cache_mb = 0.0
    der.clear_cache()
    grad_ref = _flat(problem, der.adjoint(problem.traj, problem.source)[0])
    gn_ref = _flat(problem, _gauss_newton(problem, d))
    full_ref = _flat(problem, problem.hessian(d))
    assert len(der.factors) == 0 and len(der._kept_ops) == 0
    opts.factor_cache_mb = 1024.0
    grad = _flat(problem, der.adjoint(problem.traj, problem.source)[0])
    assert len(der.factors) == 0  # a lone gradient keeps nothing
    gn = _flat(problem, _gauss_newton(problem, d))
    n_steps = problem.traj.n_steps
    assert len(der.factors) == n_steps  # every step kept by the tangent run
    # ... with the step's derivative operators: later actions at the point only multiply
    assert sorted(der._kept_ops) == der.factors.steps()
    kept = {n: der.factors.get(n) for n in der.factors.steps()}
    ops = {n: der._kept_ops[n][1]["old"] for n in der.factors.steps()}
    gn2 = _flat(problem, _gauss_newton(problem, d))
    full = _flat(problem, problem.hessian(d))
    grad2 = _flat(problem, der.adjoint(problem.traj, problem.source)[0])
    assert all(der.factors.get(n) is kept[n] for n in kept)  # reused, not refactorised
    assert all(der._kept_ops[n][1]["old"] is ops[n] for n in ops)  # reused, not reassembled
    # the operators count against the budget beside the factorisations
    assert der.factors.bytes == pytest.approx(n_steps * der.factors.step_bytes, rel=0.05)
    assert _rel(grad, grad_ref) < 1e-11
    assert _rel(gn2, gn_ref) < 1e-11
    assert _rel(grad2, grad_ref) < 1e-11
    assert _rel(gn, gn_ref) < 1e-11
    assert _rel(full, full_ref) < 1e-11


def test_budget_bounds_what_is_kept(problem):
    der, opts = problem.der, problem.model.solver_options
    opts.factor_cache_mb = 1024.0
    d = _direction(problem, BLOCKS, seed=1.3)
    der.clear_cache()
    _gauss_newton(problem, d)
    one = der.factors.step_bytes
    assert one > 0
    # Room for three steps: three kept, the others refactorised on every use, same answer.
    opts.factor_cache_mb = 3.5 * one / 2**20
    der.clear_cache()
    g3 = _flat(problem, _gauss_newton(problem, d))
    assert len(der.factors) == 3
    opts.factor_cache_mb = 0.0
    der.clear_cache()
    g0 = _flat(problem, _gauss_newton(problem, d))
    assert len(der.factors) == 0
    assert _rel(g3, g0) < 1e-11
    opts.factor_cache_mb = 1024.0


def test_parameter_change_invalidates(problem):
    der, model = problem.der, problem.model
    model.solver_options.factor_cache_mb = 1024.0
    der.clear_cache()
    d = problem.direction(_direction(problem, BLOCKS, seed=0.4))
    der.tangent(problem.traj, d)
    assert len(der.factors) == problem.traj.n_steps
    g_ref = _flat(problem, der.adjoint(problem.traj, problem.source)[0])
    # Other parameters, same trajectory object: the kept J_n are stale and must go.
    model.set_parameters(PARAMS.with_blocks({"k0": np.array([np.log(3.0e-3)])}))
    g_other = _flat(problem, der.adjoint(problem.traj, problem.source)[0])
    model.set_parameters(PARAMS)
    model.set_m(problem.m)
    der.clear_cache()
    model.solver_options.factor_cache_mb = 0.0
    model.set_parameters(PARAMS.with_blocks({"k0": np.array([np.log(3.0e-3)])}))
    g_other_ref = _flat(problem, der.adjoint(problem.traj, problem.source)[0])
    model.set_parameters(PARAMS)
    model.set_m(problem.m)
    model.solver_options.factor_cache_mb = 1024.0
    assert _rel(g_other, g_ref) > 1e-3  # the change matters
    assert _rel(g_other, g_other_ref) < 1e-11


@pytest.fixture(scope="module")
def euler_problem():
    return Problem(MPI.COMM_WORLD, "euler")


@pytest.mark.parametrize("scheme", ["bdf2", "euler"])
def test_batched_equals_one_at_a_time(scheme, request):
    problem = request.getfixturevalue("problem" if scheme == "bdf2" else "euler_problem")
    der = problem.der
    problem.model.solver_options.factor_cache_mb = 1024.0
    # a batch of ParticleDerivatives.MATRIX_BATCH or more assembles each step's operators as
    # matrices; one at a time assembles vectors, so the two routes are compared
    seeds = (0.3, 1.1, 2.9, 4.3, 5.7, 6.1, 7.9, 8.3)
    assert len(seeds) >= der.MATRIX_BATCH
    dirs = [problem.direction(_direction(problem, BLOCKS, seed=s)) for s in seeds]
    tangs = der.tangent_many(problem.traj, dirs)
    results = der.adjoint_many(problem.traj, [problem.linear_source(t) for t in tangs])
    for d, t, (s, _) in zip(dirs, tangs, results, strict=True):
        t1 = der.tangent(problem.traj, d)
        s1 = der.adjoint(problem.traj, problem.linear_source(t1))[0]
        assert max(_rel(a, b) for a, b in zip(t[1:], t1[1:], strict=True)) < 1e-12
        assert _rel(_flat(problem, s), _flat(problem, s1)) < 1e-12
    # Different directions give different actions (the batch does not mix them up).
    assert _rel(_flat(problem, results[0][0]), _flat(problem, results[1][0])) > 1e-2


def test_discarded_objects_release_their_mumps_count(problem):
    """The process-wide count of kept MUMPS factorisations (each holds a communicator) drops
    when a ParticleDerivatives is discarded, so later problems can keep theirs."""
    from femkin.adjoint import ParticleDerivatives
    from femkin.factor_cache import FactorCache

    der = ParticleDerivatives(problem.model)
    problem.model.solver_options.factor_cache_mb = 1024.0
    before = FactorCache.mumps_kept()
    der.tangent(problem.traj, problem.direction(_direction(problem, BLOCKS, seed=0.9)))
    kept = len(der.factors)
    assert kept == problem.traj.n_steps
    expected = kept if problem.comm.size > 1 else 0  # one rank keeps PETSc's own LU
    assert FactorCache.mumps_kept() == before + expected
    del der
    import gc

    gc.collect()
    assert FactorCache.mumps_kept() == before
