"""Li fraction by non-negative linear unmixing against LiFePO4 and FePO4 reference spectra.

Per pixel, ``OD(E) = w_LFP R_LFP(E) + w_FP R_FP(E)`` is solved in least squares with
``w >= 0`` (exactly, by enumerating the active sets of the two-component problem), and
``c = w_LFP / (w_LFP + w_FP)``. The per-pixel sigma of ``c`` is the standard deviation over a
bootstrap over the energies: the fit residuals of a pixel are resampled over its energies (with
replacement, scaled by ``sqrt(E / (E - 2))`` for the two fitted weights), added to the fit and
unmixed again. Resampling the residuals rather than the energies themselves keeps the design
fixed: a resample that misses the few energies where the two spectra differ would otherwise
give an ill-conditioned fit and a sigma dominated by it.
"""

from __future__ import annotations

import pathlib
import warnings
from typing import NamedTuple

import numpy as np

from femkin.errors import InputError, close_match_hint

COLUMNS = ("energy", "LiFePO4", "FePO4")


class References(NamedTuple):
    """Reference spectra: ``energy (K,)`` eV, ``spectra (K, 2)`` columns LiFePO4, FePO4."""

    energy: np.ndarray
    spectra: np.ndarray
    source: str

    def at(self, energies: np.ndarray, *, source: str = "stack") -> np.ndarray:
        """Interpolate to ``energies`` -> ``(E, 2)``; InputError when they are not covered."""
        energies = np.asarray(energies, dtype=np.float64)
        lo, hi = self.energy[0], self.energy[-1]
        tol = 1e-6 * max(1.0, abs(hi))
        if energies.min() < lo - tol or energies.max() > hi + tol:
            raise InputError(
                self.source,
                "energy",
                f"references covering {energies.min():g}-{energies.max():g} eV "
                f"(the energies of {source})",
                f"{lo:g}-{hi:g} eV",
            )
        return np.stack(
            [np.interp(energies, self.energy, self.spectra[:, k]) for k in (0, 1)], axis=1
        )


def read_references(path: str | pathlib.Path) -> References:
    """Read a CSV with columns ``energy, LiFePO4, FePO4`` (header row; ``#`` comments).

    Raises:
        InputError: missing file or column, non-numeric or non-finite values, fewer than two
            rows, repeated energies.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise InputError(path, None, "a references CSV (energy, LiFePO4, FePO4)", "no such file")
    lines = [
        ln for ln in path.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")
    ]
    if len(lines) < 3:
        raise InputError(path, None, "a header and at least 2 rows", f"{len(lines)} lines")
    header = [h.strip() for h in lines[0].split(",")]
    lower = [h.lower() for h in header]
    cols = []
    for name in COLUMNS:
        if name.lower() not in lower:
            raise InputError(
                path,
                name,
                f"a column '{name}'",
                f"columns {header}{close_match_hint(name, header)}",
            )
        cols.append(lower.index(name.lower()))
    rows = []
    for i, line in enumerate(lines[1:], start=2):
        parts = [p.strip() for p in line.split(",")]
        try:
            rows.append([float(parts[c]) for c in cols])
        except (ValueError, IndexError):
            raise InputError(path, f"row {i}", f"{len(header)} numbers", repr(line)) from None
    data = np.array(rows)
    if not np.all(np.isfinite(data)):
        raise InputError(path, None, "finite numbers", "NaN or inf")
    order = np.argsort(data[:, 0], kind="stable")
    data = data[order]
    if np.any(np.diff(data[:, 0]) <= 0):
        raise InputError(path, "energy", "distinct energies", "repeated energies")
    return References(energy=data[:, 0], spectra=data[:, 1:], source=str(path))


def nnls2(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Exact non-negative least squares ``min ||a w - b||, w >= 0`` for two components.

    Args:
        a: ``(E, 2)`` design matrix.
        b: ``(E, P)`` right-hand sides (one per pixel).

    Returns:
        ``(2, P)`` weights.
    """
    g = a.T @ a
    r = a.T @ b
    det = g[0, 0] * g[1, 1] - g[0, 1] ** 2
    free = np.array([g[1, 1] * r[0] - g[0, 1] * r[1], g[0, 0] * r[1] - g[0, 1] * r[0]]) / det
    one0 = np.array([np.maximum(r[0] / g[0, 0], 0.0), np.zeros_like(r[0])])
    one1 = np.array([np.zeros_like(r[1]), np.maximum(r[1] / g[1, 1], 0.0)])

    def cost(w):  # ||a w - b||^2 minus the constant ||b||^2
        return -2 * np.sum(w * r, axis=0) + np.einsum("ip,ij,jp->p", w, g, w)

    best = np.where(cost(one0) <= cost(one1), 0, 1)
    w = np.where(best == 0, one0, one1)
    feasible = np.all(free >= 0, axis=0)
    return np.where(feasible, free, w)


def _fraction(w: np.ndarray) -> np.ndarray:
    total = w[0] + w[1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, w[0] / total, np.nan)


class Unmixed(NamedTuple):
    """Unmixing result on an ``(H, W)`` grid: weights ``(2, H, W)``, ``c``, ``sigma``."""

    weights: np.ndarray
    c: np.ndarray
    sigma: np.ndarray


def unmix(od: np.ndarray, design: np.ndarray, *, n_boot: int = 100, seed: int = 0) -> Unmixed:
    """Unmix optical densities ``od (E, H, W)`` against ``design (E, 2)`` (LiFePO4, FePO4).

    Pixels with a NaN at any energy get NaN. ``sigma`` is the standard deviation of ``c`` over
    ``n_boot`` residual resamples over the energies (module docstring), NaN when
    ``n_boot < 2``; the generator is seeded with ``seed``.

    Raises:
        InputError: fewer than two energies or collinear reference spectra at these energies.
    """
    e, h, w = od.shape
    if e < 2 or np.linalg.matrix_rank(design) < 2:
        raise InputError(
            "references",
            "spectra",
            f"two linearly independent spectra at the {e} stack energies",
            f"rank {np.linalg.matrix_rank(design)}",
        )
    flat = od.reshape(e, -1)
    ok = np.all(np.isfinite(flat), axis=0)
    weights = np.full((2, h * w), np.nan)
    weights[:, ok] = nnls2(design, flat[:, ok])
    c = _fraction(weights)
    rng = np.random.default_rng(seed)
    fitted = design @ weights[:, ok]
    residuals = (flat[:, ok] - fitted) * np.sqrt(e / (e - 2)) if e > 2 else 0.0 * fitted
    samples = []
    for _ in range(n_boot):
        idx = rng.integers(0, e, e)
        samples.append(_fraction(nnls2(design, fitted + residuals[idx])))
    sigma = np.full(h * w, np.nan)
    if len(samples) >= 2:
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN background pixels
            sigma[ok] = np.nanstd(np.array(samples), axis=0, ddof=1)
    return Unmixed(weights.reshape(2, h, w), c.reshape(h, w), sigma.reshape(h, w))
