"""``femkin uq`` on the tiny twin case: uq.json, std maps, bands, partition independence."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from uq_problems import simulated_twin
from workflow_case import write_case

from femkin._fem import MPI
from femkin.cli import main

UQ_SECTION = """
[uq]
max_rank = 20
oversampling = 5
samples = 4
seed = 7
"""


@pytest.fixture(scope="module")
def inverted_case():
    """A twin case simulated, inverted (6 iterations, serially) and run through ``femkin uq``."""
    comm = MPI.COMM_WORLD
    root, case = simulated_twin("femkin-uq-", 6, UQ_SECTION)
    from femkin.commands.uq import uq
    from femkin.errors import InputError

    try:
        uq(case, quiet=True)
        missing_error = None
    except InputError as err:
        missing_error = str(err)
    # The fit itself runs on rank 0 alone (its parallel runs are tested in test_workflow);
    # the UQ step runs on all ranks from the checkpointed MAP point.
    if comm.rank == 0:
        from femkin.commands.invert import invert

        invert(case, quiet=True, comm=MPI.COMM_SELF)
    comm.barrier()
    assert main(["uq", str(case), "--quiet"]) == 0
    yield case, missing_error
    comm.barrier()
    if comm.rank == 0:
        shutil.rmtree(root, ignore_errors=True)


def _uq_json(case):
    return json.loads((case / "results" / "uq.json").read_text())


@pytest.mark.mpi
def test_uq_without_inversion_asks_for_it(inverted_case):
    _, message = inverted_case
    assert message is not None and "femkin invert" in message and "state.npz" in message


@pytest.mark.mpi
def test_uq_json_fields_and_shapes(inverted_case):
    case, _ = inverted_case
    uq = _uq_json(case)
    lam = np.array(uq["eigenvalues"])
    assert uq["rank"] == lam.size and 10 <= lam.size <= 20
    assert np.all(np.diff(lam) <= 0) and lam[0] > 100 * lam[-1] > 0
    assert list(uq["coefficients"]) == ["mu_h", "j0", "k0"]
    sizes = {k: len(v["mean"]) for k, v in uq["coefficients"].items()}
    assert sizes == {"mu_h": 2, "j0": 1, "k0": 1}
    corr = np.array(uq["correlation"])
    assert corr.shape == (4, 4)
    assert np.allclose(np.diag(corr), 1.0) and np.allclose(corr, corr.T)
    assert np.all(np.abs(corr) <= 1.0 + 1e-12)
    assert uq["coefficient_names"] == ["mu_h[1]", "mu_h[2]", "j0", "k0"]
    # the k0 block is ln k0: its MAP lies near the truth ln(2e-3), far from k0 itself
    assert abs(uq["coefficients"]["k0"]["mean"][0] - np.log(2e-3)) < 1.0
    # the 6-iteration fit stops on its budget: the default centre ("auto") stays at the fit's
    # point, says why, and with the m field learned the notes say where the joint MAP's bias
    # comes from and how to move to the marginal mode
    assert uq["fit"]["converged"] is False
    assert uq["coefficient_mean"]["setting"] == "auto"
    assert uq["coefficient_mean"]["used"] == "map"
    assert "did not converge" in uq["coefficient_mean"]["reason"]
    assert uq["coefficient_mean"]["reason"] in uq["notes"]
    assert all(v["mean"] == v["map"] for v in uq["coefficients"].values())
    assert "marginal_mode" not in uq
    assert any('"auto" or "marginal"' in n for n in uq["notes"]), uq["notes"]
    for block, v in uq["coefficients"].items():
        std, prior = np.array(v["std"]), np.array(v["prior_std"])
        assert np.all(std > 0), block
        # every global coefficient is informed by the video: clearly below the prior std 2
        assert np.all(std < 0.8 * prior), (block, std, prior)
    assert uq["hessian_actions"] >= 2 * (lam.size + 5)
    assert set(uq["wall_time"]) >= {"gradient", "eigensolver", "posterior", "samples", "total"}
    report = (case / "results" / "report.md").read_text()
    assert "## Uncertainty" in report and f"Hessian rank: {uq['rank']}" in report


@pytest.mark.mpi
def test_exact_marginals_and_rank_decision_reported(inverted_case):
    case, _ = inverted_case
    uq = _uq_json(case)
    mg, sp = uq["marginals"], uq["spectrum"]
    assert mg["converged"] and mg["method"] in ("certified", "estimated")
    assert mg["relative_gap"] <= mg["tolerance"] or mg["estimated_error"] <= mg["tolerance"]
    assert np.all(np.array(mg["lower_std"]) > 0)
    assert mg["hessian_actions"] >= 4  # at least one action per coefficient
    for block, v in uq["coefficients"].items():
        std, low = np.array(v["std"]), np.array(v["low_rank_std"])
        # the exact marginal is never wider than the low-rank one (up to the Ritz error)
        assert np.all(std <= low * (1 + 1e-6)), (block, std, low)
    lam = np.array(uq["eigenvalues"])
    assert sp["max_rank"] == 20
    assert sp["truncated"] == bool(lam.size >= 20 and lam[-1] >= uq["threshold"])
    if sp["truncated"]:
        om = sp["omitted"]
        # the Ritz values underestimate the tail, so the largest omitted one may exceed lam[-1]
        assert 0 < om["largest"] <= om["trace"] + 4 * om["trace_error"]
    report = (case / "results" / "report.md").read_text()
    assert "Coefficient marginals exact" in report or "NOT converged" in report
    assert ("cut the spectrum" in report) == sp["truncated"]


@pytest.mark.mpi
def test_posterior_predictive_check(inverted_case):
    case, _ = inverted_case
    uq = _uq_json(case)
    res = uq["predictive_check"]["residuals"]
    assert res["n"] > 100 and sum(res["histogram"]["counts"]) == res["n"]
    # a twin with known noise: the residuals at the (nearly converged) MAP point are ~N(0, 1)
    assert abs(res["mean"]) < 0.3 and 0.7 < res["std"] < 1.3, res
    assert res["beyond_3"] < 0.03
    p = uq["c_t"]["particles"]["1"]
    assert np.all(np.array(p["pred_lo"]) <= np.array(p["map"]))
    # the predictive band holds the model band's spread plus the noise of the average
    model_half = np.array(p["std"]) * 1.959963984540054
    assert np.all(np.array(p["pred_hi"]) - np.array(p["map"]) >= model_half - 1e-12)
    assert 0.0 <= uq["predictive_check"]["c_t"]["coverage"] <= 1.0
    assert (case / "results" / "uq_ppc.png").exists()
    assert "Posterior predictive check" in (case / "results" / "report.md").read_text()


@pytest.mark.mpi
def test_ln_k_std_map(inverted_case):
    case, _ = inverted_case
    std = np.load(case / "results" / "k_std_1.npy")
    prior = np.load(case / "results" / "k_prior_std_1.npy")
    mask = np.load(case / "simulated" / "video.npz")["mask"]
    inside = mask == 1
    assert std.shape == mask.shape
    assert np.all(np.isnan(std[~inside])) and np.all(np.isfinite(std[inside]))
    assert np.all(std[inside] > 0)
    assert np.all(std[inside] < prior[inside])
    # the prior of ln k = ln k0 + m has std about sqrt(2^2 + 0.5^2); the data cut it a lot
    assert 2.0 < np.mean(prior[inside]) < 2.2
    assert np.mean(std[inside]) < 0.5 * np.mean(prior[inside])


@pytest.mark.mpi
def test_curve_bands_are_the_linear_propagation_of_the_coefficients(inverted_case):
    case, _ = inverted_case
    uq = _uq_json(case)
    std = np.concatenate([v["std"] for v in uq["coefficients"].values()])
    cov = np.array(uq["correlation"]) * np.outer(std, std)
    for name, rows in (("mu_h", [0, 1]), ("j0", [2])):
        data = np.genfromtxt(case / "results" / f"{name}.csv", delimiter=",", names=True)
        c, value, lo, hi = data["c"], data[name], data["lo"], data["hi"]
        assert np.all(lo <= value) and np.all(value <= hi)
        x = 1 - 2 * c
        # ln j0 = b_1 P_1(1 - 2c) vanishes at c = 1/2: no uncertainty there
        assert np.all((hi - lo)[np.abs(x) > 1e-9] > 0)
        jac = np.column_stack([x, 0.5 * (3 * x**2 - 1)])[:, : len(rows)]
        sub = cov[np.ix_(rows, rows)]
        half = 1.959963984540054 * np.sqrt(np.einsum("ji,ik,jk->j", jac, sub, jac))
        if name == "mu_h":
            assert np.allclose(hi - value, half, rtol=1e-6, atol=1e-8)
        else:  # the band of ln j0, exponentiated
            assert np.allclose(np.log(hi / value), half, rtol=1e-6, atol=1e-8)
            assert np.allclose(np.log(value / lo), half, rtol=1e-6, atol=1e-8)


@pytest.mark.mpi
def test_c_t_band_from_posterior_samples(inverted_case):
    case, _ = inverted_case
    c_t = _uq_json(case)["c_t"]
    assert c_t["samples"] == 4 and c_t["failed"] == 0 and len(c_t["t"]) == 5
    p = c_t["particles"]["1"]
    lo, hi, mp = (np.array(p[k]) for k in ("lo", "hi", "map"))
    assert np.all(lo <= hi) and np.all(hi[1:] - lo[1:] > 0)
    # the particle lithiates; the band is near the MAP prediction (not centred on it: the
    # forward model is far from linear over the posterior's spread in mu_h and j0)
    assert mp[-1] > mp[0] + 0.1
    assert np.all(lo - 0.2 < mp) and np.all(mp < hi + 0.2)
    for name in ("uq_c_t.png", "uq_k_std.png", "curves.png"):
        assert (case / "results" / name).exists(), name


@pytest.mark.mpi
def test_eigenvalues_do_not_depend_on_the_partition(inverted_case):
    """Under mpirun the case was analysed on 2 ranks; redo it on rank 0 alone."""
    case, _ = inverted_case
    comm = MPI.COMM_WORLD
    lam_world = np.array(_uq_json(case)["eigenvalues"])
    if comm.rank == 0:
        from femkin.inversion.checkpoint import read_checkpoint
        from femkin.inversion.fit import build_prior
        from femkin.study import build_problem, checkpoint_path, checkpoint_settings, open_study
        from femkin.uq.laplace_study import analyse

        self_comm = MPI.COMM_SELF
        study = open_study(case, self_comm)
        problem = build_problem(study, self_comm)
        x = problem.initial_vector()
        prior = build_prior(problem, study.case.inversion["prior"], x)
        _, case_hash = checkpoint_settings(study, problem)
        state = read_checkpoint(checkpoint_path(study.case), problem.space, x, case_hash=case_hash)
        problem.set_schedules(state.get("schedules", {}))
        result = analyse(problem, prior, x, {**study.case.uq, "samples": 0})
        lam_self = result.eigenvalues
        ok = lam_self.size == lam_world.size and np.allclose(lam_self, lam_world, rtol=1e-6, atol=0)
        detail = (lam_self.tolist(), lam_world.tolist())
    else:
        ok, detail = True, None
    ok = comm.allreduce(ok, op=MPI.LAND)
    assert ok, comm.bcast(detail, root=0)


def test_prior_pointwise_variance_exact_and_sampled(tmp_path):
    """The exact BiLaplacian diagonal against unit-vector covariance actions, and the
    sampled estimator within its statistical error."""
    from femkin._fem import MPI as _MPI
    from femkin.inversion.fit import build_prior
    from femkin.study import build_problem, open_study
    from femkin.uq.laplace_study import bilaplacian_pointwise_variance

    case = write_case(tmp_path / "case")
    text = (case / "case.toml").read_text()
    (case / "case.toml").write_text(text.replace("[data]\n", "[data]\nsigma = 0.05\n"))
    comm = _MPI.COMM_SELF
    study = open_study(case, comm, simulated=False)
    problem = build_problem(study, comm)
    x0 = problem.initial_vector()
    prior = build_prior(problem, study.case.inversion["prior"], x0)
    bl = prior.priors[("m", 1)]
    exact, method = bilaplacian_pointwise_variance(bl)
    assert method == "exact"
    n = exact.size
    e, y = bl.create_vector(), bl.create_vector()
    for i in np.linspace(0, n - 1, 7).astype(int):
        e.set(0.0)
        e.setValue(i, 1.0)
        e.assemble()
        bl.covariance_mult(e, y)
        assert abs(y.getValue(i) - exact[i]) < 1e-9 * exact[i]
    ex = exact
    # pointwise std near the requested 0.5 (the Robin term keeps the boundary close to it)
    assert 0.35 < np.sqrt(ex.min()) and np.sqrt(ex.max()) < 0.75
    sampled, method = bilaplacian_pointwise_variance(bl, samples=800, exact_limit=0)
    assert method == "sampled(800)"
    # The sampled estimator draws A^{-1} M_L^{1/2} z: its covariance uses the lumped mass, which
    # overstates Gamma by a mesh-dependent factor (1.3-1.9 here), so it is checked loosely.
    rel = np.abs(sampled / ex - 1.0)
    assert np.all(sampled > ex * 0.8)
    assert np.median(rel) < 0.6, np.median(rel)


@pytest.mark.mpi
def test_fitted_fields_for_paraview(inverted_case):
    """Per particle: k = k0 exp(m) and the posterior std of ln k on the mesh, c and mu at the
    frame times, all named in the report; the std on the dofs brackets its pixel values (the
    pixel map interpolates the dof values).
    """
    import h5py

    case, _ = inverted_case
    if MPI.COMM_WORLD.rank != 0:
        return
    out = case / "results"
    summary = json.loads((out / "summary.json").read_text())
    report = (out / "report.md").read_text()
    n_frames = len(_uq_json(case)["c_t"]["t"])
    k0 = summary["coefficients"]["k0"]
    for label, stats in _uq_json(case)["ln_k_std"].items():
        for name in (f"particle_{label}_fields.xdmf", f"particle_{label}_c_mu.xdmf"):
            assert name in summary["fields"] and f"`{name}`" in report
        with h5py.File(out / f"particle_{label}_fields.h5") as f:
            k, m = f["Function/k/0"][...].ravel(), f["Function/m/0"][...].ravel()
            std = f["Function/ln_k_std/0"][...].ravel()
        np.testing.assert_allclose(k, k0 * np.exp(m), rtol=1e-12)
        assert np.ptp(m) > 0.01  # the fitted m, not a zero field
        assert std.min() <= stats["min"] + 1e-12 and std.max() >= stats["max"] - 1e-12
        assert std.min() > 0
        with h5py.File(out / f"particle_{label}_c_mu.h5") as f:
            assert len(f["Function/c"]) == n_frames and len(f["Function/mu"]) == n_frames


@pytest.mark.mpi
def test_sample_runs_resumes_and_reports(inverted_case):
    """femkin sample: 2 chains (one MPI group each under mpirun -n 2), checkpointed; a longer
    second run resumes them and equals an uninterrupted run of that length."""
    case, _ = inverted_case
    comm = MPI.COMM_WORLD

    def set_steps(steps, langevin=False, leapfrog=0):
        if comm.rank == 0:
            text = (case / "case.toml").read_text().split("\n[sample]")[0]
            text += (
                f"\n[sample]\nchains = 2\nsteps = {steps}\nburn = 0.25\n"
                f"beta = {0.2 if langevin or leapfrog else 0.5}\ncheckpoint_every = 5\n"
                f"seed = 3\nlangevin = {str(langevin).lower()}\nleapfrog = {leapfrog}\n"
            )
            (case / "case.toml").write_text(text)
        comm.barrier()

    def straight_run():  # the chains afresh, for the uninterrupted answer
        comm.barrier()
        if comm.rank == 0:
            for c in (0, 1):
                (case / "checkpoints" / f"mcmc_chain{c}.npz").unlink()
        comm.barrier()
        assert main(["sample", str(case), "--quiet"]) == 0
        return json.loads((case / "results" / "mcmc.json").read_text())

    set_steps(10)
    assert main(["sample", str(case), "--quiet"]) == 0
    first = json.loads((case / "results" / "mcmc.json").read_text())
    assert first["chains"] == 2 and first["steps_per_chain"] == [10, 10]
    assert (case / "checkpoints" / "mcmc_chain1.npz").exists()
    set_steps(14)
    assert main(["sample", str(case), "--quiet"]) == 0
    resumed = json.loads((case / "results" / "mcmc.json").read_text())
    assert resumed["resumed_from"] == {"0": 10, "1": 10}
    straight = straight_run()
    assert straight["resumed_from"] == {"0": 0, "1": 0}
    assert straight["acceptance"] == resumed["acceptance"]
    for name, v in straight["coefficients"].items():
        assert v["mean"] == resumed["coefficients"][name]["mean"], name
    # the Laplace proposal is accepted often on this well-posed twin; the fit did not converge,
    # so the proposal stays centred on its point
    assert straight["acceptance_overall"] > 0.2
    assert straight["proposal_centre"] == "the MAP point"
    uq = _uq_json(case)
    for v in straight["coefficients"].values():
        assert {"ess", "rhat", "laplace_std", "std_ratio"} <= set(v)
    assert set(straight["coefficients"]) == set(uq["coefficient_names"])
    data = np.genfromtxt(case / "results" / "mu_h.csv", delimiter=",", names=True)
    assert {"lo", "hi", "mcmc_lo", "mcmc_hi"} <= set(data.dtype.names)
    assert np.all(data["mcmc_lo"] <= data["mcmc_hi"])
    assert (case / "results" / "mcmc_bands.png").exists()
    # 14 steps: too few for a verdict, and the report says so (once, after three runs)
    check = straight["laplace_check"]
    assert check["trusted"] is False and check["agree"] is None
    assert "not converged" in check["verdict"]
    from femkin.report import MCMC_HEADING

    report = (case / "results" / "report.md").read_text()
    assert report.count(MCMC_HEADING) == 1
    assert f"| {uq['coefficient_names'][0]} |" in report.split(MCMC_HEADING)[1]
    # pCN-Langevin: the checkpoints keep the gradient, so a resumed chain is the uninterrupted
    # one; the gpCN checkpoints do not belong to it and are not resumed
    set_steps(6, langevin=True)
    assert main(["sample", str(case), "--quiet"]) == 0
    lv_first = json.loads((case / "results" / "mcmc.json").read_text())
    assert lv_first["resumed_from"] == {"0": 0, "1": 0}
    assert lv_first["kernel"] == "pCN-Langevin"
    set_steps(9, langevin=True)
    assert main(["sample", str(case), "--quiet"]) == 0
    lv_resumed = json.loads((case / "results" / "mcmc.json").read_text())
    assert lv_resumed["resumed_from"] == {"0": 6, "1": 6}
    lv_straight = straight_run()
    assert lv_straight["acceptance"] == lv_resumed["acceptance"]
    assert 0 < lv_straight["acceptance_overall"] < 1
    for name, v in lv_straight["coefficients"].items():
        assert v["mean"] == lv_resumed["coefficients"][name]["mean"], name
        assert v["mean"] != straight["coefficients"][name]["mean"], name
    assert "pCN-Langevin" in (case / "results" / "report.md").read_text()
    # infinity-HMC (2 leapfrog steps): resumed through the checkpoints' gradient as well, and
    # its cost counts a gradient per leapfrog step
    set_steps(6, leapfrog=2)
    assert main(["sample", str(case), "--quiet"]) == 0
    set_steps(9, leapfrog=2)
    assert main(["sample", str(case), "--quiet"]) == 0
    hmc_resumed = json.loads((case / "results" / "mcmc.json").read_text())
    assert hmc_resumed["resumed_from"] == {"0": 6, "1": 6}
    assert hmc_resumed["kernel"] == "infinity-HMC (2 leapfrog steps)"
    assert hmc_resumed["forward_runs"] == 2 * 9 * 2
    assert hmc_resumed["hmc_step"]["angle"] == pytest.approx(np.arcsin(0.2), rel=1e-12)
    assert "hmc_step" not in lv_resumed
    hmc_straight = straight_run()
    assert hmc_straight["acceptance"] == hmc_resumed["acceptance"]
    for name, v in hmc_straight["coefficients"].items():
        assert v["mean"] == hmc_resumed["coefficients"][name]["mean"], name
        assert v["mean"] != lv_straight["coefficients"][name]["mean"], name
    assert "infinity-HMC" in (case / "results" / "report.md").read_text()


@pytest.mark.mpi
def test_evidence_of_a_field_case(inverted_case):
    """With k(x) learned the spectrum is cut: the evidence carries the tail's estimate and
    bracket, consistent with the omitted trace, and its terms add up."""
    case, _ = inverted_case
    uq = _uq_json(case)
    ev = uq["evidence"]
    tail = ev["log_det_tail"]
    assert ev["n_parameters"] > ev["rank"] == len(uq["eigenvalues"])
    assert tail["method"] in ("bracket", "lanczos")
    assert tail["lower"] <= tail["estimate"] <= tail["upper"]
    t_hi = tail["trace"] + 2 * tail["trace_error"]
    assert np.log1p(max(tail["trace"] - 2 * tail["trace_error"], 0)) <= tail["upper"] <= t_hi
    lo, hi = ev["bounds"]
    assert lo <= ev["log_evidence"] <= hi
    assert hi - lo == pytest.approx(0.5 * (tail["upper"] - tail["lower"]), rel=1e-9)
    total = (
        ev["log_likelihood"] - ev["prior_penalty"] - 0.5 * (ev["log_det_kept"] + tail["estimate"])
    )
    assert ev["log_evidence"] == pytest.approx(total, rel=1e-12)
    lam = np.array(uq["eigenvalues"])
    assert ev["effective_parameters"] >= float(np.sum(lam / (1 + lam)))
    assert "Laplace log evidence" in (case / "results" / "report.md").read_text()
