"""gpCN with the Laplace proposal on a linear-Gaussian problem, resumability, diagnostics."""

from __future__ import annotations

import numpy as np
import pytest
from uq_problems import make_problem

from femkin.uq import LowRankPosterior, double_pass_generalized
from femkin.uq.mcmc import (
    GpcnKernel,
    effective_sample_size,
    run_chain,
    split_rhat,
    start_chain,
)


def _setup(comm, rank, *, beta=0.5, pcn=False):
    p = make_problem(comm, n=5, n_obs=12, sigma=0.05)
    n = p.template.getSize()
    x_star = np.sin(np.linspace(0, 3, n))  # the misfit's minimiser (noise-free "data")
    H, B = p.dense_H, p.dense_B
    post_cov = np.linalg.inv(H + B)
    post_mean = post_cov @ H @ x_star

    def misfit(x):
        d = p.gather(x) - x_star
        return 0.5 * d @ H @ d

    zero = p.template.duplicate()
    zero.set(0.0)
    if pcn:
        ref = LowRankPosterior(np.zeros(0), [], p.apply_Binv, apply_prior_precision=p.apply_B)
        centre = zero
    else:
        probes = [p.make_probe(i) for i in range(rank + 6)]
        lam, vs = double_pass_generalized(p.apply_H, p.apply_B, p.apply_Binv, probes, rank)
        ref = LowRankPosterior(lam, vs, p.apply_Binv, apply_prior_precision=p.apply_B)
        centre = p.scatter(post_mean)
    kernel = GpcnKernel(misfit, p.apply_B, zero, ref, centre, p.prior_sample, beta=beta)
    rows = np.vstack([np.cos(np.linspace(0, np.pi, n) * j) / np.sqrt(n) for j in range(3)])
    return p, kernel, centre, rows, rows @ post_mean, np.sqrt(np.diag(rows @ post_cov @ rows.T))


@pytest.mark.mpi
def test_exact_laplace_proposal_is_always_accepted(comm):
    """Gaussian posterior, Laplace exact (full rank 12): eta is constant, acceptance 1."""
    p, kernel, centre, rows, mean, std = _setup(comm, 12)
    state = start_chain(kernel, 0, centre, lambda x: rows @ p.gather(x))
    state = run_chain(kernel, state, 40, seed=3, record=lambda x: rows @ p.gather(x))
    assert state.accepted == 40 and state.failed == 0
    # a truncated proposal (rank 8: omitted eigenvalues up to ~30) is not exact
    p, kernel, centre, rows, mean, std = _setup(comm, 8, beta=0.5)
    state = start_chain(kernel, 0, centre, lambda x: rows @ p.gather(x))
    state = run_chain(kernel, state, 40, seed=3, record=lambda x: rows @ p.gather(x))
    assert 0 < state.accepted < 40


def test_truncated_proposal_samples_the_posterior(comm):
    """Rank-10 Laplace proposal (2 eigenvalues ~30 and ~13 left out), 2 chains x 1500 steps:
    means within 4 MC standard errors (from the ESS), stds within 15%, R-hat < 1.05."""
    p, kernel, centre, rows, mean, std = _setup(comm, 10, beta=0.6)
    draws = []
    for c in range(2):
        state = start_chain(kernel, c, centre, lambda x: rows @ p.gather(x))
        state = run_chain(kernel, state, 1500, seed=5, record=lambda x: rows @ p.gather(x))
        draws.append(state.records[100:])
    draws = np.array(draws)  # (chains, steps, q)
    for q in range(rows.shape[0]):
        ess = effective_sample_size(draws[:, :, q])
        se = std[q] / np.sqrt(ess)
        assert abs(draws[:, :, q].mean() - mean[q]) < 4 * se, (q, ess)
        assert abs(draws[:, :, q].std() / std[q] - 1) < 0.15
        assert split_rhat(draws[:, :, q]) < 1.05
        assert ess > 100


@pytest.mark.mpi
def test_resumed_chain_is_the_uninterrupted_one(comm):
    p, kernel, centre, rows, _, _ = _setup(comm, 8, beta=0.5)

    def record(x):
        return rows @ p.gather(x)

    saved = {}

    def checkpoint(state):
        saved[state.step] = state._replace(x=state.x.copy())

    full = run_chain(
        kernel,
        start_chain(kernel, 1, centre, record),
        30,
        seed=9,
        record=record,
        checkpoint=checkpoint,
        every=10,
    )
    assert sorted(saved) == [10, 20, 30]
    resumed = run_chain(kernel, saved[20], 30, seed=9, record=record)
    np.testing.assert_array_equal(resumed.records, full.records)
    assert resumed.accepted == full.accepted
    np.testing.assert_array_equal(p.gather(resumed.x), p.gather(full.x))


def test_ess_of_ar1_and_rhat():
    rng = np.random.default_rng(0)
    rho, m, n = 0.8, 4, 5000
    x = np.zeros((m, n))
    x[:, 0] = rng.standard_normal(m)
    for t in range(1, n):
        x[:, t] = rho * x[:, t - 1] + np.sqrt(1 - rho**2) * rng.standard_normal(m)
    tau = (1 + rho) / (1 - rho)
    assert abs(effective_sample_size(x) / (m * n / tau) - 1) < 0.2
    iid = rng.standard_normal((4, 2000))
    assert abs(effective_sample_size(iid) / 8000 - 1) < 0.15
    assert split_rhat(iid) < 1.01
    shifted = iid + np.array([0.0, 0.0, 0.0, 1.0])[:, None]
    assert split_rhat(shifted) > 1.1
    drift = iid + np.linspace(0, 2, 2000)[None, :]
    assert split_rhat(drift) > 1.1


def test_bad_beta(comm):
    p, kernel, centre, *_ = _setup(comm, 3)
    with pytest.raises(ValueError, match="beta"):
        GpcnKernel(
            kernel.misfit, p.apply_B, centre, kernel.reference, centre, p.prior_sample, beta=0.0
        )


def test_sample_bands_follow_the_kinetic_law():
    """mcmc bands of j0: the learned ln j0 of "bv", no spread for a fixed law, CIET at lambda."""
    from femkin.forward import ModelParameters
    from femkin.physics.acr import ln_j0
    from femkin.uq.sampling_study import sample_bands

    rng = np.random.default_rng(7)
    c = np.linspace(0.05, 0.95, 7)
    draws = rng.normal(size=(200, 3)) * [0.3, 0.2, 0.1] + [3.0, -0.5, 0.2]
    bv = ModelParameters(mu_h=(3.0,), j0=(-0.5, 0.2), j0_prefactor=(0.5, 0.5))
    lo, hi = sample_bands(draws, [("mu_h", 1), ("j0", 2)], bv, c)["j0"]
    curves = np.exp([ln_j0(c, r[1:], 0.5, 0.5, np.log) for r in draws])
    np.testing.assert_allclose(lo, np.percentile(curves, 2.5, axis=0), rtol=1e-12)
    np.testing.assert_allclose(hi, np.percentile(curves, 97.5, axis=0), rtol=1e-12)
    lim = ModelParameters(mu_h=(3.0,), kinetics="bv-lim")
    lo, hi = sample_bands(draws[:, :1], [("mu_h", 1)], lim, c)["j0"]
    np.testing.assert_allclose(lo, lim.j0_curve(c), rtol=1e-12)
    np.testing.assert_allclose(hi, lim.j0_curve(c), rtol=1e-12)
    ciet = ModelParameters(mu_h=(3.0,), kinetics="ciet", lambda_=8.3)
    ln_lam = np.log(8.3) + 0.1 * rng.normal(size=(200, 1))
    lo, hi = sample_bands(ln_lam, [("lambda", 1)], ciet, c)["j0"]
    curves = np.array(
        [ModelParameters(kinetics="ciet", lambda_=float(np.exp(v[0]))).j0_curve(c) for v in ln_lam]
    )
    np.testing.assert_allclose(lo, np.percentile(curves, 2.5, axis=0), rtol=1e-12)
    assert np.all(hi > lo)


def _chain(draws: np.ndarray) -> dict:
    return {"records": draws, "accepted": draws.shape[0], "failed": 0, "steps": draws.shape[0]}


def test_laplace_check_names_the_non_gaussian_coefficient():
    from femkin.uq.sampling_study import laplace_check, summarise

    rng = np.random.default_rng(5)
    n = 3000
    chains = {}
    for c in range(4):
        gauss = rng.normal(1.0, 2.0, n)
        skewed = rng.exponential(1.0, n)  # skewness 2, excess kurtosis 6; mean 1, std 1
        chains[c] = _chain(np.column_stack([gauss, skewed]))
    laplace = {"mean": np.array([1.0, 0.0]), "std": np.array([2.0, 0.7])}
    s = summarise(chains, ["a", "b"], 0.0, laplace)
    b = s["coefficients"]["b"]
    all_b = np.concatenate([chains[c]["records"][:, 1] for c in range(4)])
    assert b["mean_difference_in_std"] == pytest.approx((all_b.mean() - 0.0) / 0.7)
    assert b["std_ratio"] == pytest.approx(all_b.std(ddof=1) / 0.7)
    assert b["skewness"] == pytest.approx(2.0, abs=0.3)
    assert b["excess_kurtosis"] == pytest.approx(6.0, abs=2.0)
    assert abs(s["coefficients"]["a"]["skewness"]) < 0.1
    check = laplace_check(s)
    assert check["trusted"] and check["agree"] is False
    assert list(check["disagreeing"]) == ["b"]
    assert "b: mean shifted +1.4" in check["verdict"] and "(skewness +" in check["verdict"]
    assert "trust the MCMC" in check["verdict"]
    # Laplace right on both: agreement
    laplace["mean"][1], laplace["std"][1] = all_b.mean() + 0.2 * all_b.std(), all_b.std() * 1.2
    assert laplace_check(summarise(chains, ["a", "b"], 0.0, laplace))["agree"] is True


def test_laplace_check_gives_no_verdict_on_chains_that_disagree():
    from femkin.uq.sampling_study import laplace_check, summarise

    rng = np.random.default_rng(6)
    chains = {c: _chain(rng.normal(3.0 * c, 1.0, (400, 1))) for c in range(2)}
    s = summarise(chains, ["a"], 0.0, {"mean": np.array([1.5]), "std": np.array([1.0])})
    check = laplace_check(s)
    assert s["max_rhat"] > 1.5
    assert not check["trusted"] and check["agree"] is None
    assert "not converged" in check["verdict"]


def test_field_agreement_over_informed_points():
    from femkin.uq.sampling_study import field_agreement

    out = field_agreement(
        np.array([1.0, 1.2, 2.0, 0.5]), np.ones(4), np.array([4.0, 4.0, 1.0, 4.0]), informed=0.5
    )
    assert out["points"] == 4 and out["informed_points"] == 3
    inf = out["informed"]
    assert (inf["median"], inf["min"], inf["max"]) == (1.0, 0.5, 1.2)
    assert inf["within"] == pytest.approx(2 / 3)
    assert out["all"]["max"] == 2.0 and out["all"]["within"] == 0.5
    assert field_agreement(np.ones(2), np.ones(2), np.ones(2))["informed"] is None


def test_chain_misfit_keeps_the_map_steps():
    """A run that re-adapts its steps (as InverseProblem.misfit does on a failure) must not
    change the steps later proposals are judged on."""
    from femkin.uq.sampling_study import _fixed_steps_misfit

    class Problem:
        def __init__(self):
            self.schedule = [0.0, 1.0, 2.0]

        def schedules(self):
            return {"1": list(self.schedule)}

        def set_schedules(self, s):
            self.schedule = list(s["1"])

        def misfit(self, x):
            cost = float(len(self.schedule)) + x
            if x > 1.0:  # "too long steps": re-adapt and keep, then fail or not
                self.schedule = [0.0, 0.5, 1.0, 1.5, 2.0]
            if x > 2.0:
                raise RuntimeError("diverged")
            return cost

    p = Problem()
    f = _fixed_steps_misfit(p)
    assert f(0.0) == 3.0
    assert f(1.5) == 4.5
    assert p.schedule == [0.0, 1.0, 2.0]
    with pytest.raises(RuntimeError):
        f(3.0)
    assert f(0.0) == 3.0  # unchanged target: the bare misfit would now give 5.0
    assert Problem().misfit(1.5) == 4.5 and p.misfit(1.5) == 4.5 and p.misfit(0.0) == 5.0
