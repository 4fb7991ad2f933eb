"""TAO wrapper tests on the linear-Gaussian toy problem (exact MAP by a dense solve)."""

from __future__ import annotations

import numpy as np
import pytest

from femkin._fem import MPI, PETSc
from femkin.errors import ConvergenceError, InputError
from femkin.inversion.tao import minimize

from .toy import ToyProblem

TYPES = ["nls", "bnls", "ntr", "bntr", "lmvm", "blmvm"]
_CACHE: dict = {}


def problem(comm, n):
    key = (comm.size, n)
    if key not in _CACHE:
        _CACHE[key] = ToyProblem(comm, n)
    return _CACHE[key]


def serial_map(n):
    """The exact MAP (dense solve on one rank) as a global dict, on rank 0."""
    comm = MPI.COMM_WORLD
    d = None
    if comm.rank == 0:
        p = problem(MPI.COMM_SELF, n)
        x = p.space.create_vector()
        x.getArray()[:] = p.dense_map()
        d = p.space.to_global_dict(x)
    return d


def relative_error(d, ref) -> float:
    num = sum(np.sum((d[k] - ref[k]) ** 2) for k in ref if not k.endswith("coordinates"))
    den = sum(np.sum(ref[k] ** 2) for k in ref if not k.endswith("coordinates"))
    return float(np.sqrt(num / den))


@pytest.mark.mpi
@pytest.mark.parametrize("tao_type", TYPES)
def test_converges_to_exact_map(comm, tao_type):
    p = problem(comm, 12)
    history = []
    result = minimize(
        p,
        p.space.create_vector(),
        prior=p.prior,
        tao_type=tao_type,
        gatol=0.0,
        grtol=0.0,
        gttol=1e-9,
        max_iterations=200,
        monitor=lambda it, x, f, g: history.append((it, f, g)),
    )
    assert result.reason.startswith("CONVERGED")
    d, ref = p.space.to_global_dict(result.x), serial_map(12)
    err = relative_error(d, ref) if comm.rank == 0 else None
    assert comm.bcast(err, root=0) < 1e-6
    assert len(history) == len(result.history) >= result.iterations + 1
    assert history[-1][0] == result.history[-1]["iteration"] == result.iterations
    assert history[-1][1] == pytest.approx(result.value, rel=1e-12)
    assert result.value < history[0][1]


REFERENCE_BOUNDED = 1.2584539037414968  # bnls with a tight tolerance, n = 12


@pytest.mark.parametrize("tao_type", ["bnls", "blmvm", "bntr"])
def test_bounds_hold(tao_type):
    p = problem(MPI.COMM_WORLD, 12)
    upper = p.space.create_vector()
    upper.set(0.5)
    x0 = p.space.create_vector()
    x0.set(2.0)  # infeasible: projected to the bound
    unconstrained = minimize(p, x0, prior=p.prior, tao_type=tao_type, gttol=1e-7)
    assert unconstrained.x.max()[1] > 0.6
    result = minimize(
        p,
        x0,
        prior=p.prior,
        tao_type=tao_type,
        gttol=1e-7,
        bounds=(None, upper),
        max_iterations=150,
    )
    assert result.x.max()[1] <= 0.5 + 1e-12
    assert result.x.max()[1] == pytest.approx(0.5)  # the bound is active
    assert result.value > unconstrained.value
    if tao_type != "blmvm":  # bounded BLMVM runs without the prior H0: slower
        assert result.reason.startswith("CONVERGED")
        assert result.value == pytest.approx(REFERENCE_BOUNDED, rel=1e-6)
    assert x0.max()[1] == 2.0  # x0 untouched


@pytest.mark.parametrize("tao_type", ["lmvm", "bnls"])
def test_mesh_independent_iterations(tao_type):
    """Prior-preconditioned TAO: the iteration count does not grow with refinement."""
    its = []
    for n in (16, 32):
        p = ToyProblem(MPI.COMM_SELF, n)
        its.append(
            minimize(
                p,
                p.space.create_vector(),
                prior=p.prior,
                tao_type=tao_type,
                gatol=0.0,
                grtol=0.0,
                gttol=1e-8,
                max_iterations=300,
            ).iterations
        )
    assert abs(its[1] - its[0]) <= 2, its


def test_lmvm_without_prior_is_slow():
    """The H0 = prior precision matters: plain LMVM needs many more iterations."""
    p = problem(MPI.COMM_WORLD, 12)
    with_prior = minimize(
        p,
        p.space.create_vector(),
        prior=p.prior,
        tao_type="lmvm",
        gatol=0.0,
        grtol=0.0,
        gttol=1e-8,
        max_iterations=300,
    )
    plain = minimize(
        p,
        p.space.create_vector(),
        tao_type="lmvm",
        gatol=0.0,
        grtol=0.0,
        gttol=1e-8,
        max_iterations=60,
    )
    assert plain.reason == "DIVERGED_MAXITS"  # reported, not raised
    assert plain.iterations == 60 > 2 * with_prior.iterations


def test_options_and_errors():
    p = problem(MPI.COMM_WORLD, 12)
    # petsc_options under the prefix select the type (over the argument).
    r = minimize(
        p,
        p.space.create_vector(),
        prior=p.prior,
        tao_type="bnls",
        petsc_options={"tao_type": "lmvm", "tao_max_it": 3},
        gttol=1e-12,
    )
    assert r.iterations == 3 and r.reason == "DIVERGED_MAXITS"
    assert not PETSc.Options().hasName("femkin_tao_type")  # removed afterwards
    with pytest.raises(InputError, match="options_prefix"):
        minimize(p, p.space.create_vector(), options_prefix="")
    lo, hi = p.space.create_vector(), p.space.create_vector()
    lo.set(1.0)
    with pytest.raises(InputError, match="bounds"):
        minimize(p, p.space.create_vector(), tao_type="blmvm", bounds=(lo, hi))


class _NaNProblem:
    def __init__(self, p):
        self.space = p.space

    def value(self, x):
        return float("nan")

    def value_gradient(self, x, g):
        g.set(float("nan"))
        return float("nan")

    def hessian_mult(self, x, v, out):
        v.copy(out)


def test_divergence_raises():
    p = problem(MPI.COMM_WORLD, 12)
    with pytest.raises(ConvergenceError, match="DIVERGED"):
        minimize(_NaNProblem(p), p.space.create_vector(), tao_type="lmvm")


class _Raising:
    """Raises ``error`` from its gradient (or Hessian) callback, as a full disk or Ctrl-C would."""

    def __init__(self, p, error, where):
        self.p, self.space, self.error, self.where = p, p.space, error, where

    def value(self, x):
        return self.p.value(x)

    def value_gradient(self, x, g):
        if self.where == "gradient":
            raise self.error
        return self.p.value_gradient(x, g)

    def hessian_mult(self, x, v, out):
        raise self.error


@pytest.mark.parametrize("where", ["gradient", "hessian"])
@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_callback_exceptions_keep_their_cause(where, error):
    """Not 'TAO bnls failed: DIVERGED': the callback's own exception reaches the caller."""
    p = problem(MPI.COMM_WORLD, 12)
    with pytest.raises(type(error)) as info:
        minimize(_Raising(p, error, where), p.space.create_vector(), prior=p.prior, tao_type="bnls")
    assert info.value is error


def test_unknown_type_and_bad_option_values():
    p = problem(MPI.COMM_WORLD, 12)
    with pytest.raises(InputError, match="tao_type.*'bnsl' \\(did you mean"):
        minimize(p, p.space.create_vector(), tao_type="bnsl")
    with pytest.raises(InputError, match="petsc_options"):
        minimize(p, p.space.create_vector(), tao_type="bnls", petsc_options={"tao_max_it": "ten"})
    assert not PETSc.Options().hasName("femkin_tao_max_it")
