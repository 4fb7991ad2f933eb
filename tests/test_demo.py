"""The demo twin experiment end to end (slow: a few CPU minutes; run with FEMKIN_SLOW=1).

``femkin run`` on a temporary copy of ``cases/demo`` simulates the data on a mesh twice as
fine as the fit's, adds noise 0.07, fits mu_h, j0, k0 and m (Newton-CG, to convergence), and
runs the Laplace UQ (its bands are checked against the truth too). Asserted against the
truth, with the issue's thresholds: the misfit RMS is within 10 % of the noise, ln k
correlates with the true ln k over the pixels with Pearson r >= 0.85, and the fitted mu_h is
within 0.3 kT of the true one on c in [0.1, 0.9]. Measured on this
machine (13 frames, 10 bnls iterations, femkin at 92a4b41): misfit RMS 0.0711 (1.6 % off
0.07), r = 0.994, max |mu_h error| = 0.20 kT (before 92a4b41's fixed step schedule: 0.0701,
0.996, 0.19 kT). About 4 CPU minutes.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "cases" / "demo"
FEMKIN = Path(sys.executable).parent / "femkin"


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    """Run ``femkin run`` on a fresh copy of the demo (inputs only); return the case dir."""
    case = tmp_path_factory.mktemp("demo") / "demo"
    case.mkdir()
    shutil.copy2(DEMO / "case.toml", case / "case.toml")
    shutil.copytree(DEMO / "data", case / "data")
    proc = subprocess.run(
        [str(FEMKIN), "run", str(case), "--quiet"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return case


@pytest.mark.slow
def test_demo_data_are_an_honest_twin(demo_run):
    """The simulated data: noisy (std 0.07 around the clean truth) and sweeping c 0.1 -> 0.9."""
    with np.load(demo_run / "simulated" / "video.npz") as z:
        noisy = z["c"]
    with np.load(demo_run / "simulated" / "truth.npz") as z:
        clean = z["c"]
    residual = (noisy - clean)[1:]
    residual = residual[np.isfinite(residual)]
    assert abs(residual.std() - 0.07) < 0.003
    means = np.array([np.nanmean(frame) for frame in clean])
    assert means[0] == pytest.approx(0.1, abs=0.01)
    assert means[-1] > 0.9
    assert 12 <= clean.shape[0] <= 16


@pytest.mark.slow
def test_demo_twin_meets_the_verification_thresholds(demo_run):
    summary = json.loads((demo_run / "results" / "summary.json").read_text())
    truth = summary["truth_comparison"]
    noise = truth["noise"]
    assert noise == pytest.approx(0.07)
    assert abs(summary["misfit_rms"] - noise) <= 0.10 * noise
    assert truth["ln_k_pearson"] >= 0.85
    assert truth["mu_h_max_error_kT"] <= 0.3
    assert (demo_run / "results" / "uq.json").is_file()


@pytest.mark.slow
def test_demo_bands_are_honest_and_tight(demo_run):
    """Issue #14's demo target: on c in [0.1, 0.9] the mu_h band's median width is at most 3x
    the largest error of the centre curve, and the mu_h and j0 bands hold the truth. Measured
    2026-12-03: width 0.366 kT, error 0.200 kT (ratio 1.83), both bands hold the truth on all
    of that range; the coefficients are centred on their marginal mode after the converged
    fit."""
    from femkin.physics.acr import ln_j0, mu_h

    uq = json.loads((demo_run / "results" / "uq.json").read_text())
    assert uq["fit"]["converged"] and uq["coefficient_mean"]["used"] == "marginal"
    assert uq["marginals"]["converged"]
    with np.load(demo_run / "simulated" / "truth.npz") as z:
        true_mu, true_j0, (p, q) = z["mu_h"], z["j0"], z["j0_prefactor"]
    for name in ("mu_h", "j0"):
        d = np.genfromtxt(demo_run / "results" / f"{name}.csv", delimiter=",", names=True)
        inside = (d["c"] >= 0.1 - 1e-9) & (d["c"] <= 0.9 + 1e-9)
        c = d["c"][inside]
        truth = (
            mu_h(c, true_mu, np.log) if name == "mu_h" else np.exp(ln_j0(c, true_j0, p, q, np.log))
        )
        lo, hi, centre = d["lo"][inside], d["hi"][inside], d[name][inside]
        held = np.mean((truth >= lo) & (truth <= hi))
        assert held >= 0.95, (name, held)
        if name == "mu_h":
            width = float(np.median(hi - lo))
            error = float(np.max(np.abs(centre - truth)))
            assert width <= 3.0 * error, (width, error)
            assert width < 0.5, width


@pytest.mark.slow
def test_demo_taylor_rates(demo_run):
    """``femkin verify`` on the demo: gradient rate >= 1.9, full-Hessian rate >= 2.9 in every
    learned block, symmetric Hessian (measured 2.00 / 2.98-3.00 / 1e-15, serially and on 2
    ranks, about 35 s)."""
    proc = subprocess.run(
        [str(FEMKIN), "verify", str(demo_run), "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rates = json.loads(proc.stdout.strip().splitlines()[-1])
    for block in ("mu_h", "j0", "k0", "m"):
        assert rates["gradient"][block] >= 1.9, rates
        assert rates["hessian"][block] >= 2.9, rates
    assert rates["symmetry"] < 1e-8
