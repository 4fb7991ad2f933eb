"""Posterior predictive band of the particle-average c(t): arithmetic of the check."""

from __future__ import annotations

import numpy as np

from femkin.uq.predictive import GAUSSIAN_TAILS, predictive_c_t


def test_predictive_band_adds_noise_in_quadrature_and_counts_coverage():
    mp = np.linspace(0.1, 0.9, 6)
    s_model = np.full(6, 0.03)
    s_noise = np.full(6, 0.04)  # total std 0.05
    # observed: frame 0 (skipped), then 0, 1, 2.5, -1, -3 total stds from the MAP curve
    offsets = np.array([9.0, 0.0, 1.0, 2.5, -1.0, -3.0]) * 0.05
    c_t = {
        "particles": {
            "1": {"map": mp.tolist(), "observed": (mp + offsets).tolist(), "std": s_model.tolist()}
        }
    }
    predictive_c_t(c_t, {1: s_noise})
    e = c_t["particles"]["1"]
    np.testing.assert_allclose(np.array(e["pred_hi"]) - mp, 1.959963984540054 * 0.05)
    np.testing.assert_allclose(e["z"], [0.0, 1.0, 2.5, -1.0, -3.0], atol=1e-12)
    assert e["inside"] == 3 / 5 and c_t["coverage"] == 3 / 5
    np.testing.assert_allclose(c_t["z_rms"], np.sqrt((0 + 1 + 6.25 + 1 + 9) / 5))


def test_gaussian_tails():
    from math import erf, sqrt

    for k in (2, 3):
        assert abs(GAUSSIAN_TAILS[str(k)] - (1 - erf(k / sqrt(2)))) < 1e-15
