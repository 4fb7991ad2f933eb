"""Exact marginals of a few functionals against the dense Laplace posterior, any low-rank cut."""

from __future__ import annotations

import numpy as np
import pytest
from uq_problems import make_problem, rel

from femkin.uq import LowRankPosterior, double_pass_generalized
from femkin.uq.marginals import marginal_covariance
from femkin.uq.randomized import omitted_spectrum


def _truncated(p, k):
    probes = [p.make_probe(i) for i in range(k + 5)]
    lam, vs = double_pass_generalized(p.apply_H, p.apply_B, p.apply_Binv, probes, k)
    return LowRankPosterior(lam, vs, p.apply_Binv, apply_prior_precision=p.apply_B)


def _functionals(p, n_f=4):
    """Smooth weighted averages (like coefficients coupled to the field) and point values."""
    n = p.template.getSize()
    t = np.linspace(0.0, 1.0, n)
    rows = [np.cos((j + 1) * np.pi * t) / np.sqrt(n) for j in range(n_f - 1)]
    rows.append(np.eye(n)[n // 2])
    return np.array(rows)


@pytest.mark.mpi
@pytest.mark.parametrize("rank", [2, 5])
def test_exact_marginals_do_not_depend_on_the_cut(comm, rank):
    p = make_problem(comm, n=6, n_obs=12, sigma=0.02)
    rows = _functionals(p)
    dense = rows @ np.linalg.inv(p.dense_H + p.dense_B) @ rows.T
    post = _truncated(p, rank)
    fs = [p.scatter(r) for r in rows]
    out = marginal_covariance(
        fs, p.apply_H, p.apply_B, post.covariance_mult, tolerance=1e-10, max_iterations=200
    )
    assert out.converged and out.iterations > 0 and out.method in ("certified", "estimated")
    assert rel(out.covariance, dense) < 1e-7, rel(out.covariance, dense)
    assert rel(out.lower, dense) < 1e-7
    # the truncated posterior alone is far off (too wide): what the bracket repairs
    assert rel(out.low_rank, dense) > 0.05
    assert np.all(np.diag(out.low_rank) > np.diag(dense) * (1 - 1e-9))
    # the columns are the posterior covariance applied to the functionals: cross covariances
    cols = np.column_stack([p.gather(x) for x in out.columns])
    assert rel(cols, np.linalg.solve(p.dense_H + p.dense_B, rows.T)) < 1e-6
    assert out.hessian_actions >= len(fs) * (1 + 1) and out.hessian_actions <= len(fs) * (
        1 + out.iterations
    )


@pytest.mark.mpi
def test_bracket_holds_at_every_iteration(comm):
    """L <= C <= U (Loewner order) after any number of iterations, and the gap closes."""
    p = make_problem(comm, n=6, n_obs=12, sigma=0.02)
    rows = _functionals(p)
    dense = rows @ np.linalg.inv(p.dense_H + p.dense_B) @ rows.T
    post = _truncated(p, 3)
    fs = [p.scatter(r) for r in rows]
    gaps = []
    for it in (0, 2, 4, 8, 16):
        out = marginal_covariance(
            fs, p.apply_H, p.apply_B, post.covariance_mult, tolerance=1e-12, max_iterations=it
        )
        assert out.iterations == it or (out.converged and out.iterations < it)
        scale = np.abs(dense).max()
        # the lower bound is strict; the upper ones hold up to the Ritz vectors' error
        assert np.linalg.eigvalsh(dense - out.lower).min() > -1e-9 * scale
        assert np.linalg.eigvalsh(out.covariance - dense).min() > -1e-6 * scale
        assert np.linalg.eigvalsh(out.low_rank - dense).min() > -1e-6 * scale
        gaps.append(out.relative_gap)
    # the gap closes once the Krylov space holds the omitted spectrum (rank 12 - 3 here)
    assert gaps[0] > 0.5 and gaps[-1] < 1e-6, gaps
    # the start (no iteration) costs one Hessian action per functional
    out0 = marginal_covariance(
        fs, p.apply_H, p.apply_B, post.covariance_mult, tolerance=1e-12, max_iterations=0
    )
    assert out0.hessian_actions == len(fs)


@pytest.mark.mpi
def test_full_rank_start_is_already_exact(comm):
    p = make_problem(comm, n=6, n_obs=12)
    post = _truncated(p, 12)  # the Hessian has rank 12
    rows = _functionals(p)
    dense = rows @ np.linalg.inv(p.dense_H + p.dense_B) @ rows.T
    out = marginal_covariance(
        [p.scatter(r) for r in rows], p.apply_H, p.apply_B, post.covariance_mult, tolerance=1e-6
    )
    assert out.iterations == 0 and out.converged
    assert rel(out.covariance, dense) < 1e-6


def test_bad_arguments(comm):
    p = make_problem(comm, n=4, n_obs=3)
    with pytest.raises(ValueError, match="tolerance"):
        marginal_covariance([p.make_probe(0)], p.apply_H, p.apply_B, p.apply_Binv, tolerance=0)
    out = marginal_covariance([], p.apply_H, p.apply_B, p.apply_Binv)
    assert out.covariance.shape == (0, 0)


@pytest.mark.mpi
@pytest.mark.parametrize("rank", [3, 6])
def test_omitted_spectrum_estimates(comm, rank):
    """Trace and largest eigenvalue of what a rank-k cut leaves out, against the dense
    spectrum of B^{-1} H (rank 12)."""
    p = make_problem(comm, n=6, n_obs=12, sigma=0.05)
    probes = [p.make_probe(i) for i in range(rank + 8)]
    pairs = double_pass_generalized(p.apply_H, p.apply_B, p.apply_Binv, probes, rank)
    exact = np.sort(np.linalg.eigvals(np.linalg.solve(p.dense_B, p.dense_H)).real)[::-1]
    omitted_trace = exact.sum() - pairs.eigenvalues.sum()
    out = omitted_spectrum(
        p.apply_H, p.apply_B, p.apply_Binv, pairs, p.prior_sample, samples=60, power_steps=6
    )
    # Hutchinson: within 4 standard errors, and the error estimate is honest (not huge)
    assert abs(out.trace - omitted_trace) < 4 * out.trace_error, (out, omitted_trace)
    assert out.trace_error < 0.5 * omitted_trace
    # power iteration on the deflated operator: near the (rank+1)-th eigenvalue, below it
    assert 0.7 * exact[rank] < out.largest < 1.02 * exact[rank], (out.largest, exact[rank])
    assert out.largest < exact[rank - 1] * 0.9


@pytest.mark.mpi
def test_estimated_stop_is_accurate_and_cheaper(comm):
    """With a loose certificate (rank 3 of 12, eigenvalues up to ~1e4 left out) the error
    estimate stops CG earlier than the bracket; the result is within a few tolerances."""
    p = make_problem(comm, n=6, n_obs=12, sigma=0.02)
    rows = _functionals(p)
    dense = rows @ np.linalg.inv(p.dense_H + p.dense_B) @ rows.T
    post = _truncated(p, 3)
    fs = [p.scatter(r) for r in rows]
    kw = dict(tolerance=1e-3, max_iterations=100)
    est = marginal_covariance(fs, p.apply_H, p.apply_B, post.covariance_mult, delay=2, **kw)
    cert = marginal_covariance(fs, p.apply_H, p.apply_B, post.covariance_mult, delay=10**6, **kw)
    assert est.converged and cert.converged and cert.method == "certified"
    assert est.iterations <= cert.iterations
    var_err = np.abs(np.diag(est.covariance) / np.diag(dense) - 1).max()
    assert var_err < 5e-3, var_err
    # the history of diag(L) increases monotonically (CG's energy estimate)
    assert np.all(np.diff(est.lower_history, axis=0) > -1e-9 * np.abs(dense).max())
