"""The Laplace evidence against closed forms: linear-Gaussian problems, the truncated tail.

For ``d = F x + e``, ``e ~ N(0, diag(sigma^2))``, ``x ~ N(x_0, Gamma)`` the evidence is the
Gaussian density ``log N(d; F x_0, Sigma + F Gamma F^T)`` and the Laplace approximation is exact:
:func:`femkin.uq.evidence.laplace_log_evidence`, fed with the MAP misfit, prior penalty and the
eigenvalues of ``H v = lambda Gamma^{-1} v``, must reproduce it to round-off.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
from uq_problems import make_problem

from femkin.uq.evidence import (
    laplace_log_evidence,
    marginal_tail_bound,
    tail_bounds,
    tail_log_det_lanczos,
)
from femkin.uq.randomized import adaptive_rank, double_pass_generalized, omitted_spectrum


def _gaussian_log_density(r: np.ndarray, cov: np.ndarray) -> float:
    sign, logdet = np.linalg.slogdet(cov)
    assert sign > 0
    return float(-0.5 * (r @ np.linalg.solve(cov, r) + logdet + r.size * np.log(2 * np.pi)))


def _dense_problem(seed: int, n_data: int, n: int):
    rng = np.random.default_rng(seed)
    F = rng.standard_normal((n_data, n))
    sigma = rng.uniform(0.05, 0.3, n_data)
    L = rng.standard_normal((n, n)) / np.sqrt(n)
    gamma = L @ L.T + 0.3 * np.eye(n)  # a correlated prior covariance
    x0 = rng.standard_normal(n)
    d = F @ (x0 + np.linalg.cholesky(gamma) @ rng.standard_normal(n)) + sigma * rng.standard_normal(
        n_data
    )
    return F, sigma, gamma, x0, d


def _laplace_terms(F, sigma, gamma, x0, d):
    """MAP point, misfit, prior penalty and generalised eigenvalues (dense)."""
    B = np.linalg.inv(gamma)
    H = F.T @ (F / sigma[:, None] ** 2)
    P = H + B
    x = x0 + np.linalg.solve(P, F.T @ ((d - F @ x0) / sigma**2))
    misfit = 0.5 * float(np.sum(((F @ x - d) / sigma) ** 2))
    penalty = 0.5 * float((x - x0) @ B @ (x - x0))
    lam = scipy.linalg.eigh(H, B, eigvals_only=True)[::-1]
    return misfit, penalty, lam, H, B


@pytest.mark.parametrize(("n_data", "n"), [(30, 6), (5, 12), (40, 40)])
def test_linear_gaussian_evidence_matches_closed_form(n_data, n):
    F, sigma, gamma, x0, d = _dense_problem(n_data + 7 * n, n_data, n)
    exact = _gaussian_log_density(d - F @ x0, np.diag(sigma**2) + F @ gamma @ F.T)
    misfit, penalty, lam, _, _ = _laplace_terms(F, sigma, gamma, x0, d)
    ev = laplace_log_evidence(
        misfit, penalty, n_data, float(np.sum(np.log(sigma))), lam, n_parameters=n
    )
    assert abs(ev.log_evidence - exact) <= 1e-8 * max(1.0, abs(exact)), (ev.log_evidence, exact)
    assert ev.lower == ev.upper == ev.log_evidence  # full spectrum: no tail
    # every term matters at this size: dropping one moves the value far beyond the tolerance
    assert abs(ev.prior_penalty) > 1e-3 and abs(ev.log_det_kept) > 1.0
    # the effective number of directions: tr(H Gamma_post) = sum lambda / (1 + lambda) <= rank F
    assert ev.effective_parameters == pytest.approx(
        np.trace(
            np.linalg.solve(
                np.linalg.inv(gamma) + F.T @ (F / sigma[:, None] ** 2),
                F.T @ (F / sigma[:, None] ** 2),
            )
        ),
        rel=1e-10,
    )
    assert ev.effective_parameters <= min(n_data, n) + 1e-9


def test_tail_bracket_holds_for_exact_traces():
    """Random spectra split at k: the bracket of the tail contains sum log(1 + lambda)."""
    rng = np.random.default_rng(5)
    for trial in range(200):
        lam = np.sort(rng.pareto(rng.uniform(0.3, 3.0), rng.integers(2, 80)) * 10)[::-1]
        k = int(rng.integers(1, lam.size))
        tail = lam[k:]
        b = tail_bounds(float(tail.sum()), 0.0, last_kept=float(lam[k - 1]))
        exact = float(np.sum(np.log1p(tail)))
        assert b.lower - 1e-12 <= exact <= b.upper + 1e-12, (trial, b, exact)
        assert b.lower <= b.estimate <= b.upper
        eff = float(np.sum(tail / (1 + tail)))
        assert b.effective_lower - 1e-12 <= eff <= b.effective_upper + 1e-12


def test_marginal_bound_is_a_lower_bound_of_the_tail():
    """log det C_k - log det C <= omitted log det (coefficients = some coordinates)."""
    F, sigma, gamma, x0, d = _dense_problem(3, 25, 15)
    _, _, _, H, B = _laplace_terms(F, sigma, gamma, x0, d)
    lam, V = scipy.linalg.eigh(H, B)  # V^T B V = I
    order = np.argsort(lam)[::-1]
    lam, V = lam[order], V[:, order]
    post = np.linalg.inv(H + B)
    coeffs = [0, 1, 2]
    for k in (1, 3, 6, 10):
        lr = gamma - V[:, :k] @ np.diag(lam[:k] / (1 + lam[:k])) @ V[:, :k].T
        bound = marginal_tail_bound(lr[np.ix_(coeffs, coeffs)], post[np.ix_(coeffs, coeffs)])
        exact_tail = float(np.sum(np.log1p(lam[k:])))
        assert bound is not None and 0.0 < bound <= exact_tail + 1e-10, (k, bound, exact_tail)


@pytest.fixture
def field_problem(comm):
    """The DOLFINx linear-Gaussian problem of the other UQ tests, with data in H's range."""
    p = make_problem(comm, n=6, n_obs=12)
    n = p.template.getSize()
    # Data space: H = G^T G with G = H^{1/2} (unit noise): the same posterior, explicit data.
    w, U = np.linalg.eigh(p.dense_H)
    G = (U * np.sqrt(np.clip(w, 0.0, None))) @ U.T
    gamma = np.linalg.inv(p.dense_B)
    rng = np.random.default_rng(17)
    x0 = np.zeros(n)
    y = G @ (np.linalg.cholesky(gamma) @ rng.standard_normal(n)) + rng.standard_normal(n)
    exact = _gaussian_log_density(y - G @ x0, np.eye(n) + G @ gamma @ G.T)
    misfit, penalty, _, _, _ = _laplace_terms(G, np.ones(n), gamma, x0, y)
    return p, exact, misfit, penalty


@pytest.mark.mpi
def test_evidence_from_the_randomized_spectrum(field_problem):
    """The eigenvalues of femkin's eigensolver (to the Hessian's rank): the closed form to
    1e-8, identically on every rank; a capped rank gives a bracket that holds the truth."""
    p, exact, misfit, penalty = field_problem
    n = p.template.getSize()
    probes = [p.make_probe(i) for i in range(p.n_obs + 10)]
    lam, vs = double_pass_generalized(p.apply_H, p.apply_B, p.apply_Binv, probes, p.n_obs)
    ev = laplace_log_evidence(misfit, penalty, n, 0.0, lam, n_parameters=n)
    assert abs(ev.log_evidence - exact) <= 1e-8 * max(1.0, abs(exact)), (ev.log_evidence, exact)
    values = p.comm.allgather(ev.log_evidence)
    assert all(v == values[0] for v in values)
    # capped at 4 of the 12 informed directions: the tail from omitted_spectrum
    pairs = adaptive_rank(
        p.apply_H, p.apply_B, p.apply_Binv, p.make_probe, threshold=0.0, max_rank=4, start=4
    )
    om = omitted_spectrum(
        p.apply_H, p.apply_B, p.apply_Binv, pairs, p.prior_sample, samples=40, power_steps=4
    )
    tail = tail_bounds(
        om.trace, om.trace_error, last_kept=float(pairs.eigenvalues[-1]), largest=om.largest
    )
    capped = laplace_log_evidence(
        misfit, penalty, n, 0.0, pairs.eigenvalues, n_parameters=n, tail=tail
    )
    assert capped.lower <= exact <= capped.upper, (capped.lower, exact, capped.upper)
    assert capped.upper - capped.lower > 0
    # the kept pairs alone would overstate the evidence: the tail matters here
    kept_only = capped.upper + 0.5 * tail.lower
    assert kept_only - exact > 0.5, (kept_only, exact)


@pytest.mark.mpi
def test_lanczos_estimate_of_the_tail(field_problem):
    """Stochastic Lanczos quadrature of the omitted log det: within its statistical error of
    the dense value, far inside the trace bracket, and the same on every rank."""
    p, exact, misfit, penalty = field_problem
    n = p.template.getSize()
    lam_all = scipy.linalg.eigh(p.dense_H, p.dense_B, eigvals_only=True)[::-1]
    pairs = adaptive_rank(
        p.apply_H, p.apply_B, p.apply_Binv, p.make_probe, threshold=0.0, max_rank=3, start=3
    )
    exact_tail = float(np.sum(np.log1p(np.clip(lam_all[3:], 0.0, None))))
    slq = tail_log_det_lanczos(
        p.apply_H, p.apply_B, p.apply_Binv, pairs.eigenvectors, p.prior_sample, samples=30, steps=15
    )
    assert abs(slq["estimate"] - exact_tail) < 3 * slq["standard_error"] + 0.02 * exact_tail, (
        slq,
        exact_tail,
    )
    assert slq["standard_error"] < 0.2 * exact_tail
    tail = np.clip(lam_all[3:], 0.0, None)
    exact_eff = float(np.sum(tail / (1 + tail)))
    assert abs(slq["effective"] - exact_eff) < 3 * slq["effective_error"] + 0.02 * exact_eff
    values = p.comm.allgather(slq["estimate"])
    assert all(v == values[0] for v in values)
    om = omitted_spectrum(
        p.apply_H, p.apply_B, p.apply_Binv, pairs, p.prior_sample, samples=30, power_steps=4
    )
    kw = {"last_kept": float(pairs.eigenvalues[-1]), "largest": om.largest}
    wide = tail_bounds(om.trace, om.trace_error, **kw)
    narrow = tail_bounds(om.trace, om.trace_error, lanczos=slq, **kw)
    assert narrow.method == "lanczos"
    assert narrow.upper - narrow.lower < 0.5 * (wide.upper - wide.lower)
    assert narrow.effective_lower <= exact_eff <= narrow.effective_upper
    capped = laplace_log_evidence(
        misfit, penalty, n, 0.0, pairs.eigenvalues, n_parameters=n, tail=narrow
    )
    assert capped.lower <= exact <= capped.upper, (capped.lower, exact, capped.upper)
