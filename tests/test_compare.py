"""``femkin compare`` and the evidence of real fits: tables, refusals, partition independence.

The fast tests fit two variants of the tiny twin (a few Newton iterations); the ``slow`` ones
measure Occam's razor and the attribution of a twin to its law (noise 0.07, a lithiation and
delithiation cycle), and check the Laplace evidence against importance sampling.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
from compare_cases import MILD, write_law_twin, write_psf_twin, write_twin, write_variant

from femkin._fem import MPI
from femkin.cli import main


def _collective_root(prefix: str):
    import pathlib
    import tempfile

    comm = MPI.COMM_WORLD
    root = tempfile.mkdtemp(prefix=prefix) if comm.rank == 0 else None
    return pathlib.Path(comm.bcast(root, root=0))


@pytest.fixture(scope="module")
def compared():
    """Two variants of the tiny twin's data (fixed Lim law; Lim law times a learned Legendre
    factor), fitted for 4 iterations and compared (on every rank)."""
    comm = MPI.COMM_WORLD
    root = _collective_root("femkin-compare-")
    if comm.rank == 0:
        write_twin(root / "lim", max_iterations=4)
        write_variant(
            root / "flex", "lim", (0.5, 1.5), [0.0], ["mu_h", "j0", "k0"], max_iterations=4
        )
    comm.barrier()
    rc = main(["compare", str(root / "lim"), str(root / "flex"), "--quiet"])
    assert rc == 0
    yield root
    comm.barrier()
    if comm.rank == 0:
        shutil.rmtree(root, ignore_errors=True)


def _json(path):
    return json.loads(path.read_text())


@pytest.mark.mpi
def test_compare_table_matches_the_cases_evidence(compared):
    root = compared
    out = root / "lim" / "compare"  # the default: inside the first case
    table = _json(out / "compare.json")
    rows = {r["case"]: r for r in table["rows"]}
    assert set(rows) == {"lim", "flex"}
    values = [r["log_evidence"] for r in table["rows"]]
    assert values == sorted(values, reverse=True) and table["best"] == table["rows"][0]["case"]
    best = table["rows"][0]["log_evidence"]
    for name, row in rows.items():
        ev = _json(root / name / "results" / "uq.json")["evidence"]
        assert row["log_evidence"] == ev["log_evidence"]
        assert row["log_bf_vs_best"] == pytest.approx(best - ev["log_evidence"], abs=1e-12)
        assert row["misfit_rms"] == _json(root / name / "results" / "summary.json")["misfit_rms"]
    assert rows["lim"]["n_parameters"] == 3 and rows["flex"]["n_parameters"] == 4
    assert rows["lim"]["n_data"] == rows["flex"]["n_data"]
    assert rows["flex"]["effective_parameters"] > rows["lim"]["effective_parameters"]
    md = (out / "compare.md").read_text()
    assert "| lim |" in md and "| flex |" in md and "c^0.5(1-c)^1.5" in md
    assert (out / "compare_curves.png").stat().st_size > 1000


@pytest.mark.mpi
def test_evidence_terms_from_the_data(compared):
    """N and sum log sigma counted independently from the video; the terms add up."""
    root = compared
    video = np.load(root / "lim" / "simulated" / "video.npz")
    mask = video["mask"]
    n_data = int(np.isfinite(video["c"][1:][:, mask > 0]).sum())  # frame 0: the initial state
    for name in ("lim", "flex"):
        ev = _json(root / name / "results" / "uq.json")["evidence"]
        summary = _json(root / name / "results" / "summary.json")
        assert ev["n_data"] == n_data
        assert ev["sum_log_sigma"] == pytest.approx(n_data * math.log(0.07), rel=1e-12)
        assert ev["misfit"] == pytest.approx(summary["misfit"], rel=1e-9)
        log_lik = -ev["misfit"] - 0.5 * n_data * math.log(2 * math.pi) - ev["sum_log_sigma"]
        assert ev["log_likelihood"] == pytest.approx(log_lik, rel=1e-12)
        assert ev["rank"] == ev["n_parameters"] and ev["log_det_tail"]["method"] == "exact"
        total = ev["log_likelihood"] - ev["prior_penalty"] - 0.5 * ev["log_det_kept"]
        assert ev["log_evidence"] == pytest.approx(total, rel=1e-12)
        lam = np.array(_json(root / name / "results" / "uq.json")["eigenvalues"])
        assert ev["log_det_kept"] == pytest.approx(np.sum(np.log1p(lam)), rel=1e-12)
        assert "Laplace log evidence" in (root / name / "results" / "report.md").read_text()


@pytest.mark.mpi
def test_evidence_does_not_depend_on_the_partition(compared):
    """Under mpirun the cases were analysed on 2 ranks; redo one on rank 0 alone."""
    root = compared
    comm = MPI.COMM_WORLD
    world = _json(root / "flex" / "results" / "uq.json")["evidence"]["log_evidence"]
    ok, detail = True, None
    if comm.rank == 0:
        from femkin.inversion.checkpoint import read_checkpoint
        from femkin.inversion.fit import build_prior
        from femkin.study import build_problem, checkpoint_path, checkpoint_settings, open_study
        from femkin.uq.laplace_study import analyse

        self_comm = MPI.COMM_SELF
        study = open_study(root / "flex", self_comm)
        problem = build_problem(study, self_comm)
        x = problem.initial_vector()
        prior = build_prior(problem, study.case.inversion["prior"], x)
        _, case_hash = checkpoint_settings(study, problem)
        state = read_checkpoint(checkpoint_path(study.case), problem.space, x, case_hash=case_hash)
        problem.set_schedules(state.get("schedules", {}))
        alone = analyse(problem, prior, x, {**study.case.uq, "samples": 0}).evidence.log_evidence
        ok = abs(alone - world) < 1e-6 * max(1.0, abs(world))
        detail = (alone, world)
    ok = comm.allreduce(ok, op=MPI.LAND)
    assert ok, comm.bcast(detail, root=0)


@pytest.mark.mpi
def test_compare_refuses_other_data_in_one_line(compared, capsys):
    root = compared
    comm = MPI.COMM_WORLD
    if comm.rank == 0:
        other = root / "other"
        (other / "data").mkdir(parents=True, exist_ok=True)
        z = dict(np.load(root / "lim" / "simulated" / "video.npz"))
        z["c"] = z["c"].copy()
        z["c"][2][np.isfinite(z["c"][2])] += 0.01
        np.savez(other / "data" / "video.npz", **z)
        text = (root / "flex" / "case.toml").read_text()
        (other / "case.toml").write_text(
            text.replace("../lim/simulated/video.npz", "data/video.npz").replace(
                'truth = "../lim/simulated/truth.npz"\n', ""
            )
        )
    comm.barrier()
    capsys.readouterr()
    rc = main(["compare", str(root / "lim"), str(root / "other"), "--out", str(root / "cmp")])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    if comm.rank == 0:
        assert len(err.splitlines()) == 1, err
        assert "same data" in err and "a different c" in err and "other" in err
    assert not (root / "other" / "results").exists()  # refused before any fit
    # --no-run on a case without results: one line, nothing run
    capsys.readouterr()
    rc = main(["compare", str(root / "lim"), str(root / "other"), "--no-run"])
    assert rc == 2


# -- slow: the targets of issue 15, measured --------------------------------------------------
#: compare_cases' mild cycle without time_tol: backward Euler, as when first measured
CYCLE = {k: v for k, v in MILD.items() if k != "time_tol"}


def _cycle_variant(root, name, twin, pq, j0, learn):
    kw = {k: CYCLE[k] for k in ("knots", "mu_e", "dc_max")}
    return write_variant(root / name, twin, pq, j0, learn, **kw)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("truth", "other"), [((0.5, 1.5), (0.0, 0.0)), ((0.0, 0.0), (0.5, 1.5))], ids=["lim", "const"]
)
def test_occam_and_attribution(mpi_tmp_path, truth, other):
    """A fixed-j0 twin (noise 0.07, a lithiation-delithiation cycle): the fixed law beats or
    ties the learned-j0 family that contains it, and beats the other fixed law by log BF > 3."""
    root = mpi_tmp_path
    if MPI.COMM_WORLD.rank == 0:
        write_twin(root / "twin", truth, **CYCLE)
        _cycle_variant(root, "flex", "twin", truth, [0.0, 0.0], ["mu_h", "j0", "k0"])
        _cycle_variant(root, "other", "twin", other, [], ["mu_h", "k0"])
    MPI.COMM_WORLD.barrier()
    assert main(["compare", *(str(root / n) for n in ("twin", "flex", "other")), "--quiet"]) == 0
    rows = {r["case"]: r for r in _json(root / "twin" / "compare" / "compare.json")["rows"]}
    # the Occam comparison needs both MAP points; the wrong law may stop on a failed line
    # search far above the noise (its misfit RMS says why), which only lowers its evidence more
    assert rows["twin"]["converged"] and rows["flex"]["converged"], rows
    z = {n: r["log_evidence"] for n, r in rows.items()}
    print("log evidence", truth, z)
    assert z["twin"] - z["flex"] > -1.0, z  # Occam: the fixed law wins or ties
    assert z["twin"] - z["other"] > 3.0, z  # the law that made the data, by a clear margin
    # the flexible family fits at least as well; it loses by its Occam factor
    assert rows["flex"]["log_likelihood"] >= rows["twin"]["log_likelihood"] - 0.5


def _compared_rows(cases) -> dict:
    """Fit and compare ``cases`` (the twin first); the compare.json rows by case name."""
    assert main(["compare", *(str(c) for c in cases), "--quiet"]) == 0
    rows = _json(cases[0] / "compare" / "compare.json")["rows"]
    if MPI.COMM_WORLD.rank == 0:
        print({r["case"]: (round(r["log_evidence"], 2), r["converged"]) for r in rows})
    return {r["case"]: r for r in rows}


def _converged_or_far_above_noise(row, noise=0.07):
    """A losing model either converged or stopped on a failed line search far above the noise
    (which only lowers its evidence further)."""
    return row["converged"] or row["misfit_rms"] > 1.3 * noise


@pytest.mark.slow
@pytest.mark.parametrize("truth", ["ciet", "bv-lim"])
def test_kinetic_law_attribution(mpi_tmp_path, truth):
    """Data made with CIET (lambda 6 kT) or with Lim's Butler-Volmer law, noise 0.07, a strong
    lithiation-delithiation cycle (overpotentials up to ~8 kT): the evidence attributes each
    twin to its law. CIET is fitted with lambda learned (prior median 8.3 kT) and fixed at
    8.3 kT (``ciet-8.3``).

    Measured (13 frames, ~60 pixels; log BF of the twin's law against each other variant):
    CIET twin: against ciet-8.3 19.5, bv-lim 53.7, bv-constant 815.8, the learned-j0 family
    11.3 (lambda 5.02 kT, k0 0.046 1/s against the true 6 kT, 0.06 1/s: the two trade off);
    bv-lim twin: against CIET 14.5 (lambda ran to 2.0 kT), ciet-8.3 38.9, bv-constant 1603,
    the learned-j0 family 3.2. Every fit converged (8-95 s each)."""
    root = mpi_tmp_path
    cases = write_law_twin(root, truth) if MPI.COMM_WORLD.rank == 0 else None
    cases = MPI.COMM_WORLD.bcast(cases, root=0)
    rows = _compared_rows(cases)
    z = {n: r["log_evidence"] for n, r in rows.items()}
    assert rows[truth]["converged"] and rows["bv-flex"]["converged"], rows
    assert rows[truth]["misfit_rms"] < 1.05 * 0.07, rows[truth]
    for other in ("ciet", "ciet-8.3", "bv-lim", "bv-constant"):
        if other != truth:
            assert _converged_or_far_above_noise(rows[other]), rows[other]
            assert z[truth] - z[other] > 3.0, (other, z)  # a clear margin
    assert z[truth] - z["bv-flex"] > -1.0, z  # the flexible family: never preferred widely
    if truth == "ciet":
        lam = _json(root / "ciet" / "results" / "summary.json")["coefficients"]["lambda"]
        assert 4.0 < lam < 8.0, lam  # learned from the prior median 8.3 kT toward the true 6


@pytest.mark.slow
@pytest.mark.parametrize("blurred", [True, False], ids=["psf", "point"])
def test_psf_attribution(mpi_tmp_path, blurred):
    """Data observed through a Gaussian PSF of FWHM 1.5 pixels (or point sampled), a rough true
    ln k field (BiLaplacian prior sample, std 0.7, length 2 pixels; every fit learns m), noise
    0.07, 25 frames over the milder cycle: blurred data prefer the PSF, at the true width and
    with the width learned, over point sampling by log BF > 3; point-sampled data prefer point
    sampling or tie against the learned width (Occam), and reject the fixed PSF.

    Measured: blurred twin: PSF fixed 9.0 and PSF learned 6.0 above point sampling (the learned
    width, 0.027 um from the prior median 0.05 um, is not the true 0.075 um: the m field takes
    up part of the blur at this noise); point twin: see the assertions' messages."""
    root = mpi_tmp_path
    cases = write_psf_twin(root, blurred) if MPI.COMM_WORLD.rank == 0 else None
    cases = MPI.COMM_WORLD.bcast(cases, root=0)
    rows = _compared_rows(cases)
    assert all(r["converged"] for r in rows.values()), rows
    z = {n: r["log_evidence"] for n, r in rows.items()}
    if blurred:
        assert z["psf"] - z["point"] > 3.0, z
        assert z["psf-learned"] - z["point"] > 3.0, z
    else:
        assert z["point"] - z["psf-learned"] > -1.0, z
        assert z["point"] - z["psf"] > 3.0, z


@pytest.mark.slow
@pytest.mark.parametrize(
    ("learn", "tolerance", "min_ess"),
    [(["j0", "k0"], 0.15, 100), (["mu_h", "j0", "k0"], 2.5, 10)],
    ids=["2", "4"],
)
def test_laplace_evidence_against_importance_sampling(mpi_tmp_path, learn, tolerance, min_ess):
    """The tiny twin fitted with few global coefficients: the Laplace evidence against
    importance sampling from the (1.3x widened) Laplace posterior, 300 forward runs.

    Measured: with ln j0 and ln k0 learned the two agree to 0.05 nats (ESS 255 of 300); with
    mu_h as well, its weakly determined direction (lambda ~ 0.5) is far from Gaussian (the
    negative log posterior rises ~17 instead of 0.5 one Laplace std away), and the Laplace
    evidence lies ~2 nats above the sampled one (ESS 17): the size of the Laplace error to
    expect where a direction is barely informed and the model is strongly nonlinear in it."""
    from femkin.commands.run import run_case
    from femkin.inversion.checkpoint import read_checkpoint
    from femkin.inversion.fit import build_prior
    from femkin.study import build_problem, checkpoint_path, checkpoint_settings, open_study
    from femkin.uq.evidence import importance_log_evidence
    from femkin.uq.laplace_study import analyse

    comm = MPI.COMM_WORLD
    root = mpi_tmp_path
    if comm.rank == 0:
        write_twin(root / "twin", (0.5, 0.5), noise=0.05, learn=learn)
        text = (root / "twin" / "case.toml").read_text()
        (root / "twin" / "case.toml").write_text(text.replace("j0 = []", "j0 = [0.0]"))
    comm.barrier()
    run_case(root / "twin", quiet=True, comm=comm)
    study = open_study(root / "twin", comm)
    problem = build_problem(study, comm)
    x = problem.initial_vector()
    prior = build_prior(problem, study.case.inversion["prior"], x)
    _, case_hash = checkpoint_settings(study, problem)
    state = read_checkpoint(checkpoint_path(study.case), problem.space, x, case_hash=case_hash)
    problem.set_schedules(state.get("schedules", {}))
    result = analyse(problem, prior, x, {**study.case.uq, "samples": 0})
    laplace = result.evidence.log_evidence
    brute = importance_log_evidence(problem, prior, x, result.posterior, samples=300, scale=1.3)
    print("laplace", laplace, "importance sampling", brute)
    assert brute["failed"] == 0 and brute["ess"] > min_ess
    assert abs(laplace - brute["log_evidence"]) < tolerance + 3 * brute["standard_error"]


def test_table_arithmetic_and_words(tmp_path):
    """Sorting, Bayes factors with the tails' brackets, Kass & Raftery's words, the files."""
    from femkin.compare import Entry, compare_table, strength, write_comparison

    c = np.linspace(0.01, 0.99, 5)

    def entry(name, log_z, half):
        ev = {
            "log_evidence": log_z,
            "bounds": [log_z - half, log_z + half],
            "n_parameters": 3,
            "n_data": 100,
            "effective_parameters": 2.5,
            "log_likelihood": log_z + 10,
            "prior_penalty": 1.0,
            "log_det_kept": 18.0,
            "log_det_tail": {"estimate": 0.0},
        }
        curves = {n: {"c": c, "value": 1 + c} for n in ("mu_h", "j0")}
        return Entry(name, tmp_path, name, ev, 0.07, True, "converged", curves)

    table = compare_table([entry("b", 10.0, 0.0), entry("a", 14.5, 0.5), entry("c", 13.0, 0.0)])
    assert [r["case"] for r in table["rows"]] == ["a", "c", "b"]
    rows = {r["case"]: r for r in table["rows"]}
    assert rows["b"]["log_bf_vs_best"] == pytest.approx(4.5)
    assert rows["b"]["log_bf_bounds"] == pytest.approx([4.0, 5.0])
    assert rows["c"]["log_bf_bounds"] == pytest.approx([1.0, 2.0])
    assert rows["b"]["strength"] == "strong" and rows["c"]["strength"] == "positive"
    assert not table["decisive"]  # c is within 3 nats
    assert strength(0.5) == "not worth more than a mention" and strength(7.0) == "very strong"
    assert compare_table([entry("a", 20.0, 0.1), entry("b", 10.0, 0.1)])["decisive"]
    out = tmp_path / "cmp"
    write_comparison(out, [entry("a", 20.0, 0.1), entry("b", 10.0, 0.0)])
    assert json.loads((out / "compare.json").read_text())["best"] == "a"
    md = (out / "compare.md").read_text()
    assert "| a | a | 20.00 ± 0.1 | 0.00 | best |" in md and "Decisive" in md
    assert (out / "compare_curves.png").exists()
