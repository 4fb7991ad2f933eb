"""Twin experiments with the CIET law: data simulated with CIET, fitted with CIET.

A tiny disc particle (~60 pixels, 0.05 um pixels, 9 frames over 400 s), lithiated by a reservoir
ramp mu_e = 0.5 -> 12 kT that drives the overpotential past lambda, where the Marcus-Hush-
Chidsey rate saturates; noise 0.02 on c, true lambda = 8.3 kT, k0 = 0.07 1/s, uniform k.
The fit starts from lambda = 5 kT (and k0 = 0.03 1/s where k0 is learned too).

Measured (2026-12): lambda alone: 8.248 (-0.6 %); lambda and k0 jointly: lambda 8.193
(-1.3 %, posterior std of ln lambda 0.050), k0 0.0683 (-2.5 %). With a weak drive
(mu_e <= 3.5 kT, overpotentials well below lambda) lambda and k0 trade off: the joint fit reached
the noise level at lambda = 4.8 kT, k0 = 0.026 1/s, which is why the ramp is strong here.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from workflow_case import write_case

from femkin.cli import main

TRUE_LAMBDA, TRUE_K0 = 8.3, 0.07

CASE = """
[data]
video = "data/video.npz"
[mesh]
size = 1.5
[model]
kappa = 0.004
mu_h = [3.0, 0.3]
kinetics = "ciet"
lambda = 5.0
k0 = {k0}
[solver]
scheme = "euler"
dc_max = 0.08
[driving]
t = [0.0, 400.0]
mu_e = [0.5, 12.0]
[simulate]
noise = 0.02
seed = 3
mesh_size = 1.0
outputs = ["npz"]
[simulate.model]
kinetics = "ciet"
lambda = {true_lambda}
k0 = {true_k0}
[inversion]
learn = {learn}
max_iterations = 30
[inversion.prior]
lambda_std = 1.0
"""


def _fit(root, learn: list[str], k0: float) -> dict:
    case = write_case(root, n_frames=9)
    text = CASE.format(k0=k0, true_lambda=TRUE_LAMBDA, true_k0=TRUE_K0, learn=json.dumps(learn))
    (case / "case.toml").write_text(text)
    assert main(["simulate", str(case), "--quiet"]) == 0
    truth = np.load(case / "simulated" / "truth.npz")
    assert str(truth["kinetics"]) == "ciet" and float(truth["lambda"]) == TRUE_LAMBDA
    assert main(["invert", str(case), "--quiet"]) == 0
    summary = json.loads((case / "results" / "summary.json").read_text())
    assert summary["converged"], summary["stop_reason"]
    assert summary["coefficients"]["kinetics"] == "ciet"
    # the j0(c) written is the CIET curve at the fitted lambda: zero net rate, skewed to low c
    table = np.loadtxt(case / "results" / "j0.csv", delimiter=",", skiprows=1)
    assert 0.3 < table[np.argmax(table[:, 1]), 0] < 0.4
    return summary


def test_ciet_twin_recovers_lambda(tmp_path):
    """k0 known: lambda from 5 kT back to within 3 % of 8.3 kT (measured -0.6 %)."""
    summary = _fit(tmp_path, ["lambda"], TRUE_K0)
    lam = summary["coefficients"]["lambda"]
    assert abs(lam / TRUE_LAMBDA - 1) < 0.03, lam
    assert summary["truth_comparison"]["lambda_relative_error"] == pytest.approx(
        lam / TRUE_LAMBDA - 1
    )
    assert summary["misfit_rms"] < 1.1 * 0.02


@pytest.mark.slow
def test_ciet_twin_recovers_lambda_and_k0(tmp_path):
    """lambda and k0 jointly, from (5 kT, 0.03 1/s): within 5 % and 10 % (-1.3 %, -2.5 %).

    The Laplace posterior then covers the truth: ln lambda within 3 posterior std (measured
    0.26 std, std 0.050), and the j0(c) band of j0.csv (from ln lambda's variance) holds the
    fitted curve and has width.
    """
    summary = _fit(tmp_path, ["lambda", "k0"], 0.03)
    c = summary["coefficients"]
    assert abs(c["lambda"] / TRUE_LAMBDA - 1) < 0.05, c
    assert abs(c["k0"] / TRUE_K0 - 1) < 0.10, c
    case = tmp_path
    assert main(["uq", str(case), "--quiet"]) == 0
    uq = json.loads((case / "results" / "uq.json").read_text())
    post = uq["coefficients"]["lambda"]
    assert post["std"][0] < post["prior_std"][0] / 5  # the data inform lambda
    assert abs(post["mean"][0] - np.log(TRUE_LAMBDA)) < 3 * post["std"][0], post
    table = np.loadtxt(case / "results" / "j0.csv", delimiter=",", skiprows=1)
    _, j0, lo, hi = table.T
    assert np.all(lo < j0) and np.all(j0 < hi) and np.min(hi / lo) > 1.05
