"""gpCN with the Laplace proposal on a linear-Gaussian problem, resumability, diagnostics."""

from __future__ import annotations

import numpy as np
import pytest
from uq_problems import make_problem

from femkin._fem import MPI, PETSc
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


def _langevin(comm, rank, *, beta=0.5, quartic=0.0, leapfrog=0):
    """_setup's problem with a Langevin kernel; ``quartic`` adds ``q/4 sum (r_j . d)^4`` to the
    misfit (a non-Gaussian posterior)."""
    p, gpcn, centre, rows, mean, std = _setup(comm, rank, beta=beta)
    n = p.template.getSize()
    x_star = np.sin(np.linspace(0, 3, n))
    H = p.dense_H

    def phi_grad(x):
        d = p.gather(x) - x_star
        r = rows @ d
        return 0.5 * d @ H @ d + 0.25 * quartic * np.sum(r**4), H @ d + quartic * rows.T @ r**3

    def misfit(x):
        return phi_grad(x)[0]

    def gradient(x, g):
        value, grad = phi_grad(x)
        w = p.scatter(grad)
        w.copy(g)
        w.destroy()
        return value

    kernel = GpcnKernel(
        misfit,
        p.apply_B,
        gpcn.prior_mean,
        gpcn.reference,
        centre,
        p.prior_sample,
        beta=beta,
        gradient=gradient,
        leapfrog=leapfrog,
    )
    return p, kernel, centre, rows, mean, std, phi_grad


def _dense(p, kernel, centre, phi_grad):
    """Dense ``Gamma``, ``Gamma^{-1}``, ``log pi`` and ``grad eta`` of a kernel from _langevin."""
    B = p.dense_B
    post = kernel.reference
    V = np.array([p.gather(v) for v in post.eigenvectors]).T
    gamma = np.linalg.inv(B) - V @ np.diag(post.d) @ V.T
    gamma_inv = np.linalg.inv(gamma)
    m = p.gather(centre)

    def log_pi(x):  # the prior mean is zero
        return -phi_grad(p.scatter(x))[0] - 0.5 * x @ B @ x

    def grad_eta(x):
        return -(phi_grad(p.scatter(x))[1] + B @ x - gamma_inv @ (x - m))

    return gamma, gamma_inv, m, log_pi, grad_eta


@pytest.mark.mpi
def test_langevin_ratio_is_the_metropolis_hastings_ratio(comm):
    """pCN-Langevin against dense densities on a non-Gaussian target: the drift is -grad eta,
    the proposal's mean is m + a (u - m) - (1 - a) Gamma g(u), and log_ratio equals
    log pi(v) q(v -> u) - log pi(u) q(u -> v) with q the drifted Gaussian N(mean, beta^2 Gamma)."""
    beta = 0.6
    p, kernel, centre, rows, _, _, phi_grad = _langevin(comm, 6, beta=beta, quartic=300.0)
    gamma, gamma_inv, m, log_pi, grad_eta = _dense(p, kernel, centre, phi_grad)
    a = np.sqrt(1 - beta**2)

    def drift(x):
        return -grad_eta(x)

    def log_q(x, y):
        r = y - (m + a * (x - m) - (1 - a) * gamma @ drift(x))
        return -0.5 * r @ gamma_inv @ r / beta**2

    u = centre.copy()
    u.axpy(1.0, p.scatter(0.3 * np.cos(np.arange(m.size))))
    eta_u, _, drift_u = kernel.evaluate(u)
    du = p.gather(u)
    np.testing.assert_allclose(p.gather(drift_u.grad), drift(du), rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(p.gather(drift_u.pre), gamma @ drift(du), rtol=1e-8, atol=1e-8)
    assert np.linalg.norm(drift(du)) > 1.0  # the drift matters here
    for seed in range(3):
        v = kernel.propose(u, seed, drift_u)
        w = kernel.reference.sample(p.prior_sample(seed))
        dv = p.gather(v)
        mean_u = m + a * (du - m) - (1 - a) * gamma @ drift(du)
        np.testing.assert_allclose(dv, mean_u + beta * p.gather(w), rtol=1e-9, atol=1e-9)
        eta_v, _, drift_v = kernel.evaluate(v)
        got = kernel.log_ratio(u, eta_u, drift_u, v, eta_v, drift_v)
        want = log_pi(dv) + log_q(dv, du) - log_pi(du) - log_q(du, dv)
        assert abs(want) > 0.1
        assert got == pytest.approx(want, rel=1e-7, abs=1e-7)
        # without the drift terms the ratio would be gpCN's: a different number
        assert abs((eta_v - eta_u) - want) > 1e-3


@pytest.mark.mpi
def test_hmc_ratio_is_minus_the_energy_change(comm):
    """infinity-HMC against a dense leapfrog on a non-Gaussian target: the end point, and log
    alpha = -(H(x_L, p_L) - H(x_0, p_0)) with H = -log pi(x) + |p|^2_{Gamma^{-1}} / 2; the
    integrator is of second order (the energy error falls 4x per halved angle at a fixed
    trajectory length); with the exact Laplace reference of a Gaussian target every trajectory
    is accepted."""
    p, kernel, centre, rows, _, _, phi_grad = _langevin(comm, 12, beta=0.3, quartic=3.0, leapfrog=5)
    gamma, gamma_inv, m, log_pi, grad_eta = _dense(p, kernel, centre, phi_grad)
    u = centre.copy()
    u.axpy(1.0, p.scatter(0.3 * np.cos(np.arange(m.size))))
    eta_u, _, drift_u = kernel.evaluate(u)
    velocity = kernel.reference.sample(p.prior_sample(4))
    angle = 0.3
    x, eta_x, _, drift_x, log_alpha = kernel.trajectory(u, eta_u, drift_u, velocity, angle)
    # the dense leapfrog
    y, v = p.gather(u) - m, p.gather(velocity)
    v0 = v.copy()
    for _ in range(kernel.leapfrog):
        v = v + 0.5 * angle * gamma @ grad_eta(y + m)
        y, v = np.cos(angle) * y + np.sin(angle) * v, -np.sin(angle) * y + np.cos(angle) * v
        v = v + 0.5 * angle * gamma @ grad_eta(y + m)
    np.testing.assert_allclose(p.gather(x), y + m, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(p.gather(drift_x.grad), -grad_eta(y + m), rtol=1e-8, atol=1e-8)
    want = (log_pi(y + m) - 0.5 * v @ gamma_inv @ v) - (
        log_pi(p.gather(u)) - 0.5 * v0 @ gamma_inv @ v0
    )
    assert abs(want) > 1e-3  # the target is not the reference Gaussian
    assert log_alpha == pytest.approx(want, rel=1e-7, abs=1e-8)
    assert abs((eta_x - eta_u) - want) > 1e-2  # the kinetic terms matter

    errors = []
    kernel = _langevin(comm, 12, beta=0.3, quartic=1.0, leapfrog=4)[1]
    eta_u, _, drift_u = kernel.evaluate(u)
    for n in (4, 8, 16):
        kernel.leapfrog = n
        xn, *_, la = kernel.trajectory(u, eta_u, drift_u, velocity, 1.2 / n)
        errors.append(abs(la))
        xn.destroy()
    assert errors[0] > 1e-3
    rates = np.log2(np.array(errors[:-1]) / np.array(errors[1:]))
    np.testing.assert_allclose(rates, 2.0, atol=0.3)

    # the Gaussian target with its exact (full-rank) Laplace reference: always accepted
    g, exact, c_exact, *_ = _langevin(comm, 12, beta=0.8, leapfrog=3)
    state = start_chain(exact, 0, c_exact, lambda x: rows @ g.gather(x))
    state = run_chain(exact, state, 20, seed=3, record=lambda x: rows @ g.gather(x))
    assert state.accepted == 20 and state.failed == 0


@pytest.mark.parametrize(
    "kind, beta, leapfrog, steps, ess_per_draw",
    [("langevin", 0.8, 0, 1500, 0.055), ("hmc", 0.5, 3, 600, 0.45)],
)
def test_gradient_kernels_sample_a_non_gaussian_posterior(
    comm, kind, beta, leapfrog, steps, ess_per_draw
):
    """Quartic misfit term, the Gaussian part's exact Laplace posterior as reference: the
    means of pCN-Langevin (beta 0.8) and of infinity-HMC (3 leapfrog steps of ~0.5 rad) lie
    within 4 MC errors (from the ESS) and their stds within 15% of those of self-normalised
    importance sampling (2e5 dense draws), which differ from the Gaussian's. pCN-Langevin gets
    0.19-0.31 effective samples per step here, HMC 0.8-1.3."""
    q4 = 1.0
    p, kernel, centre, rows, g_mean, g_std, _ = _langevin(
        comm, 12, beta=beta, quartic=q4, leapfrog=leapfrog
    )
    n = p.template.getSize()
    x_star = np.sin(np.linspace(0, 3, n))
    cov = np.linalg.inv(p.dense_H + p.dense_B)
    mean = cov @ p.dense_H @ x_star
    xs = np.random.default_rng(11).multivariate_normal(mean, cov, size=200_000)
    r = (xs - x_star) @ rows.T
    logw = -0.25 * q4 * np.sum(r**4, axis=1)
    w = np.exp(logw - logw.max())
    w /= w.sum()
    y = xs @ rows.T
    is_mean = w @ y
    is_std = np.sqrt(w @ (y - is_mean) ** 2)
    assert np.all(is_std < 0.8 * g_std)  # far from the reference Gaussian

    def record(x):
        return rows @ p.gather(x)

    draws, acc = [], []
    for c in range(2):
        state = run_chain(
            kernel, start_chain(kernel, c, centre, record), steps, seed=4, record=record
        )
        draws.append(state.records[steps // 10 :])
        acc.append(state.accepted / steps)
    assert 0.3 < np.mean(acc) <= 1.0
    draws = np.array(draws)
    for k in range(rows.shape[0]):
        ess = effective_sample_size(draws[:, :, k])
        assert ess > ess_per_draw * draws.shape[0] * draws.shape[1], (k, ess)
        se = is_std[k] / np.sqrt(ess)
        assert abs(draws[:, :, k].mean() - is_mean[k]) < 4 * se, (k, ess)
        assert abs(draws[:, :, k].std() / is_std[k] - 1) < 0.15
        assert split_rhat(draws[:, :, k]) < 1.05


@pytest.mark.mpi
@pytest.mark.parametrize("kind", ["gpcn", "langevin", "hmc"])
def test_resumed_chain_is_the_uninterrupted_one(comm, kind):
    """A chain continued from a checkpoint (the point, and for pCN-Langevin and HMC the
    gradient there) repeats the uninterrupted one; a state without its drift (a gpCN
    checkpoint) is continued after one gradient."""
    langevin = kind != "gpcn"
    if langevin:
        p, kernel, centre, rows, *_ = _langevin(
            comm,
            12,
            beta=0.8 if kind == "langevin" else 0.4,
            quartic=1.0,
            leapfrog=3 if kind == "hmc" else 0,
        )
    else:
        p, kernel, centre, rows, _, _ = _setup(comm, 8, beta=0.5)

    def record(x):
        return rows @ p.gather(x)

    saved = {}

    def checkpoint(state):  # what a checkpoint file keeps
        drift = None if state.drift is None else kernel.drift_of(state.drift.grad.copy())
        saved[state.step] = state._replace(x=state.x.copy(), drift=drift)

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
    assert 0 < full.accepted < 30 or not langevin
    bare = saved[10]._replace(x=saved[10].x.copy(), drift=None)  # run_chain consumes its state
    resumed = run_chain(kernel, saved[10], 30, seed=9, record=record)
    np.testing.assert_array_equal(resumed.records, full.records)
    assert resumed.accepted == full.accepted
    np.testing.assert_array_equal(p.gather(resumed.x), p.gather(full.x))
    if langevin:
        again = run_chain(kernel, bare, 30, seed=9, record=record)
        np.testing.assert_allclose(again.records, full.records, rtol=1e-12, atol=1e-12)


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
    with pytest.raises(ValueError, match="needs the gradient"):
        GpcnKernel(
            kernel.misfit,
            p.apply_B,
            centre,
            kernel.reference,
            centre,
            p.prior_sample,
            beta=0.5,
            leapfrog=2,
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


def test_choose_centre_takes_the_better_fitting_gaussian():
    """ "auto" takes the candidate whose eta varies least over the pilot draws; a failed
    forward run makes the spread infinite; "map"/"laplace" are taken as given."""
    from femkin.uq.sampling_study import choose_centre

    class Kernel:
        def __init__(self, centre, spread, fail=False):
            self.centre, self.spread, self.fail = centre, spread, fail

        def log_weight(self, x):
            value = float(x.array[0])
            if self.fail and value > 0.5:
                return -np.inf, np.inf
            return self.spread * value, 0.0

    comm = MPI.COMM_SELF
    zero = PETSc.Vec().createSeq(1, comm=comm)
    zero.set(0.0)

    def draw(i):
        v = zero.duplicate()
        v.set(np.sin(1.0 + i))
        return v

    wide, narrow = Kernel(zero, 3.0), Kernel(zero, 0.5)
    choice, pilot = choose_centre("auto", {"map": wide, "laplace": narrow}, draw)
    spread = np.std([np.sin(1.0 + i) for i in range(8)])
    assert choice == "laplace"
    assert pilot["map"]["eta_std"] == pytest.approx(3.0 * spread, rel=1e-12)
    assert pilot["laplace"]["eta_std"] == pytest.approx(0.5 * spread, rel=1e-12)
    assert choose_centre("auto", {"map": narrow, "laplace": wide}, draw)[0] == "map"
    failing = Kernel(zero, 0.1, fail=True)
    choice, pilot = choose_centre("auto", {"map": wide, "laplace": failing}, draw)
    assert choice == "map" and pilot["laplace"]["failed"] > 0
    assert pilot["laplace"]["eta_std"] == float("inf")
    assert choose_centre("laplace", {"map": narrow, "laplace": wide}, draw) == ("laplace", {})
    assert choose_centre("map", {"map": wide, "laplace": narrow}, draw) == ("map", {})
    # one candidate: still the pilot, which says how well the reference fits
    choice, pilot = choose_centre("auto", {"map": wide}, draw)
    assert choice == "map" and pilot["map"]["eta_std"] == pytest.approx(3.0 * spread)


@pytest.mark.mpi
def test_hmc_step_check_bounds_the_stable_angle(comm):
    """A rank-6 reference leaves eigenvalues up to lambda_7 ~ 67 out: hmc_step_check's limit
    1/sqrt(lambda_7) separates accurate trajectories (half the limit: |log alpha| small) from
    unstable ones (2.5x: the energy error explodes); an uncapped spectrum passes."""
    import scipy.linalg

    from femkin.uq.sampling_study import hmc_step_check

    p, kernel, centre, *_ = _langevin(comm, 6, beta=0.3, leapfrog=10)
    lam = scipy.linalg.eigh(p.dense_H, p.dense_B, eigvals_only=True)[::-1]
    np.testing.assert_allclose(kernel.reference.eigenvalues, lam[:6], rtol=1e-6)
    uq = {
        "eigenvalues": list(lam[:6]),
        "threshold": 0.1,
        "spectrum": {"truncated": True, "omitted": {"largest": float(lam[6])}},
    }
    check = hmc_step_check({"leapfrog": 10, "beta": 0.3, "proposal": "laplace"}, uq)
    assert check["angle_limit"] == pytest.approx(1 / np.sqrt(lam[6]), rel=1e-12)
    assert not check["ok"] and "take beta <=" in check["note"]
    u = centre.copy()
    u.axpy(1.0, p.scatter(0.3 * np.cos(np.arange(p.template.getSize()))))
    eta_u, _, drift_u = kernel.evaluate(u)
    velocity = kernel.reference.sample(p.prior_sample(4))
    log_alpha = {}
    for f in (0.5, 2.5):
        x, *_, log_alpha[f] = kernel.trajectory(u, eta_u, drift_u, velocity, f / np.sqrt(lam[6]))
    assert abs(log_alpha[0.5]) < 0.2
    assert log_alpha[2.5] < -100
    uq["spectrum"] = {"truncated": False}
    assert hmc_step_check({"leapfrog": 10, "beta": 0.3, "proposal": "laplace"}, uq)["ok"]
    assert not hmc_step_check({"leapfrog": 10, "beta": 0.3, "proposal": "prior"}, uq)["ok"]
    assert hmc_step_check({"leapfrog": 0, "beta": 0.3}, uq) is None
