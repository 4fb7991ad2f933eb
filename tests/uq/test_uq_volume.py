"""The field volume term of the coefficients' Laplace marginal (femkin.uq.volume).

A toy with a known log det: parameters ``x = (theta, u)``, ``theta`` one coefficient (global
index 0), ``u`` a field of ``n`` entries with a diagonal prior precision ``b``; the misfit
Hessian is ``s(x)^2 K`` with ``s(x) = theta + a . u`` and ``K`` SPD, so

    1/2 log det(I + B_uu^{-1} H_uu) = 1/2 sum_i log(1 + s^2 kappa_i),

``kappa_i`` the eigenvalues of ``B_uu^{-1/2} K_uu B_uu^{-1/2}``, and its derivative along
``t = (1, tau)`` is ``sum_i s kappa_i (1 + a . tau) / (1 + s^2 kappa_i)``. Vectors are
distributed over the ranks.
"""

from __future__ import annotations

import numpy as np
import pytest
from uq_problems import simulated_twin_fixture

from femkin._fem import MPI, PETSc
from femkin.uq.volume import field_basis, half_log_det, volume_correction

N_FIELD = 9


class Toy:
    def __init__(self, comm, n=N_FIELD, seed=5):
        rng = np.random.default_rng(seed)
        self.comm = comm
        self.n = n + 1
        g = rng.standard_normal((self.n, self.n))
        self.K = g @ g.T / self.n + 0.1 * np.eye(self.n)  # couples theta and u: zeroed out
        self.b = np.concatenate([[1.0], rng.uniform(0.5, 2.0, n)])
        self.a = np.concatenate([[0.0], 0.3 * rng.standard_normal(n)])
        self.point = np.zeros(self.n)
        self.fail_below = -np.inf  # set_point fails where theta is below this

    def vec(self, values):
        v = PETSc.Vec().createMPI(self.n, comm=self.comm)
        lo, hi = v.getOwnershipRange()
        v.getArray()[:] = np.asarray(values, dtype=float)[lo:hi]
        return v

    def full(self, v):
        return np.concatenate(self.comm.allgather(v.getArray(readonly=True).copy()))

    def s(self, x):
        return x[0] + self.a @ x

    def apply_B(self, v, out):
        lo, hi = v.getOwnershipRange()
        out.getArray()[:] = self.b[lo:hi] * v.getArray(readonly=True)

    def apply_H_batch(self, vs, outs):
        h = self.s(self.point) ** 2 * self.K
        for v, out in zip(vs, outs, strict=True):
            lo, hi = out.getOwnershipRange()
            out.getArray()[:] = (h @ self.full(v))[lo:hi]

    def set_point(self, y):
        self.point = self.full(y)
        return bool(self.point[0] >= self.fail_below)

    def zero_coefficients(self, v):
        lo, _ = v.getOwnershipRange()
        if lo == 0:
            v.getArray()[0] = 0.0

    def exact(self, x, tau):
        """(1/2 log det, its derivative along (1, tau)) of the field block at x."""
        sb = 1.0 / np.sqrt(self.b[1:])
        kappa = np.linalg.eigvalsh(sb[:, None] * self.K[1:, 1:] * sb[None, :])
        s = self.s(x)
        value = 0.5 * np.sum(np.log1p(s**2 * kappa))
        slope = np.sum(s * kappa * (1.0 + self.a[1:] @ tau) / (1.0 + s**2 * kappa))
        return value, slope


def _eigenvector_like(toy, count, seed=9):
    """Random vectors with coefficient entries: the field parts span the field space."""
    rng = np.random.default_rng(seed)
    return [toy.vec(rng.standard_normal(toy.n)) for _ in range(count)]


@pytest.mark.mpi
def test_field_basis_is_b_orthonormal_and_spans_the_field():
    toy = Toy(MPI.COMM_WORLD)
    vs = _eigenvector_like(toy, N_FIELD + 2)  # more vectors than field dofs: dependent parts
    basis = field_basis(vs, toy.zero_coefficients, toy.apply_B)
    assert len(basis) == N_FIELD
    w = np.array([toy.full(v) for v in basis]).T
    assert np.allclose(w[0], 0.0)  # no coefficient part
    assert np.allclose(w.T @ (toy.b[:, None] * w), np.eye(N_FIELD), atol=1e-10)
    # the full field space: the projector W W^T B is the identity on it
    assert np.allclose((w @ w.T * toy.b[None, :])[1:, 1:], np.eye(N_FIELD), atol=1e-9)


@pytest.mark.mpi
def test_half_log_det_and_its_slope_match_the_closed_form():
    toy = Toy(MPI.COMM_WORLD)
    basis = field_basis(_eigenvector_like(toy, N_FIELD), toy.zero_coefficients, toy.apply_B)
    x_values = np.concatenate([[0.8], 0.2 * np.sin(np.arange(N_FIELD))])
    tau = 0.5 * np.cos(np.arange(N_FIELD))
    x, t = toy.vec(x_values), toy.vec(np.concatenate([[1.0], tau]))
    value, slope = toy.exact(x_values, tau)
    toy.set_point(x)
    assert half_log_det(toy.apply_H_batch, basis) == pytest.approx(value, rel=1e-12)
    cov = np.array([[0.04]])
    res = volume_correction(toy.set_point, toy.apply_H_batch, basis, x, [t], [1e-4], cov)
    assert res.gradient[0] == pytest.approx(slope, rel=1e-6)
    assert res.half_log_det == pytest.approx(value, rel=1e-12)
    assert res.shift[0] == pytest.approx(-0.04 * slope, rel=1e-6)
    assert (res.rank, res.hessian_actions, res.forward_runs, res.failed) == (N_FIELD, 27, 3, [])
    assert np.allclose(toy.point, x_values)  # linearised at x again afterwards


@pytest.mark.mpi
def test_a_failed_perturbed_run_halves_the_step_then_gives_no_slope():
    toy = Toy(MPI.COMM_WORLD)
    basis = field_basis(_eigenvector_like(toy, N_FIELD), toy.zero_coefficients, toy.apply_B)
    x_values = np.concatenate([[0.8], np.zeros(N_FIELD)])
    x, t = toy.vec(x_values), toy.vec(np.concatenate([[1.0], np.zeros(N_FIELD)]))
    toy.fail_below = 0.75  # theta - 0.1 fails, theta - 0.05 (one halving) does not
    res = volume_correction(toy.set_point, toy.apply_H_batch, basis, x, [t], [0.1], np.eye(1))
    value, slope = toy.exact(x_values, np.zeros(N_FIELD))
    assert res.failed == [] and res.steps[0] == 0.05
    assert res.gradient[0] == pytest.approx(slope, rel=1e-2)
    # a forward run as far out as 1e-4 below fails: four step sizes tried, then no slope
    toy.fail_below = 0.8 - 1e-4
    res = volume_correction(toy.set_point, toy.apply_H_batch, basis, x, [t], [0.1], np.eye(1))
    assert res.failed == [0] and res.gradient[0] == 0.0 and res.shift[0] == 0.0
    assert res.forward_runs == 4 * 2 + 1 and res.hessian_actions == 4 * N_FIELD + N_FIELD
    assert np.allclose(toy.point, x_values)


# -- on the tiny twin: the log det of the m block against a dense assembly ---------------------
UQ_SECTION = """
[uq]
max_rank = 200
oversampling = 4
samples = 0
omitted_samples = 0
coefficient_mean = "marginal"
seed = 3
"""


@pytest.fixture(scope="module")
def twin():
    """The tiny twin case, simulated (no fit: the analysis runs at the initial point)."""
    yield from simulated_twin_fixture("femkin-volume-", UQ_SECTION)


def _dense_half_log_det(problem, prior, x) -> float:
    """1/2 log det(I + B_mm^{-1} H_mm) of the Gauss-Newton m block, assembled column by column."""
    import scipy.linalg

    space = problem.space
    problem.misfit(x)
    n = space.global_size
    columns = []
    for j in range(n):
        e = space.create_vector()
        lo, hi = e.getOwnershipRange()
        if lo <= j < hi:
            e.getArray()[j - lo] = 1.0
        columns.append(e)
    h_cols = [c.duplicate() for c in columns]
    problem.hessian_mult_batch(columns, h_cols, gauss_newton=True)
    b_cols = [c.duplicate() for c in columns]
    for c, bc in zip(columns, b_cols, strict=True):
        prior.precision_mult(c, bc)
    comm = problem.comm

    def dense(vs):
        return np.array(
            [np.concatenate(comm.allgather(v.getArray(readonly=True).copy())) for v in vs]
        )

    H, B = dense(h_cols), dense(b_cols)
    m_dofs = np.flatnonzero(np.concatenate(comm.allgather(space.block_mask("m"))))
    H, B = H[np.ix_(m_dofs, m_dofs)], B[np.ix_(m_dofs, m_dofs)]
    lam = scipy.linalg.eigh(0.5 * (H + H.T), 0.5 * (B + B.T), eigvals_only=True)
    return 0.5 * float(np.sum(np.log1p(np.maximum(lam, -1 + 1e-12))))


@pytest.mark.mpi
def test_marginal_mode_on_the_twin_uses_the_log_det_of_the_m_block(twin):
    from femkin.inversion.fit import build_prior
    from femkin.study import build_problem, open_study
    from femkin.uq.laplace_study import analyse

    study = open_study(twin, MPI.COMM_WORLD)
    problem = build_problem(study, MPI.COMM_WORLD)
    x = problem.initial_vector()
    prior = build_prior(problem, study.case.inversion["prior"], x)
    result = analyse(problem, prior, x, study.case.uq)
    mm = result.marginal_mode
    n_m = int(np.sum(np.concatenate(problem.comm.allgather(problem.space.block_mask("m")))))
    assert mm is not None and mm["failed"] == [] and mm["field_rank"] <= n_m
    # every informed m direction is in the basis: the log det is the dense one
    assert mm["half_log_det"] == pytest.approx(_dense_half_log_det(problem, prior, x), rel=1e-8)
    assert mm["half_log_det"] > 1.0
    # the mean moved by -C g from the MAP values; the bands are centred on it
    np.testing.assert_allclose(
        result.mean - result.map_values,
        -result.covariance @ np.array(mm["half_log_det_gradient"]),
        rtol=1e-12,
        atol=1e-14,
    )
    assert np.any(np.abs(mm["shift_over_std"]) > 1e-3)
    payload = result.to_json(study.case.uq)
    assert payload["coefficients"]["mu_h"]["map"] == result.map_values[:2].tolist()
    assert "Laplace marginal" in " ".join(payload["notes"])


@pytest.mark.mpi
def test_default_centre_after_a_converged_fit_is_the_marginal_mode():
    """``femkin invert`` to convergence, then ``femkin uq`` with the default ``"auto"``: the
    coefficients move to their marginal mode; with ``"map"`` they stay at the MAP point, with the
    same covariance (the centre does not change it)."""
    import json
    import shutil

    from uq_problems import simulated_twin

    from femkin.cli import main

    comm = MPI.COMM_WORLD
    section = "\n[uq]\nmax_rank = 20\nsamples = 0\nomitted_samples = 0\nseed = 3\n"
    root, case = simulated_twin("femkin-centre-", 40, section)
    try:
        assert main(["invert", str(case), "--quiet"]) == 0
        assert main(["uq", str(case), "--quiet"]) == 0
        auto = json.loads((case / "results" / "uq.json").read_text())
        auto_report = (case / "results" / "report.md").read_text()
        with np.load(case / "checkpoints" / "laplace.npz") as saved:
            laplace = {k: saved[k] for k in saved.files if not k.startswith("v")}
        comm.barrier()
        if comm.rank == 0:  # femkin sample's proposal is centred there
            with open(case / "case.toml", "a") as f:
                f.write("\n[sample]\nchains = 1\nsteps = 4\nbeta = 0.5\n")
        comm.barrier()
        assert main(["sample", str(case), "--quiet"]) == 0
        mcmc = json.loads((case / "results" / "mcmc.json").read_text())
        comm.barrier()
        if comm.rank == 0:
            text = (case / "case.toml").read_text().split("\n[sample]")[0]
            (case / "case.toml").write_text(text + "\n")
        comm.barrier()
        if comm.rank == 0:
            with open(case / "case.toml", "a") as f:  # [uq] is the file's last section
                f.write('coefficient_mean = "map"\n')
        comm.barrier()
        assert main(["uq", str(case), "--quiet"]) == 0
        at_map = json.loads((case / "results" / "uq.json").read_text())
        with np.load(case / "checkpoints" / "laplace.npz") as saved:
            map_files = list(saved.files)
    finally:
        comm.barrier()
        if comm.rank == 0:
            shutil.rmtree(root, ignore_errors=True)
    assert auto["fit"]["converged"] is True
    assert auto["coefficient_mean"] == {"setting": "auto", "used": "marginal", "reason": None}
    assert at_map["coefficient_mean"] == {"setting": "map", "used": "map", "reason": None}
    assert "marginal_mode" not in at_map
    names = auto["coefficient_names"]
    mean = np.concatenate([v["mean"] for v in auto["coefficients"].values()])
    map_values = np.concatenate([v["map"] for v in auto["coefficients"].values()])
    std = np.concatenate([v["std"] for v in auto["coefficients"].values()])
    mm = auto["marginal_mode"]
    np.testing.assert_allclose(mean - map_values, mm["shift"], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose((mean - map_values) / std, mm["shift_over_std"], rtol=1e-10)
    # a real move (1.1 std for mu_h[1] and j0 on this twin), within the one step's reach
    assert 0.3 < max(abs(s) for s in mm["shift_over_std"]) < 3.0, mm["shift_over_std"]
    assert mm["failed"] == [] and mm["forward_runs"] == 2 * len(names) + 2
    for block, v in at_map["coefficients"].items():
        assert v["mean"] == v["map"] == auto["coefficients"][block]["map"]
        np.testing.assert_allclose(v["std"], auto["coefficients"][block]["std"], rtol=1e-10)
    # the saved Laplace mean: the reported coefficients, the m field at its conditional mean
    # (moved from the MAP field); "map" saves none and the proposal stays at the MAP point
    for block, v in auto["coefficients"].items():
        np.testing.assert_array_equal(laplace[f"centre|{block}"], v["mean"])
        np.testing.assert_array_equal(laplace[f"map|{block}"], v["map"])
    dm = np.abs(laplace["centre|m/1"] - laplace["map|m/1"]).max()
    assert 1e-3 < dm < 1.0, dm
    assert not any(k.startswith("centre|") for k in map_files)
    # "auto": the centre whose Laplace Gaussian fits the posterior better in the pilot
    pilot = mcmc["centre_pilot"]
    assert set(pilot) == {"map", "laplace"}
    assert all(np.isfinite(v["eta_std"]) and v["failed"] == 0 for v in pilot.values())
    best = min(pilot, key=lambda k: pilot[k]["eta_std"])
    assert (
        mcmc["proposal_centre"]
        == {
            "map": "the MAP point",
            "laplace": "the coefficients' marginal mode",
        }[best]
    )
    report = auto_report.splitlines()
    mu_h_line = next(line for line in report if line.startswith("- mu_h: mean"))
    assert "(joint MAP [" in mu_h_line, mu_h_line


# -- which centre: [uq] coefficient_mean ------------------------------------------------------
@pytest.mark.parametrize(
    "setting, fields, fit, marginals, used, why",
    [
        ("auto", True, True, True, True, None),
        ("auto", True, None, True, True, None),  # not known (a library call): as converged
        ("auto", True, False, True, False, "did not converge"),
        ("auto", True, True, False, False, "marginals did not converge"),
        ("auto", False, True, True, False, None),  # no field: the joint MAP is the mode
        ("map", True, True, True, False, None),
        ("marginal", True, True, True, True, None),
        ("marginal", False, True, True, True, None),
        ("marginal", True, True, False, True, "may overshoot"),
        ("marginal", True, False, True, False, "did not converge"),
    ],
)
def test_centre_choice(setting, fields, fit, marginals, used, why):
    from femkin.uq.laplace_study import centre_choice

    take, reason = centre_choice(
        setting,
        coefficients=True,
        fields_learned=fields,
        fit_converged=fit,
        marginals_converged=marginals,
    )
    assert take is used
    assert (reason is None) if why is None else (why in reason)
    # no global coefficients: nothing to centre, whatever is asked
    assert centre_choice(
        setting,
        coefficients=False,
        fields_learned=fields,
        fit_converged=fit,
        marginals_converged=marginals,
    ) == (False, None)
