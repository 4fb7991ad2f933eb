"""The reservoir chemical potential mu_e(t): piecewise linear through knots (kT, s).

mu_e(t) is linear in the knot values, ``mu_e(t_n) = sum_i phi_i(t_n) values[i]`` with the hat
functions ``phi_i`` of the knots. When the knots are fitted, the forward run sees mu_e at its
step times: :meth:`Driving.step_values` maps knot values (or a knot direction) to the steps
and :meth:`Driving.knot_gradient` is its transpose (per-step sensitivities to knot gradient).
"""

from __future__ import annotations

import numpy as np


class Driving:
    """Piecewise-linear mu_e(t) through ``(t_knots, values)``, constant beyond the ends.

    Args:
        t_knots: strictly increasing knot times (s).
        values: mu_e at the knots (kT).
    """

    def __init__(self, t_knots, values):
        self.t = np.asarray(t_knots, dtype=float)
        self.values = np.array(values, dtype=float)
        if self.t.ndim != 1 or self.t.shape != self.values.shape:
            raise ValueError(f"{self.t.shape=} and {self.values.shape=} must be equal 1-D shapes")
        if self.t.size > 1 and np.any(np.diff(self.t) <= 0):
            raise ValueError("knot times must be strictly increasing")

    def weights(self, t: float) -> tuple[np.ndarray, np.ndarray]:
        """Knot indices and weights with ``mu_e(t) = sum w_i values[i]`` (the derivative too)."""
        if self.t.size == 1 or t <= self.t[0]:
            return np.array([0]), np.array([1.0])
        if t >= self.t[-1]:
            return np.array([self.t.size - 1]), np.array([1.0])
        i = int(np.searchsorted(self.t, t, side="right")) - 1
        s = (t - self.t[i]) / (self.t[i + 1] - self.t[i])
        return np.array([i, i + 1]), np.array([1.0 - s, s])

    def __call__(self, t: float) -> float:
        """mu_e(t) (dimensionless overpotential of the electrolyte) at time ``t`` (s)."""
        idx, w = self.weights(t)
        return float(np.dot(w, self.values[idx]))

    def step_values(self, times, knot_values) -> np.ndarray:
        """``sum_i phi_i(t_n) knot_values[i]`` at every time ``t_n``.

        Maps knot values, or a direction of the knots, to the steps of a trajectory.
        """
        knot_values = np.asarray(knot_values, dtype=float)
        out = np.zeros(len(times))
        for n, t in enumerate(times):
            idx, w = self.weights(t)
            out[n] = float(np.dot(w, knot_values[idx]))
        return out

    def knot_gradient(self, times, step_sensitivities) -> np.ndarray:
        """The transpose of :meth:`step_values`: ``sum_n phi_i(t_n) s_n`` per knot.

        ``times[0]`` is the initial state of the run, which mu_e does not act on: its entry is
        not used.
        """
        out = np.zeros(self.values.size)
        for n, t in enumerate(times):
            if n == 0:
                continue
            idx, w = self.weights(t)
            out[idx] += w * step_sensitivities[n]
        return out
