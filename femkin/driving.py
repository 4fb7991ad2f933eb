"""The reservoir chemical potential mu_e(t): piecewise linear through knots (kT, s)."""

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
