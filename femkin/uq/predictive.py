"""Posterior predictive checks: standardised residuals and the predictive band of c(t).

Two questions a user asks of a fit and its posterior (Gelman et al., *Bayesian Data Analysis*,
ch. 6): are the residuals at the MAP point the noise the likelihood assumes, i.e. is
``(d - model) / sigma`` distributed as N(0, 1); and does the observed particle-average
``c(t)`` fall inside the posterior predictive band (model uncertainty from posterior samples
plus the noise of a pixel average)? Too many residuals beyond 2 or 3 sigma, or an observed
curve outside its band, say the likelihood is missing something (model error, a wrong sigma).

All functions are collective on the problem's communicator.
"""

from __future__ import annotations

import numpy as np

from femkin._fem import MPI

__all__ = ["GAUSSIAN_TAILS", "HISTOGRAM_EDGES", "predictive_c_t", "residual_check"]

#: ``P(|Z| > 2)`` and ``P(|Z| > 3)`` for a standard normal ``Z``.
GAUSSIAN_TAILS = {"2": 0.04550026389635842, "3": 0.0026997960632601965}
#: Bins of the standardised-residual histogram.
HISTOGRAM_EDGES = np.linspace(-5.0, 5.0, 41)


def residual_check(problem) -> dict:
    """Statistics of the standardised residuals ``(model - d) / sigma`` of the last forward run.

    Uses every observed pixel of every fitted frame (frame 0 only when the initial state is
    learned), on the trajectories the problem holds (run ``problem.misfit(x)`` first).

    Returns:
        ``{"n", "mean", "std", "beyond_2", "beyond_3", "expected_beyond_2",
        "expected_beyond_3", "histogram": {"edges", "counts"}}`` (every rank).
    """
    total = np.zeros(5)  # n, sum, sum of squares, beyond 2, beyond 3
    counts = np.zeros(HISTOGRAM_EDGES.size - 1)
    for p in problem.particles.values():
        r = p.misfit.standardised_residuals(p.trajectory)
        total += [r.size, r.sum(), (r * r).sum(), (np.abs(r) > 2).sum(), (np.abs(r) > 3).sum()]
        counts += np.histogram(np.clip(r, -4.999, 4.999), bins=HISTOGRAM_EDGES)[0]
    total = problem.comm.allreduce(total, op=MPI.SUM)
    counts = problem.comm.allreduce(counts, op=MPI.SUM)
    n = max(total[0], 1.0)
    mean = total[1] / n
    return {
        "n": int(total[0]),
        "mean": float(mean),
        "std": float(np.sqrt(max(total[2] / n - mean * mean, 0.0))),
        "beyond_2": float(total[3] / n),
        "beyond_3": float(total[4] / n),
        "expected_beyond_2": GAUSSIAN_TAILS["2"],
        "expected_beyond_3": GAUSSIAN_TAILS["3"],
        "histogram": {"edges": HISTOGRAM_EDGES.tolist(), "counts": counts.astype(int).tolist()},
    }


def average_noise_std(problem) -> dict[int, np.ndarray]:
    """Noise std of each particle's pixel-average c at every frame (every rank).

    ``std(mean_i d_i) = sqrt(sum_i sigma_i^2) / n`` over the observed pixels.
    """
    labels = problem.labels
    T = problem.video.c.shape[0]
    var_sum = np.zeros((len(labels), T))
    count = np.zeros((len(labels), T))
    for label, p in problem.particles.items():
        i = labels.index(label)
        w = p.misfit.weight
        seen = w > 0
        var_sum[i] += np.where(seen, 1.0 / np.where(seen, w, 1.0), 0.0).sum(axis=1)
        count[i] += seen.sum(axis=1)
    var_sum = problem.comm.allreduce(var_sum, op=MPI.SUM)
    count = problem.comm.allreduce(count, op=MPI.SUM)
    return {lb: np.sqrt(var_sum[i]) / np.maximum(count[i], 1.0) for i, lb in enumerate(labels)}


def predictive_c_t(c_t: dict, noise_std: dict[int, np.ndarray], z: float = 1.959963984540054):
    """Add the posterior predictive band and its check to a ``c_t`` entry (in place).

    The predictive std of the observed average is ``sqrt(s_model^2 + s_noise^2)`` (``s_model``
    the std of the posterior samples' averages, ``s_noise`` from :func:`average_noise_std`);
    the band is the MAP curve +- ``z`` of it. Adds per particle ``pred_lo``, ``pred_hi``,
    ``z`` (the observed average's standardised distance from the MAP curve) and ``inside``
    (the fraction of fitted frames inside the band), and overall ``coverage`` and ``z_rms``.

    Args:
        c_t: the ``c_t`` dict of :func:`femkin.uq.laplace_study.analyse` (rank 0).
        noise_std: ``{label: (T,) std}``.
        z: the standard-normal quantile of the band.

    Returns:
        ``c_t`` itself.
    """
    zs = []
    inside = []
    for label, entry in c_t["particles"].items():
        mp = np.asarray(entry["map"])
        obs = np.asarray(entry["observed"])
        s_model = np.asarray(entry.get("std", np.zeros_like(mp)))
        s = np.sqrt(s_model**2 + noise_std[int(label)] ** 2)
        entry["pred_lo"] = (mp - z * s).tolist()
        entry["pred_hi"] = (mp + z * s).tolist()
        fitted = slice(1, None)  # frame 0 is the initial condition, not a prediction
        zz = (obs - mp)[fitted] / np.where(s[fitted] > 0, s[fitted], np.inf)
        entry["z"] = zz.tolist()
        entry["inside"] = float(np.mean(np.abs(zz) <= z)) if zz.size else float("nan")
        zs.append(zz)
        inside.append(np.abs(zz) <= z)
    allz = np.concatenate(zs) if zs else np.zeros(0)
    c_t["coverage"] = float(np.mean(np.concatenate(inside))) if allz.size else float("nan")
    c_t["z_rms"] = float(np.sqrt(np.mean(allz**2))) if allz.size else float("nan")
    return c_t
