"""Model error in the likelihood (:mod:`femkin.uq.model_error`, ``PixelMisfit.with_model_error``).

- the Woodbury misfit equals the dense ``1/2 r^T (W^{-1} + U U^T)^{-1} r`` and its sources the
  dense derivatives, on a small random observation;
- on the tiny twin: the added covariance is the measured refined-minus-fit difference, the
  modified misfit passes the Taylor tests, refinement factors 1 add nothing and give the plain
  analysis bit for bit, and a real model error widens every coefficient's std.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from uq_problems import simulated_twin_fixture

from femkin._fem import MPI
from femkin.misfit import PixelMisfit
from femkin.observation import Observation

EPS = np.sqrt(np.finfo(float).eps)


class _Trajectory:
    """Frames at steps 0, 2, 4, ... of a list of states."""

    def __init__(self, states, frame_steps):
        self.states = states
        self.frame_steps = frame_steps

    def state(self, n):
        return self.states[n]


def _setup(include_first: bool, K: int = 2, seed: int = 0):
    rng = np.random.default_rng(seed)
    T, n_pix, n_dofs = 4, 7, 9
    B = sp.csr_matrix(
        rng.uniform(0, 1, (n_pix, n_dofs)) * (rng.uniform(size=(n_pix, n_dofs)) < 0.4)
    )
    obs = Observation(np.arange(n_pix), B, n_pix)
    data = rng.normal(size=(T, n_pix))
    sigma = rng.uniform(0.05, 0.2, size=(T, n_pix))
    weight = 1.0 / sigma**2
    weight[1, 3] = 0.0  # not observed
    states = [rng.normal(size=n_dofs) for _ in range(2 * T - 1)]
    traj = _Trajectory(states, [0, 2, 4, 6])
    U = rng.normal(scale=0.1, size=(K, T, n_pix))
    misfit = PixelMisfit(obs, data, weight, include_first=include_first)
    return misfit, traj, U, B


def _dense(misfit, traj, U, B):
    """The counted entries (frame, pixel), Gamma^{-1} and the residual, densely."""
    frames = sorted(misfit.frames(traj).items(), key=lambda nf: nf[1])
    rows = [(n, f, p) for n, f in frames for p in range(B.shape[0]) if misfit.weight[f, p] > 0]
    r = np.array([(B @ traj.state(n))[p] - misfit.data[f, p] for n, f, p in rows])
    W_inv = np.diag([1.0 / misfit.weight[f, p] for _, f, p in rows])
    Ud = np.array([[U[k, f, p] for _, f, p in rows] for k in range(U.shape[0])]).T
    return rows, np.linalg.inv(W_inv + Ud @ Ud.T), r


@pytest.mark.parametrize("include_first", [False, True])
def test_woodbury_misfit_equals_dense_covariance(include_first):
    misfit, traj, U, B = _setup(include_first)
    me = misfit.with_model_error(U, MPI.COMM_SELF)
    rows, G, r = _dense(me, traj, U, B)
    assert abs(me.cost(traj) - 0.5 * r @ G @ r) <= 1e-12 * abs(0.5 * r @ G @ r)
    # the term lowers the misfit: part of the residual is explained as model error
    assert me.cost(traj) < misfit.cost(traj)
    # dJ/du_n = B^T (Gamma^{-1} r)_n
    g_res = G @ r
    source = me.source(traj)
    for n in range(len(traj.states)):
        out = np.zeros(B.shape[1])
        source(n, out)
        expected = np.zeros(B.shape[1])
        for (m, _, p), v in zip(rows, g_res, strict=True):
            if m == n:
                expected += B[p].toarray().ravel() * v
        np.testing.assert_allclose(out, expected, rtol=1e-10, atol=1e-12)
    # Gauss-Newton: B^T Gamma^{-1} B du
    rng = np.random.default_rng(5)
    tangents = [rng.normal(size=B.shape[1]) for _ in traj.states]
    Bdu = np.array([(B @ tangents[n])[p] for n, _, p in rows])
    gn = G @ Bdu
    source = me.gauss_newton_source(traj, tangents)
    for n in range(len(traj.states)):
        out = np.zeros(B.shape[1])
        source(n, out)
        expected = np.zeros(B.shape[1])
        for (m, _, p), v in zip(rows, gn, strict=True):
            if m == n:
                expected += B[p].toarray().ravel() * v
        np.testing.assert_allclose(out, expected, rtol=1e-10, atol=1e-12)


def test_no_directions_is_the_plain_misfit():
    misfit, traj, U, _ = _setup(False)
    plain = misfit.with_model_error(U[:0], MPI.COMM_SELF)
    assert plain.model_error is None and plain.cost(traj) == misfit.cost(traj)
    with pytest.raises(ValueError, match="must be"):
        misfit.with_model_error(U[:, :2], MPI.COMM_SELF)


UQ_SECTION = """
[uq]
max_rank = 8
oversampling = 4
samples = 0
omitted_samples = 0
seed = 3
"""


@pytest.fixture(scope="module")
def twin():
    """The tiny twin case, simulated (no fit: the analysis runs at the initial point)."""
    yield from simulated_twin_fixture("femkin-me-", UQ_SECTION)


def _problem(case, refined=None):
    from femkin.inversion.fit import build_prior
    from femkin.study import build_problem, open_study

    study = open_study(case, MPI.COMM_WORLD)
    problem = build_problem(study, MPI.COMM_WORLD, refined=refined)
    x = problem.initial_vector()
    prior = build_prior(problem, study.case.inversion["prior"], x)
    return study, problem, prior, x


@pytest.mark.mpi
def test_added_covariance_is_the_measured_difference(twin):
    from femkin.uq.model_error import difference_videos, install, restore

    _, problem, _, x = _problem(twin)
    _, refined, _, _ = _problem(twin, refined=(0.5, 0.1, "uq.model_error_mesh"))
    assert refined.space.global_size > 2 * problem.space.global_size  # a finer mesh
    diffs = difference_videos(problem, refined, [x])
    # the difference measured directly: each model's fitted video at x
    problem.misfit(x)
    coarse = problem.fitted_video()
    from femkin.uq.model_error import transfer

    xr = transfer(problem, refined, x)
    refined.misfit(xr)
    fine = refined.fitted_video()
    if problem.comm.rank == 0:
        # (the second runs replay the first runs' steps: equal to round-off)
        np.testing.assert_allclose(diffs[0], fine - coarse, rtol=0, atol=1e-12)
    rms = np.sqrt(np.nanmean(diffs[0][1:] ** 2))
    assert rms > 1e-3  # Euler with dc_max 0.08 on a 1.5 px mesh: a real error
    # the transferred point keeps the scalars
    assert np.array_equal(
        refined.space.get_scalars(xr, "mu_h"), problem.space.get_scalars(x, "mu_h")
    )
    replaced = install(problem, 2.0 * diffs)
    for p in problem.particles.values():
        U = p.misfit.model_error[0]
        for f in range(1, diffs.shape[1]):  # frame 0 does not count (initial state not learned)
            np.testing.assert_array_equal(U[0, f], 2.0 * diffs[0, f].ravel()[p.obs.pixels])
        np.testing.assert_array_equal(U[0, 0], 0.0)
        # the added covariance U U^T at two pixels of frame 2 is 4 e_i e_j
        assert U[0, 2, 0] * U[0, 2, 1] == pytest.approx(
            4 * diffs[0, 2].ravel()[p.obs.pixels[:2]].prod()
        )
    restore(problem, replaced)
    assert all(p.misfit.model_error is None for p in problem.particles.values())


@pytest.mark.mpi
def test_modified_misfit_taylor(twin):
    from femkin.uq.model_error import difference_videos, install
    from femkin.verification import taylor_test

    _, problem, _, x = _problem(twin)
    _, refined, _, _ = _problem(twin, refined=(0.5, 0.1, "uq.model_error_mesh"))
    diffs = difference_videos(problem, refined, [x])
    install(problem, 3.0 * diffs)  # large against the noise: the correction dominates
    problem.set_newton_tolerances(1e-13, 1e-14)
    for block in ("mu_h", "m"):
        result = taylor_test(problem, x, block, steps=[1e-2, 5e-3, 2.5e-3, 1.25e-3], hessian=True)
        assert result.gradient.passed, result.gradient.reason
        assert result.hessian is not None and result.hessian.passed, result.hessian.reason


@pytest.mark.mpi
def test_identity_refinement_adds_nothing_and_real_error_widens(twin):
    from femkin.uq.laplace_study import analyse
    from femkin.uq.model_error import analyse_with_model_error, band_widths

    study, problem, prior, x = _problem(twin)
    settings = dict(study.case.uq)
    plain = analyse(problem, prior, x, settings)
    same = {**settings, "model_error": "map", "model_error_mesh": 1.0, "model_error_time": 1.0}
    result, summary = analyse_with_model_error(
        problem,
        prior,
        x,
        same,
        lambda: _problem(twin, refined=(1.0, 1.0, "uq.model_error_mesh"))[1],
    )
    assert summary["added_error_zero"]
    if MPI.COMM_WORLD.size == 1:
        assert summary["difference_max"] == 0.0
    # Two runs of the plain analysis on one problem may differ in the last bits (parallel
    # reductions; serially, measured 7e-15 relative on one machine), so the comparison allows
    # round-off.
    rtol = 1e-12
    np.testing.assert_allclose(result.eigenvalues, plain.eigenvalues, rtol=rtol, atol=0)
    np.testing.assert_allclose(result.covariance, plain.covariance, rtol=rtol, atol=0)
    # the centre, and so the bands, is the marginal mode ("auto", a learned m): its finite
    # differences of log dets amplify that round-off (measured 4e-12 relative)
    np.testing.assert_allclose(result.mean, plain.mean, rtol=1e-9, atol=0)
    for name in ("mu_h", "j0"):
        np.testing.assert_allclose(result.bands[name], plain.bands[name], rtol=1e-9, atol=0)

    real = {
        **settings,
        "model_error": "map",
        "model_error_mesh": 0.5,
        "model_error_time": 0.1,
        "model_error_scale": 3.0,
    }
    result, summary = analyse_with_model_error(
        problem,
        prior,
        x,
        real,
        lambda: _problem(twin, refined=(0.5, 0.1, "uq.model_error_mesh"))[1],
    )
    assert not summary["added_error_zero"] and summary["points"] == 1
    # less information: no coefficient's std shrinks (marginals certified to 1% in variance)
    ratios = {n: s / summary["std_without"][n] for n, s in summary["std_with"].items()}
    assert min(ratios.values()) > 0.99, ratios
    assert max(ratios.values()) > 1.05, ratios  # ln k0: the error biases the overall rate
    assert summary["without"]["converged"]
    for name in plain.names:  # the marginals without the term: the plain ones (1% in variance)
        expected = plain.std[plain.names.index(name)]
        assert summary["std_without"][name] == pytest.approx(expected, rel=0.01, abs=0)
    widths = band_widths(result.bands)
    assert summary["band_median_width"]["mu_h"]["with"] == widths["mu_h"]
    assert summary["band_median_width"]["mu_h"]["ratio"] > 0.99
    # the problem's misfits are the plain ones again
    assert all(p.misfit.model_error is None for p in problem.particles.values())


def test_samples_mode_uses_posterior_draws(twin):
    from femkin.uq.model_error import analyse_with_model_error

    study, problem, prior, x = _problem(twin)
    settings = {
        **study.case.uq,
        "model_error": "samples",
        "model_error_samples": 2,
        "model_error_scale": 3.0,
    }
    result, summary = analyse_with_model_error(
        problem,
        prior,
        x,
        settings,
        lambda: _problem(twin, refined=(0.5, 0.1, "uq.model_error_mesh"))[1],
    )
    assert summary["points"] + summary["failed_points"] == 3 and summary["points"] >= 2
    assert summary["rank"] == summary["points"] and summary["mesh_refined"]
    assert summary["without"]["method"] == "Laplace analysis"
    # the draws differ from the MAP point: their differences are not the MAP point's
    rms = summary["difference_rms"]
    assert len(set(rms)) == len(rms) and min(rms) > 1e-4
    ratios = {n: s / summary["std_without"][n] for n, s in summary["std_with"].items()}
    assert min(ratios.values()) > 0.99 and max(ratios.values()) > 1.05, ratios
    assert all(p.misfit.model_error is None for p in problem.particles.values())


def test_diagonal_form_adds_pixel_variances(twin):
    from femkin.uq.model_error import install, restore

    _, problem, _, _ = _problem(twin)
    T, H, W = problem.video.c.shape
    rng = np.random.default_rng(4)
    directions = rng.normal(scale=0.01, size=(2, T, H, W))
    replaced = install(problem, directions, form="diagonal")
    for label, p in problem.particles.items():
        old = replaced[label]
        assert p.misfit.model_error is None
        added = sum(d.reshape(T, -1)[:, p.obs.pixels] ** 2 for d in directions)
        seen = old.weight > 0
        np.testing.assert_allclose(
            1.0 / p.misfit.weight[seen], 1.0 / old.weight[seen] + added[seen], rtol=1e-13
        )
        assert np.all(p.misfit.weight[~seen] == 0.0)
    restore(problem, replaced)
    with pytest.raises(ValueError, match="form"):
        install(problem, directions, form="dense")
