"""Field output for ParaView: ``[simulate] outputs`` writes exactly the formats it names."""

from __future__ import annotations

import h5py
import numpy as np
from workflow_case import write_case

from femkin._fem import MPI


def test_simulate_writes_the_requested_field_formats(tmp_path):
    """xdmf and vtx give c and mu at every frame time; png is not written when not asked for."""
    from femkin.commands.simulate import simulate

    case = write_case(tmp_path / "case", n_frames=4)
    toml = (case / "case.toml").read_text()
    (case / "case.toml").write_text(
        toml.replace('outputs = ["npz", "png"]', 'outputs = ["npz", "xdmf", "vtx"]')
    )
    simulate(case, MPI.COMM_SELF, quiet=True)
    sim = case / "simulated"
    truth = np.load(sim / "truth.npz")
    with h5py.File(sim / "particle_1.h5") as f:
        # DOLFINx names each time step by its time with "_" for the decimal point
        times = sorted(f["Function/c"], key=lambda key: float(key.replace("_", ".")))
        found = [float(key.replace("_", ".")) for key in times]
        np.testing.assert_allclose(found, np.linspace(0, 400, 4), rtol=1e-12)
        assert len(f["Function/mu"]) == 4
        c_last = f[f"Function/c/{times[-1]}"][...].ravel()
    # the nodal c of the last frame and its pixel observation have nearly the same mean
    observed = truth["c"][-1][np.isfinite(truth["c"][-1])]
    assert abs(c_last.mean() - observed.mean()) < 0.02
    bp = sim / "particle_1.bp"
    assert bp.is_dir() and sum(p.stat().st_size for p in bp.iterdir()) > 1000
    assert not (sim / "frames.png").exists()


def test_curves_and_bands_of_each_kinetic_law():
    """j0.csv's curve is the law's; the CIET band follows the posterior of ln lambda.

    The band is linear propagation; j0(c) is monotone in lambda, so the exact 95% interval of
    j0(c) under ln lambda ~ N(mean, s^2) is j0 at lambda exp(+-1.96 s): the two agree to
    O(s^2) (here s = 0.01: 4.4e-4 relative, checked to 1e-3).
    """
    from femkin.forward import ModelParameters
    from femkin.physics.acr import C_GRID, ln_j0
    from femkin.report import coefficient_summary, curves, law_j0_band

    bv = ModelParameters(mu_h=(3.0,), j0=(-0.4, 0.2), j0_prefactor=(0.5, 0.5))
    np.testing.assert_array_equal(
        curves(bv)["j0"], np.exp(ln_j0(C_GRID, bv.j0, 0.5, 0.5, np.log))
    )  # the default law's curve is the learned ln j0, as before the laws
    lim = ModelParameters(kinetics="bv-lim", alpha=0.5, j0=(1.0,))
    np.testing.assert_allclose(curves(lim)["j0"], C_GRID**0.5 * (1 - C_GRID) ** 1.5, rtol=1e-13)
    assert coefficient_summary(lim)["j0"] == [] and "lambda" not in coefficient_summary(lim)
    value, lo, hi = law_j0_band(lim, [("k0", 1)], np.eye(1), C_GRID, 1.96)
    assert np.array_equal(lo, value) and np.array_equal(hi, value)  # nothing learned in j0

    ciet = ModelParameters(kinetics="ciet", lambda_=8.3)
    assert coefficient_summary(ciet)["lambda"] == 8.3
    s = 0.01
    cov = np.diag([0.3**2, s**2, 0.2**2])  # k0, lambda, kappa: only lambda's variance counts
    value, lo, hi = law_j0_band(ciet, [("k0", 1), ("lambda", 1), ("kappa", 1)], cov, C_GRID, 1.96)
    ends = [
        ModelParameters(kinetics="ciet", lambda_=8.3 * np.exp(sign * 1.96 * s)).j0_curve(C_GRID)
        for sign in (-1, 1)
    ]
    exact_lo, exact_hi = np.minimum(*ends), np.maximum(*ends)
    np.testing.assert_allclose(lo, exact_lo, rtol=1e-3)
    np.testing.assert_allclose(hi, exact_hi, rtol=1e-3)
    assert np.all(hi / lo > 1.05)  # the band has width


def test_mcmc_section_replaces_the_earlier_one(tmp_path):
    from femkin.report import MCMC_HEADING, add_mcmc_section

    coefficient = {
        "mean": 1.25,
        "std": 0.5,
        "laplace_mean": 1.0,
        "laplace_std": 0.4,
        "mean_difference_in_std": 0.625,
        "std_ratio": 1.25,
        "skewness": 0.3,
        "ess": 210.0,
        "rhat": 1.01,
    }
    payload = {
        "chains": 4,
        "steps_per_chain": [500, 500, 500, 500],
        "settings": {"proposal": "laplace", "beta": 0.5},
        "acceptance_overall": 0.41,
        "min_ess": 210.0,
        "max_rhat": 1.01,
        "forward_runs_per_effective_sample": 9.5,
        "coefficients": {"k0": coefficient},
        "laplace_check": {"verdict": "first verdict"},
    }
    (tmp_path / "report.md").write_text("# femkin results\n\n## Particles\n\nrow\n")
    add_mcmc_section(tmp_path, payload)
    payload["laplace_check"] = {"verdict": "second verdict"}
    add_mcmc_section(tmp_path, payload)
    text = (tmp_path / "report.md").read_text()
    assert text.count(MCMC_HEADING) == 1 and "## Particles\n\nrow\n" in text
    assert "second verdict" in text and "first verdict" not in text
    assert "| k0 | 1 | 0.4 | 1.25 | 0.5 | +0.62 | 1.25 | +0.30 | 210 | 1.010 |" in text
    assert "acceptance 0.41, min ESS 210, max split-R-hat 1.010" in text
    add_mcmc_section(tmp_path / "absent", payload)  # no report: nothing written
    assert not (tmp_path / "absent").exists()
